"""The compact table `bench run` prints at the end (it fits 100 columns), and the fuller table as summary.md.

Each headline number carries its 95% confidence interval: `±x%` in the terminal, `[low–high]` in summary.md; a
cell whose repetitions disagree says `unstable` in its status and `(!)` instead of the interval, with the reason
below the table.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from harness.config.scenario import Workload
from harness.core.files import atomic_write
from harness.records import CellResult, ConcurrencyCap, RunResult
from harness.results.catalogue import CATALOGUE, HEADLINE, SUMMARY_COLUMNS, column_header, fmt_interval
from harness.results.markdown import md_escape, md_table

# The terminal's columns: the p50s and the throughput a reader compares first, narrow enough for 100 columns.
TERMINAL_COLUMNS = (("ttft_ms", "p50"), ("tpot_ms", "p50"), ("output_throughput_tok_s", None), ("errors", None))
UNSTABLE_MARK = "(!)"


def status(c: CellResult) -> str:
    return "unstable" if c.ok and c.unstable else c.status


def value(c: CellResult, key: str, stat: str | None, interval: str) -> str:
    """The cell's number, with its CI as `interval` says: "pm" (±x%), "range" ([low–high]) or "none"; none for a
    failed cell, whose surviving requests' numbers would mislead."""
    if not c.ok:
        return "–"
    name = f"{key}.{stat}" if stat else key
    v = c.metrics.value(name) if c.metrics else None
    m = CATALOGUE[key]
    text = m.format(v)
    ci = c.interval(name)
    if v is None or interval == "none" or name not in HEADLINE or (ci is None and not c.unstable):
        return text
    if c.unstable or ci is None:
        return f"{text} {UNSTABLE_MARK}"
    if interval == "range":
        return f"{text} {fmt_interval(ci, m.unit, v)}"
    half = max(ci[1] - v, v - ci[0]) / v * 100 if v else 0.0
    return f"{text} ±{'<1' if half < 1 else f'{half:.0f}'}%"


def queued(cap: ConcurrencyCap) -> str:
    """What a cell whose backend serves fewer at once than the load asks measured (the load asked is the same)."""
    how = ("its TTFT and E2E latency count the wait for a free slot, as its users would wait" if cap.queue_in_latency
           else "these older results time its latencies after that wait: not comparable with the others")
    return f"{cap.describe()}; the harness queued the rest, and {how}"


def names(run: RunResult) -> tuple[list[str], list[list[str]]]:
    """The identifying columns: the model only when there are several."""
    several = len({c.model for c in run.cells}) > 1
    headers = (["model"] if several else []) + ["backend", "workload", "status"]
    return headers, [([c.model] if several else []) + [c.backend, c.workload, status(c)] for c in run.cells]


Columns = Sequence[tuple[str, str | None]]


def rows(run: RunResult, columns: Columns = SUMMARY_COLUMNS,
         interval: str = "range") -> tuple[list[str], list[list[str]]]:
    headers, ids = names(run)
    return (headers + [column_header(k, s) for k, s in columns],
            [row + [value(c, k, s, interval) for k, s in columns] for c, row in zip(run.cells, ids)])


def numbers_basis(repetitions: str, cells: list[CellResult]) -> str:
    """What a cell's numbers are: medians over the scenario's repetitions, except for a capacity search, which
    runs once (its steps are its runs) and whose numbers are those of the step at its capacity."""
    searches = sum(isinstance(c.workload_spec, Workload) and c.workload_spec.load.type == "capacity" for c in cells)
    step = "from the step at the search's capacity (one search per cell: repetitions do not apply)"
    if searches and searches == len(cells):
        return step
    return f"medians over {repetitions} repetition(s) of each cell" + (
        f", a capacity search's {step}" if searches else "")


def _title(run: RunResult) -> str:
    methods = sorted({c.ci_method for c in run.cells if c.ci_method})
    ci = f"; ± is the 95% CI ({', '.join(methods)})" if methods else ""
    return numbers_basis(str(run.scenario.get("repetitions", "?")), run.cells) + ci


def print_summary(run: RunResult, console: Console) -> None:
    headers, body = rows(run, TERMINAL_COLUMNS, "pm")
    table = Table(title=escape(f"{run.scenario.get('name', '?')}: {_title(run)}"), box=box.SIMPLE_HEAD,
                  show_edge=False, pad_edge=False, collapse_padding=True, title_justify="left")
    n_names = len(headers) - len(TERMINAL_COLUMNS)
    # The unit on a line of its own keeps a column as narrow as its values.
    headers = headers[:n_names] + [h.replace(" ms", "\nms") for h in headers[n_names:]]
    for i, h in enumerate(headers):
        # Nothing wraps or shortens: a sweep label is part of the name, and a CI belongs beside its value.
        table.add_column(escape(h), justify="left" if i < n_names else "right", no_wrap=True)
    for c, r in zip(run.cells, body):
        table.add_row(*map(escape, r), style="dim" if c.status == "skipped" else "red" if not c.ok
                      else "yellow" if c.unstable else None)
    console.print(table)
    for c in run.cells:
        if c.status == "skipped":
            console.print(f"{escape(c.id)} skipped: {escape(c.error_line or '')}", highlight=False)
        elif not c.ok:
            console.print(f"[red]{escape(c.id)} failed:[/red] {escape(c.error_line or '')}", highlight=False)
        elif c.unstable:
            console.print(f"[yellow]{escape(c.id)} {UNSTABLE_MARK} unstable:[/yellow] {escape(c.unstable)}",
                          highlight=False)
        if c.ok and c.concurrency_cap is not None:
            console.print(f"{escape(c.id)}: {escape(queued(c.concurrency_cap))}", highlight=False)
        if c.ok and c.client_limited:
            console.print(f"[yellow]{escape(c.id)} client limited:[/yellow] "
                          f"{escape('; '.join(c.client_limited_reasons))}", highlight=False)


def write_summary(run: RunResult, path: Path) -> None:
    headers, body = rows(run)
    lines = [f"# {md_escape(run.scenario.get('name', '?'))}", "",
             f"{md_escape(_title(run)[0].upper() + _title(run)[1:])}; metric definitions follow vLLM's serving benchmark. "
             "Full data: results.json.", "", *md_table(headers, body)]
    unstable = [c for c in run.cells if c.ok and c.unstable]
    if unstable:
        lines += ["", "## Unstable cells", "", "Their repetitions disagree: the medians above may be no one's typical "
                  "value.", ""]
        lines += [f"- `{md_escape(c.id)}`: {md_escape(c.unstable)}" for c in unstable]
    capped = [(c.id, c.concurrency_cap) for c in run.cells if c.ok and c.concurrency_cap is not None]
    if capped:
        lines += ["", "## Backends that serve fewer at once than asked", ""]
        lines += [f"- `{md_escape(cell)}`: {md_escape(queued(cap))}" for cell, cap in capped]
    limited = [c for c in run.cells if c.ok and c.client_limited]
    if limited:
        lines += ["", "## Client-limited cells", "", "The load generator could not keep its schedule: these numbers "
                  "describe the client more than the engine (`bench calibrate` measures this machine's client).", ""]
        lines += [f"- `{md_escape(c.id)}`: {md_escape('; '.join(c.client_limited_reasons))}" for c in limited]
    for status, title in (("failed", "Failed cells"), ("skipped", "Skipped cells (optional engines not installed)")):
        cells = [c for c in run.cells if c.status == status]
        if cells:
            lines += ["", f"## {title}", ""]
            lines += [f"- `{md_escape(c.id)}`: {md_escape(c.error_line or '')}" for c in cells]
    atomic_write(path, "\n".join(lines) + "\n")
