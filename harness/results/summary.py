"""The compact table `bench run` prints at the end, and the same table as summary.md."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.records import RunResult
from harness.results.catalogue import CATALOGUE, SUMMARY_COLUMNS, column_header
from harness.results.markdown import md_escape, md_table

HEADERS = ["model", "backend", "workload", "status", *(column_header(k, s) for k, s in SUMMARY_COLUMNS)]


def rows(run: RunResult) -> list[list[str]]:
    out = []
    for c in run.cells:
        m = c.metrics or {}
        values = []
        for key, stat in SUMMARY_COLUMNS:
            v = m.get(key)
            values.append(CATALOGUE[key].format(v.get(stat) if isinstance(v, dict) else v))
        out.append([c.model, c.backend, c.workload, c.status, *values])
    return out


def _title(run: RunResult) -> str:
    return f"median over {run.scenario.get('repetitions', '?')} repetition(s)"


def print_summary(run: RunResult, console: Console) -> None:
    table = Table(title=escape(f"{run.scenario.get('name', '?')}: {_title(run)}"))
    for h in HEADERS:
        table.add_column(escape(h), justify="left" if h in HEADERS[:4] else "right")
    for r in rows(run):
        table.add_row(*map(escape, r), style=None if r[3] == "ok" else "red")
    console.print(table)
    for c in run.cells:
        if not c.ok:
            console.print(f"[red]{escape(c.id)} failed:[/red] {escape(c.error_line or '')}")


def write_summary(run: RunResult, path: Path) -> None:
    lines = [f"# {md_escape(run.scenario.get('name', '?'))}", "",
             f"{_title(run).capitalize()}; metric definitions follow vLLM's serving benchmark. Full data: "
             "results.json.", "", *md_table(HEADERS, rows(run))]
    failed = [c for c in run.cells if not c.ok]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- `{md_escape(c.id)}`: {md_escape(c.error_line or '')}" for c in failed]
    path.write_text("\n".join(lines) + "\n")
