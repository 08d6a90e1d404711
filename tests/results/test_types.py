"""Typed results: the type checker passes over the packages it guards, and the typed blocks of a stored results file
read and write back as they were stored."""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib

import pytest

from harness.records import CellResult, load_run
from tests.conftest import ROOT

BASELINE = ROOT / "results/baselines/ci-gate/results.json"


@pytest.mark.slow
def test_the_guarded_packages_type_check():
    """mypy --strict over [tool.mypy] files in pyproject.toml, the one list of what it guards."""
    files = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["mypy"]["files"]
    assert {"harness/records.py", "harness/core", "harness/results", "harness/analyze", "own_engine"} <= set(files)
    done = subprocess.run([sys.executable, "-m", "mypy"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]


def test_a_stored_cell_reads_typed_and_writes_back_as_stored():
    """The committed baseline: every block reads as its model, and each cell dumps to exactly what the file holds,
    save fields added since with their defaults (a resumed run rewrites the cells it keeps)."""
    stored = json.loads(BASELINE.read_text())["cells"]
    run = load_run(BASELINE)
    added = {k for k, f in CellResult.model_fields.items() if not f.is_required()} - set(stored[0])
    for cell, data in zip(run.cells, stored):
        assert cell.metrics is not None and cell.metrics.value("ttft_ms.p50") == data["metrics"]["ttft_ms"]["p50"]
        assert cell.repetitions[0].ci["ttft_ms.p50"] == data["repetitions"][0]["ci"]["ttft_ms.p50"]
        assert cell.engine.engine == data["engine"]["engine"] and cell.capabilities is not None
        assert cell.resources is not None and cell.resources.whole is not None
        assert cell.resources.whole.max_rss_bytes == data["resources"]["whole"]["max_rss_bytes"]
        dumped = cell.model_dump(mode="json", exclude=added)
        # The workload is read through the scenario's schema: what was stored, and its defaults for settings since.
        assert holds(dumped.pop("workload_spec"), data.pop("workload_spec"))
        assert dumped == data


def holds(whole: object, part: object) -> bool:
    """`whole` has every key of `part`, with the same value (dicts compared key by key)."""
    if isinstance(part, dict):
        return isinstance(whole, dict) and all(k in whole and holds(whole[k], v) for k, v in part.items())
    return whole == part


def test_a_workload_this_version_cannot_read_is_kept_as_written():
    cell = CellResult(id="c", model="m", backend="b", workload="w", status="ok",
                      workload_spec={"name": "w", "a_setting_from_the_future": 1})
    assert cell.workload_spec == {"name": "w", "a_setting_from_the_future": 1}
    assert CellResult.model_validate_json(cell.model_dump_json()).workload_spec == cell.workload_spec
