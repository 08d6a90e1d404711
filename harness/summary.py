"""The compact table `bench run` prints at the end, and the same table as summary.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

# (header, metric, statistic or None for a scalar, format)
COLUMNS = [
    ("TTFT p50 ms", "ttft_ms", "p50", "{:.1f}"),
    ("TTFT p99 ms", "ttft_ms", "p99", "{:.1f}"),
    ("TPOT p50 ms", "tpot_ms", "p50", "{:.2f}"),
    ("ITL p50 ms", "itl_ms", "p50", "{:.2f}"),
    ("E2E p50 ms", "e2el_ms", "p50", "{:.1f}"),
    ("out tok/s", "output_throughput_tok_s", None, "{:.1f}"),
    ("req/s", "request_throughput_rps", None, "{:.2f}"),
    ("goodput req/s", "goodput_rps", None, "{:.2f}"),
    ("errors", "errors", None, "{:.0f}"),
]


def rows(results: dict[str, Any]) -> list[list[str]]:
    out = []
    for c in results["cells"]:
        m = c.get("metrics") or {}
        values = []
        for _, key, stat, fmt in COLUMNS:
            v = m.get(key)
            v = v.get(stat) if isinstance(v, dict) else v
            values.append("–" if v is None else fmt.format(v))
        out.append([c["model"], c["backend"], c["workload"], c["status"], *values])
    return out


HEADERS = ["model", "backend", "workload", "status", *(c[0] for c in COLUMNS)]


def print_summary(results: dict[str, Any], console: Console) -> None:
    table = Table(title=f"{results['scenario']['name']}: median over {results['scenario']['repetitions']} repetition(s)")
    for h in HEADERS:
        table.add_column(h, justify="left" if h in HEADERS[:4] else "right")
    for r in rows(results):
        table.add_row(*r, style=None if r[3] == "ok" else "red")
    console.print(table)
    for c in results["cells"]:
        if c["status"] != "ok":
            console.print(f"[red]{c['id']} failed:[/red] {(c.get('error') or '').splitlines()[0] if c.get('error') else ''}")


def write_summary(results: dict[str, Any], path: Path) -> None:
    def md(cells: list[str]) -> str:
        return "| " + " | ".join(s.replace("|", "\\|") for s in cells) + " |"

    lines = [f"# {results['scenario']['name']}", "",
             f"Median over {results['scenario']['repetitions']} repetition(s); metric definitions follow vLLM's "
             "serving benchmark. Full data: results.json.", "",
             md(HEADERS), md(["---"] * len(HEADERS)), *(md(r) for r in rows(results))]
    failed = [c for c in results["cells"] if c["status"] != "ok"]
    if failed:
        lines += ["", "## Failed cells", ""]
        lines += [f"- `{c['id']}`: {(c.get('error') or '').splitlines()[0] if c.get('error') else ''}" for c in failed]
    path.write_text("\n".join(lines) + "\n")
