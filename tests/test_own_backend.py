"""The `own` backend: our engine through the harness, in every placement, against the HF reference."""

import json

import pytest

from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import scenario_dict


def run_cells(write_scenario, tiny_model, tmp_path, backends, **extra):
    wl = [{"name": "w", "input_tokens": 40, "output_tokens": 24, "num_requests": 4,
           "load": {"type": "concurrency", "concurrency": 2}}]
    path = write_scenario(scenario_dict(tiny_model, backends, wl, record_outputs=True, **extra))
    code = Runner(load_scenario(path), str(path), tmp_path / "out").run()
    cells = {c["backend"]: c for c in json.loads((tmp_path / "out" / "results.json").read_text())["cells"]}
    return code, cells


def outputs(tmp_path, cell):
    lines = (tmp_path / "out" / cell["requests_file"]).read_text().splitlines()
    return {r["id"]: r["output_token_ids"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_every_placement_gives_hf_greedy_tokens_and_counts_its_bytes(write_scenario, tiny_model, tmp_path):
    backends = [{"name": "hf", "kind": "transformers"},
                {"name": "own", "kind": "own", "options": {"max_batch": 2}},
                {"name": "own-disk", "kind": "own", "options": {"weights": "disk", "kv": "disk", "block_size": 16}}]
    code, cells = run_cells(write_scenario, tiny_model, tmp_path, backends)
    assert code == 0, {k: c["error"] for k, c in cells.items()}
    reference = outputs(tmp_path, cells["hf"])
    for name in ("own", "own-disk"):
        c = cells[name]
        assert outputs(tmp_path, c) == reference, name
        assert c["metrics"]["total_output_tokens"] == 4 * 24 and c["token_counts"]["output"] == ["engine"]
        assert c["logical_io"]["tokens"]["decode"] > 0
    disk = cells["own-disk"]
    streamed = disk["logical_io"]["transfers"]["decode/disk->host"]["bytes"]
    assert streamed > 0 and disk["logical_io"]["decode_bound"]["ratio_to_bound"] > 0
    assert disk["resources"]["whole"]["max_offload_dir_bytes"] > 0  # the KV blocks on disk, measured from outside
    assert "decode/disk->host" not in cells["own"]["logical_io"]["transfers"]  # resident: nothing streamed


def test_a_budget_too_small_fails_the_cell_clearly(write_scenario, tiny_model, tmp_path):
    backends = [{"name": "tiny-budget", "kind": "own", "options": {"vram_budget": "64KiB"}}]
    code, cells = run_cells(write_scenario, tiny_model, tmp_path, backends)
    assert code == 1 and "own engine" in cells["tiny-budget"]["error"] and "budget" in cells["tiny-budget"]["error"]


def test_bad_placement_is_a_scenario_error(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    b = [{"name": "o", "kind": "own", "options": {"weights": "tape"}}]
    r = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(tiny_model, b)))])
    assert r.exit_code == 2 and "backends[0].options.weights" in r.output and "disk" in r.output
