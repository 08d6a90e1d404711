"""scenarios/documents.yaml, as shipped but at small sizes, through the Runner: its contracts on the HF engine, on
ours with its prefix cache and on llama.cpp keeping its KV cache, which must reuse the document the questions share
and say so (prefix_reuse); with record_outputs, the greedy float32 engines' answers are compared (agreement). The
kinds' documents themselves are tested in tests/inputs/test_prompt_sources.py: each cell here costs a worker process."""

import pytest
import yaml

from harness.config.load import load_scenario
from harness.records import load_run, read_requests
from harness.run.runner import Runner
from tests.conftest import ROOT


@pytest.mark.slow
def test_documents_scenario_runs_small(tmp_path):
    scenario = yaml.safe_load((ROOT / "scenarios/documents.yaml").read_text())
    assert scenario["models"]["tiny"]["synthetic"]["preset"] == "tiny-llama-40k"
    scenario["backends"] = [b for b in scenario["backends"] if b["name"] in ("hf", "own", "llamacpp-cache")]
    assert [w["prompts"]["kind"] for w in scenario["workloads"]] == ["contract", "medical", "log"]
    scenario["workloads"] = scenario["workloads"][:1]
    scenario["workloads"][0] |= {"input_tokens": [300], "num_requests": 4, "output_tokens": 4}
    scenario["workloads"][0]["prompts"]["questions_per_document"] = 2
    scenario |= {"repetitions": 1, "record_outputs": True}
    (tmp_path / "documents.yaml").write_text(yaml.safe_dump(scenario))
    out = tmp_path / "out"
    assert Runner(load_scenario(tmp_path / "documents.yaml"), "documents.yaml", out).run() == 0
    run = load_run(out)
    assert {(c.backend, c.base_workload) for c in run.cells} == {("hf", "contract"), ("own", "contract"),
                                                                 ("llamacpp-cache", "contract")}
    for c in run.cells:
        records = read_requests(c.requests_path(out))
        assert len(records) == 4 and all(r.ok and r.output_text for r in records)
        assert c.metrics.value("total_input_tokens") >= 4 * 290
    # Two documents per repetition, each asked twice: the second question reuses the first's blocks.
    cells = {c.backend: c for c in run.cells}
    own = cells["own"]
    assert own.engine.model_extra["prefix_cache"] and own.logical_io.prefix_cache["hit_blocks"] > 0, own.logical_io
    # ... and every engine with a cache says what it reused under the one field: our engine in whole blocks,
    # llama.cpp the document a question shares with the question before; transformers keeps none
    assert own.prefix_reuse.reused_tokens == own.logical_io.prefix_cache["hit_blocks"] * own.engine.block_size
    assert cells["llamacpp-cache"].prefix_reuse.reused_tokens >= 2 * 250, cells["llamacpp-cache"].prefix_reuse
    assert cells["hf"].prefix_reuse is None
    assert "## Prefix reuse" in (out / "report.md").read_text()
    assert {(row.reference, row.backend) for row in run.agreement} == {("hf", "own"), ("hf", "llamacpp-cache")}
    for row in run.agreement:
        assert row.workload == "contract[input_tokens=300]"
        assert row.compared == 4 and row.unit == "tokens" and row.first_n == 32 and row.precision == "float32"
    assert "## Agreement" in (out / "report.md").read_text() and 'id="agreement"' in (out / "report.html").read_text()
