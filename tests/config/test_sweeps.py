"""A list-valued workload field sweeps: each value becomes its own cell."""

import json

from harness.run.runner import Runner
from harness.config.load import load_scenario
from harness.config.scenario import Scenario
from tests.conftest import scenario_dict


def test_lists_expand_into_the_cartesian_product(tiny_model):
    s = Scenario.model_validate(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}], [
        {"name": "ctx", "input_tokens": [64, 256], "output_tokens": 8, "num_requests": 2,
         "load": {"type": "concurrency", "concurrency": [1, 4]}},
        {"name": "plain", "input_tokens": 8, "output_tokens": 4, "num_requests": 1},
    ]))
    names = [c.workload for c in s.cells()]
    assert names == ["ctx[input_tokens=64,load.concurrency=1]", "ctx[input_tokens=64,load.concurrency=4]",
                     "ctx[input_tokens=256,load.concurrency=1]", "ctx[input_tokens=256,load.concurrency=4]", "plain"]
    w = s.workload("ctx[input_tokens=256,load.concurrency=4]")
    assert (w.base, w.sweep, w.spec.input_tokens, w.spec.load.concurrency) == ("ctx", {"input_tokens": 256, "load.concurrency": 4}, 256, 4)
    assert s.workload("plain").sweep == {}


def test_swept_cells_run_and_carry_their_values(write_scenario, tiny_model, tmp_path):
    b = [{"name": "s", "kind": "scripted", "options": {"ttft_s": 0.001, "itl_s": 0.0005}}]
    wl = [{"name": "rate", "input_tokens": 16, "output_tokens": [2, 6], "num_requests": 3,
           "load": {"type": "poisson", "rate": [50.0, 100.0]}}]
    path = write_scenario(scenario_dict(tiny_model, b, wl))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", in_process=True,
                  write_report=False).run() == 0
    cells = json.loads((tmp_path / "out" / "results.json").read_text())["cells"]
    assert len(cells) == 4 and {c["base_workload"] for c in cells} == {"rate"}
    for c in cells:
        assert c["metrics"]["total_output_tokens"] == 3 * c["sweep"]["output_tokens"] == 3 * c["workload_spec"]["output_tokens"]
        assert c["workload_spec"]["load"]["rate"] == c["sweep"]["load.rate"]


def test_an_empty_sweep_is_an_error(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    wl = [{"name": "w", "input_tokens": [], "output_tokens": 4, "num_requests": 1}]
    r = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(tiny_model, [{"name": "hf", "kind": "transformers"}], wl)))])
    assert r.exit_code == 2 and "workloads[0].input_tokens" in r.output and "at least one value" in r.output
