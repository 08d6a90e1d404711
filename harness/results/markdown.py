"""Markdown that a model's or a user's string cannot break: the one escaper for summary.md, reports and gates."""

from __future__ import annotations

import re

MD_SPECIAL = re.compile(r"([\\`|<>&\[\]*])")
MD_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;"}


def md_escape(text: object) -> str:
    """Make a string inert in Markdown: no HTML, no links or images, no emphasis, no table breaks, one line."""
    text = " ".join(str(text).split())
    return MD_SPECIAL.sub(lambda m: MD_ENTITIES.get(m.group(1), "\\" + m.group(1)), text)


def md_row(cells: list[str]) -> str:
    return "| " + " | ".join(md_escape(c) for c in cells) + " |"


def md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    return [md_row(headers), "| " + " | ".join("---" for _ in headers) + " |", *(md_row(r) for r in rows)]
