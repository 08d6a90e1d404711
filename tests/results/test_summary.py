"""The terminal table and summary.md: 100 columns, full cell names (sweep labels are not rich markup), the CI or
an unstable mark beside every p50."""

from __future__ import annotations

from rich.console import Console

from harness.config.scenario import SLO
from harness.records import CellResult, RunResult
from harness.results.metrics import reduce_cell
from harness.results.summary import print_summary, write_summary
from tests.results.test_metrics import lognormal_records


def run_result() -> RunResult:
    cells = []
    for backend, workload, scale in (("llamacpp-server", "short[input_tokens=512]", None),
                                     ("own-disk", "short[input_tokens=2048]", [1.0, 10.0, 1.0]),
                                     ("hf", "long[load.concurrency=16]", None)):
        d = reduce_cell(lognormal_records(3, 12, scale=scale), 3, SLO(), max_cv=0.25)
        cells.append(CellResult(id=f"tiny__{backend}__{workload}", model="tiny", backend=backend, workload=workload,
                                status="ok", **d))
    cells.append(CellResult(id="tiny__vllm__long", model="tiny", backend="vllm", workload="long", status="failed",
                            error="vllm_server exited (SIGKILL) after 10 requests\nlast lines of the log",
                            **reduce_cell(lognormal_records(1, 4), 1, SLO(), max_cv=0.25)))
    return RunResult(schema_version=1, scenario={"name": "demo", "repetitions": 3}, cells=cells)


def test_terminal_table_fits_100_columns_with_full_names_and_intervals():
    console = Console(width=100, record=True, color_system=None)
    print_summary(run_result(), console)
    text = console.export_text()
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    table = lines[:lines.index(next(line for line in lines if line.startswith("tiny__")))]
    for name in ("short[input_tokens=512]", "short[input_tokens=2048]", "long[load.concurrency=16]"):
        assert any(name in line for line in table), name  # whole, on one line, brackets and all
    row = next(line for line in table if "llamacpp-server" in line)
    assert row.count("±") == 3  # TTFT p50, TPOT p50, output tok/s
    unstable = next(line for line in table if "own-disk" in line)
    assert "unstable" in unstable and unstable.count("(!)") == 3 and "±" not in unstable
    failed = next(line for line in table if "vllm" in line)
    assert "failed" in failed and "±" not in failed  # the survivors' numbers are not shown
    assert "tiny__own-disk__short[input_tokens=2048] (!) unstable: repetitions disagree" in " ".join(text.split())
    assert "tiny__vllm__long failed: vllm_server exited (SIGKILL) after 10 requests" in text


def test_summary_md_has_intervals_and_unstable_cells(tmp_path):
    write_summary(run_result(), tmp_path / "summary.md")
    md = (tmp_path / "summary.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| llamacpp-server"))
    assert row.count("\\[") >= 7  # every headline column: value [low–high]
    assert "| own-disk | short\\[input_tokens=2048\\] | unstable |" in md
    assert "## Unstable cells" in md and "## Failed cells" in md
    assert "95% CI (bootstrap over repetitions" in md
