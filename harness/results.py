"""results.json and requests.jsonl: written atomically after every cell, so a crash always leaves valid files.

Layout of an output folder:
  results.json            schema_version, scenario, environment, cells[] (docs/results.md)
  requests.jsonl          every measured request of every cell, one JSON object a line, tagged with its cell
  cells/<cell id>/        cell.json (what the worker ran), requests.jsonl, worker.json, worker.log, server logs
  prompts/                the prompts sent, per model and workload
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness import environment

SCHEMA_VERSION = 1


class ResultsError(Exception):
    """A results file that cannot be read: printed without a traceback, exit code 2."""


def atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_results(path: Path | str) -> dict[str, Any]:
    """A results.json, or the one inside a results folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or "schema_version" not in data or "cells" not in data:
        raise ResultsError(f"{path}: not an llmbench results file (expected schema_version and cells)")
    if data["schema_version"] > SCHEMA_VERSION:
        raise ResultsError(f"{path}: schema_version {data['schema_version']} is newer than this llmbench reads "
                           f"({SCHEMA_VERSION}); upgrade llmbench")
    return data


class ResultsStore:
    def __init__(self, out: Path, scenario: dict[str, Any], scenario_file: str, resume: bool):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.json"
        previous = load_results(self.path) if resume and self.path.exists() else None
        self.cells: dict[str, dict[str, Any]] = {c["id"]: c for c in previous["cells"]} if previous else {}
        self.data = {
            "schema_version": SCHEMA_VERSION,
            "created": previous["created"] if previous else datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "updated": None,
            "scenario_file": scenario_file,
            "scenario": scenario,
            "environment": environment.collect(),
            "cells": [],
        }

    def fresh_cell_dir(self, cell_id: str) -> Path:
        """The cell's folder, emptied: files of an earlier try must not mix with this one's."""
        d = self.out / "cells" / cell_id
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def done(self, cell_id: str) -> bool:
        return self.cells.get(cell_id, {}).get("status") == "ok"

    def put(self, cell: dict[str, Any], order: list[str]) -> None:
        """Record one cell and rewrite both files; `order` is the scenario's cell order."""
        self.cells[cell["id"]] = cell
        rank = {cid: i for i, cid in enumerate(order)}
        self.data["cells"] = sorted(self.cells.values(), key=lambda c: rank.get(c["id"], len(rank)))
        self.data["updated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        atomic_write(self.path, json.dumps(self.data, indent=1))
        self._write_requests()

    def _write_requests(self) -> None:
        lines = []
        for c in self.data["cells"]:
            f = self.out / "cells" / c["id"] / "requests.jsonl"
            if f.exists():
                prefix = json.dumps({"cell": c["id"]})[:-1] + ", "
                lines += [prefix + line[1:] for line in f.read_text().splitlines() if line.strip()]
        atomic_write(self.out / "requests.jsonl", "\n".join(lines) + ("\n" if lines else ""))
