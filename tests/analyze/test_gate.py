"""`bench gate` and `bench baseline update` on synthetic runs with known, planted differences.

The synthetic runs go through the real reducer and results writer, so they have exactly the shape `bench run`
writes; only the latencies are drawn from chosen distributions instead of measured.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.analyze.gate import GateRun, judge, load_policy
from harness.records import CellResult, RequestRecord
from harness.results.metrics import PERCENTILE_METHOD, median_over_repetitions, reduce_repetition, token_sources
from harness.results.store import ResultsStore
from harness.config.scenario import SLO
from tests.conftest import scenario_dict

ROOT = Path(__file__).resolve().parents[2]

ENV = {
    "llmbench": {"version": "0.1.0", "git_sha": None}, "python": "3.11.7", "os": "Linux", "hostname": "ci",
    "cpu": {"model": "Synthetic CPU 9000", "logical_cores": 2, "physical_cores": 2}, "ram_bytes": 2**34,
    "gpu": {"available": True, "driver": "550", "cuda_driver": "12.4",
            "devices": [{"index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_bytes": 85899345920}]},
    "packages": {"torch": "2.13.0", "transformers": "5.23.0"},
}
# Seconds of TTFT and per-token gap of each synthetic backend at factor 1.
SPEED = {"hf": (0.012, 0.0035), "own": (0.006, 0.0020)}


def synth_run(out: Path, seed: int, factors: dict[str, float] | None = None, backends=("hf",), n_requests=16,
              repetitions=5, output_tokens=32, env=None) -> Path:
    """A results folder from lognormal latencies, sequential load; `factors` slows a backend down (1.2 = 20%).

    Noise at three levels, as on a real machine: per repetition (3%), per request (10%), per token gap (10%).
    """
    rng = np.random.default_rng(seed)
    store = ResultsStore(out, {"name": "synthetic", "repetitions": repetitions}, "synthetic.yaml", resume=False)
    store.run.environment = copy.deepcopy(env or ENV)
    ids = [f"tiny__{b}__short" for b in backends]
    for backend, cell_id in zip(backends, ids):
        ttft0, gap0 = SPEED[backend]
        factor = (factors or {}).get(backend, 1.0)
        records, t = [], 100.0
        for rep in range(repetitions):
            rep_noise = rng.lognormal(0, 0.03)
            for i in range(n_requests):
                slow = factor * rep_noise * rng.lognormal(0, 0.10)
                first = t + ttft0 * slow * rng.lognormal(0, 0.10)
                gaps = gap0 * slow * rng.lognormal(0, 0.10, output_tokens - 1)
                times = [first, *(first + np.cumsum(gaps))]
                records.append(RequestRecord(
                    id=rep * n_requests + i, repetition=rep, t_send=t, chunk_times=[float(x) for x in times],
                    chunk_tokens=[1] * output_tokens, input_tokens=64, output_tokens=output_tokens,
                    input_source="engine", output_source="engine", exact_length=True, finish_reason="length"))
                t = times[-1] + 0.001
        cell_dir = store.fresh_cell_dir(cell_id)
        (cell_dir / "requests.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
        reps = [reduce_repetition([r for r in records if r.repetition == i], SLO()) for i in range(repetitions)]
        store.put(CellResult(**{
            "id": cell_id, "model": "tiny", "backend": backend, "workload": "short", "backend_kind": "synthetic",
            "status": "ok", "error": None, "metrics": median_over_repetitions(reps), "repetitions": reps,
            "percentile_method": PERCENTILE_METHOD, "token_counts": token_sources(records), "load_time_s": 1.0,
            "engine": {"engine": backend, "version": "1.0"}, "requests_file": f"cells/{cell_id}/requests.jsonl",
        }), ids)
    return out


def gate(*args: str | Path):
    result = CliRunner().invoke(app, ["gate", *map(str, args)])
    assert "Traceback" not in result.output
    return result


def edit_results(folder: Path, change) -> None:
    path = folder / "results.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def verdicts(folder: Path) -> dict[tuple[str, str], str]:
    data = json.loads((folder / "gate.json").read_text())
    return {(r["cell"], r["metric"]): r["verdict"] for r in data["rows"]}


LATENCIES = ("ttft_ms", "tpot_ms", "e2el_ms")


# ---- the verdicts -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1, 2])
def test_planted_20pct_latency_regression_fails(tmp_path, seed):
    base = synth_run(tmp_path / "base", seed)
    cur = synth_run(tmp_path / "cur", seed + 100, factors={"hf": 1.2})
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 1, result.output
    v = verdicts(cur)
    assert all(v[("tiny__hf__short", m)] == "regression" for m in LATENCIES), v
    assert "gate FAIL" in result.output
    assert "regression" in (cur / "gate.md").read_text()


def test_noise_only_passes_over_ten_seeds(tmp_path):
    for seed in range(10):
        base = synth_run(tmp_path / f"base{seed}", seed)
        cur = synth_run(tmp_path / f"cur{seed}", seed + 1000)
        result = gate("--baseline", base, "--current", cur)
        assert result.exit_code == 0, (seed, result.output)
        assert "regression" not in verdicts(cur).values()


def test_improvement_is_reported_and_passes(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    cur = synth_run(tmp_path / "cur", 1, factors={"hf": 0.7})
    assert gate("--baseline", base, "--current", cur).exit_code == 0
    v = verdicts(cur)
    assert all(v[("tiny__hf__short", m)] == "improvement" for m in LATENCIES), v


def test_bootstrap_median_ci_catches_regression_and_passes_noise(tmp_path):
    policy = tmp_path / "boot.yaml"
    policy.write_text("metrics:\n"
                      "  e2el_ms: {direction: lower, threshold: 1.10, test: bootstrap_median_ci}\n"
                      "  output_throughput_tok_s: {direction: higher, threshold: 0.90, test: bootstrap_median_ci}\n")
    base = synth_run(tmp_path / "base", 0)
    slow = synth_run(tmp_path / "slow", 1, factors={"hf": 1.3})
    noisy = synth_run(tmp_path / "noisy", 2)
    assert gate("--baseline", base, "--current", slow, "--policy", policy).exit_code == 1
    assert set(verdicts(slow).values()) == {"regression"}
    row = json.loads((slow / "gate.json").read_text())["rows"][0]
    assert row["ci_current"][0] > 1.1 * row["ci_baseline"][1]  # the CIs the verdict rests on are in the report
    assert gate("--baseline", base, "--current", noisy, "--policy", policy).exit_code == 0


def test_beyond_threshold_but_not_significant_is_inconclusive():
    """A single outlier-driven shift with few samples must not fail the build by default."""
    rule = load_policy(None).metrics["e2el_ms"]
    base = np.array([100.0, 140, 90, 160, 110, 95, 150, 105, 130, 120])
    cur = base * 1.15
    out = judge(rule, base, cur[::-1], None, None, load_policy(None).bootstrap)
    assert out["ratio"] == pytest.approx(1.15)
    assert out["verdict"] == "inconclusive" and "not significantly" in out["note"]


def test_cis_that_do_not_overlap_are_never_called_not_significant():
    """The medians' CIs are apart (worse than the baseline beyond noise) but the change is not significantly beyond
    the 10% tolerated: inconclusive, and the note says which of the two fell short."""
    policy = load_policy(None)
    rng = np.random.default_rng(0)
    base, cur = np.round(100 * rng.lognormal(0, 0.02, 12), 1), np.round(114 * rng.lognormal(0, 0.08, 12), 1)
    out = judge(policy.metrics["e2el_ms"], base, cur, None, None, policy.bootstrap)
    assert out["ci_current"][0] > out["ci_baseline"][1] and out["verdict"] == "inconclusive"
    assert "worse than the baseline beyond noise (their CIs do not overlap)" in out["note"]
    assert "not significantly beyond the 10% the policy tolerates" in out["note"]
    assert not out["note"].endswith("but not significantly")  # what it said before, of CIs apart


def test_a_change_at_the_threshold_fails_at_most_about_alpha_of_the_time():
    """The test is against threshold × baseline: a tolerated 10% slowdown with many samples must not fail builds
    (testing against the baseline alone would call it significant every time, and fail whenever noise pushed the
    median ratio past 1.10), while a 30% one always does."""
    policy = load_policy(None)
    rule = policy.metrics["e2el_ms"]

    def regressions(true_ratio: float) -> int:
        count = 0
        for seed in range(40):
            rng = np.random.default_rng(seed)
            base, cur = 100 * rng.lognormal(0, 0.1, 80), 100 * true_ratio * rng.lognormal(0, 0.1, 80)
            count += judge(rule, base, cur, None, None, policy.bootstrap)["verdict"] == "regression"
        return count

    assert regressions(1.10) <= 4  # alpha = 0.05 of 40 is 2
    assert regressions(1.30) == 40


# ---- reference-normalized mode ------------------------------------------------------------------------------------

def test_reference_catches_regression_of_other_backend(tmp_path):
    base = synth_run(tmp_path / "base", 0, backends=("hf", "own"))
    cur = synth_run(tmp_path / "cur", 1, backends=("hf", "own"), factors={"own": 1.2})
    result = gate("--baseline", base, "--current", cur, "--reference", "hf")
    assert result.exit_code == 1, result.output
    v = verdicts(cur)
    assert all(v[("tiny__own__short", m)] == "regression" for m in LATENCIES), v
    assert not any(cell == "tiny__hf__short" for cell, _ in v)  # the yardstick is not judged by itself
    assert "tiny__hf__short: the reference backend, not gated against itself" in result.output


def test_reference_only_run_has_nothing_to_gate(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    cur = synth_run(tmp_path / "cur", 1)
    result = gate("--baseline", base, "--current", cur, "--reference", "hf")
    assert result.exit_code == 2 and "nothing to compare" in result.output


def test_reference_absorbs_uniform_machine_slowdown(tmp_path):
    base = synth_run(tmp_path / "base", 0, backends=("hf", "own"))
    cur = synth_run(tmp_path / "cur", 1, backends=("hf", "own"), factors={"hf": 1.3, "own": 1.3})
    # Raw numbers: a 30% slower machine looks like a regression of every backend...
    assert gate("--baseline", base, "--current", cur, "--out", tmp_path / "raw").exit_code == 1
    # ...normalized by hf measured on the same machine, it is not.
    policy = tmp_path / "ref.yaml"
    policy.write_text((ROOT / "harness/analyze/gate_policy.yaml").read_text().replace("reference: null", "reference: hf"))
    result = gate("--baseline", base, "--current", cur, "--policy", policy)
    assert result.exit_code == 0, result.output
    assert "regression" not in verdicts(cur).values()
    rows = json.loads((cur / "gate.json").read_text())["rows"]
    assert all(abs(r["ratio"] - 1) < 0.1 for r in rows)


def test_reference_missing_from_run_is_a_usage_error(tmp_path):
    base = synth_run(tmp_path / "base", 0, backends=("own",))
    cur = synth_run(tmp_path / "cur", 1, backends=("own",))
    result = gate("--baseline", base, "--current", cur, "--reference", "hf")
    assert result.exit_code == 2
    assert "reference backend 'hf' is not in the baseline run" in result.output


# ---- environment guard --------------------------------------------------------------------------------------------

def test_different_gpu_and_engine_exit_2_listing_differences(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    env = copy.deepcopy(ENV)
    env["gpu"]["devices"][0]["name"] = "NVIDIA A100-SXM4-40GB"
    env["gpu"]["cuda_driver"] = "12.6"
    env["packages"]["transformers"] = "5.23.4"  # a patch release: not a difference at major.minor
    cur = synth_run(tmp_path / "cur", 1, env=env)
    edit_results(cur, lambda d: d["cells"][0]["engine"].update(version="2.0"))
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "different environments" in out
    assert "gpu.devices: ['NVIDIA H100 80GB HBM3'] (baseline) vs ['NVIDIA A100-SXM4-40GB'] (current)" in out
    assert "gpu.cuda_driver: '12.4' (baseline) vs '12.6' (current)" in out
    assert "engine.hf.version: '1.0' (baseline) vs '2.0' (current)" in out
    assert "transformers" not in out
    assert "--allow-env-change" in out
    assert not (cur / "gate.json").exists()

    result = gate("--baseline", base, "--current", cur, "--allow-env-change")
    assert result.exit_code == 0, result.output
    assert "warning: environment changed: gpu.devices" in " ".join(result.output.split())
    assert len(json.loads((cur / "gate.json").read_text())["environment_differences"]) == 3


def test_a_policy_says_which_differences_refuse_warn_or_pass(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    env = copy.deepcopy(ENV)
    env["gpu"]["driver"] = "555"
    env["packages"]["torch"] = "2.14.1"
    cur = synth_run(tmp_path / "cur", 1, env=env)
    assert gate("--baseline", base, "--current", cur).exit_code == 2
    policy = tmp_path / "p.yaml"
    policy.write_text((ROOT / "harness/analyze/gate_policy.yaml").read_text().replace(
        "on_difference: {}", "on_difference: {gpu.driver: pass, 'packages.*': warn}"))
    result = gate("--baseline", base, "--current", cur, "--policy", policy)
    assert result.exit_code == 0, result.output
    diffs = json.loads((cur / "gate.json").read_text())["environment_differences"]
    assert diffs == ["packages.torch: '2.13.0' (baseline) vs '2.14.1' (current)"]  # the driver passes silently
    # Versions compared exactly: a patch release refuses too.
    env["gpu"]["driver"], env["packages"]["torch"] = "550", "2.13.1"
    exact = synth_run(tmp_path / "exact", 2, env=env)
    assert gate("--baseline", base, "--current", exact).exit_code == 0
    policy.write_text((ROOT / "harness/analyze/gate_policy.yaml").read_text().replace(
        "versions: major.minor", "versions: exact"))
    result = gate("--baseline", base, "--current", exact, "--policy", policy)
    assert result.exit_code == 2 and "packages.torch: '2.13.0' (baseline) vs '2.13.1' (current)" in result.output


def test_launched_server_settings_that_say_where_or_when_are_not_differences():
    """A launched server's port, files under --out, PIDs, times and patch versions change from run to run; a
    setting that changes speed does not get lost among them."""
    from harness.analyze.gate import Policy, environment_differences

    def engine(port: int, out: str, **change):
        return {"engine": "llama.cpp", "llama_cpp_python": "0.3.36", "mode": "server", "n_ctx": 2048,
                "url": f"http://127.0.0.1:{port}/v1", "served_model": "tiny", "gguf": f"/home/u/.cache/{out}/t.gguf",
                "server_pid": 4242 + port, "started_at": "2026-01-01T00:00:00+00:00",
                "plan": f"weights on disk\noffload dir {out}/cells/x/offload: 32.00 MiB written\nbatch 4",
                "engine_args": {"model": f"/{out}/m", "max_num_seqs": 4, "log_file": f"{out}/x.log"},
                "env": {"VLLM_CACHE_ROOT": f"/tmp/{out}", "VLLM_CPU_KVCACHE_SPACE": "1"}, **change}

    class FakeRun:
        def __init__(self, cell_engine):
            self.result = type("R", (), {"environment": ENV})()
            self.cells = {("tiny", "srv", "w"): CellResult(id="c", model="tiny", backend="srv", workload="w",
                                                           status="ok", engine=cell_engine)}

    key = [("tiny", "srv", "w")]
    a = FakeRun(engine(40001, "results/run-a"))
    assert environment_differences(a, FakeRun(engine(51234, "results/run-b", llama_cpp_python="0.3.39")), key,
                                   Policy(metrics={"ttft_ms": {"direction": "lower", "threshold": 1.1}})) == []
    policy = Policy(metrics={"ttft_ms": {"direction": "lower", "threshold": 1.1}})
    changed = FakeRun(engine(51234, "results/run-b", n_ctx=4096, plan="weights on device\nbatch 4",
                             env={"VLLM_CACHE_ROOT": "/x", "VLLM_CPU_KVCACHE_SPACE": "4"}))
    diffs = {d.name: d.action for d in environment_differences(a, changed, key, policy)}
    assert diffs == {"engine.srv.n_ctx": "refuse", "engine.srv.plan": "refuse",
                     "engine.srv.env.VLLM_CPU_KVCACHE_SPACE": "refuse"}
    minor = FakeRun(engine(1, "r", llama_cpp_python="0.4.0"))
    assert [d.name for d in environment_differences(a, minor, key, policy)] == ["engine.srv.llama_cpp_python"]


def test_committed_ci_baseline_is_comparable_with_a_fresh_install(tmp_path):
    """results/baselines/ci-gate against a run on this machine's install (other patch releases, another --out):
    the guard finds nothing that refuses, without --allow-env-change."""
    from harness.analyze.gate import environment_differences, load_policy
    from harness.measure import environment

    base = ROOT / "results/baselines/ci-gate"
    cur = tmp_path / "cur"
    shutil.copytree(base, cur)

    def fresh(d):
        d["environment"] = environment.collect() | {"cpu": d["environment"]["cpu"], "gpu": d["environment"]["gpu"]}
        for c in d["cells"]:
            if "plan" in c["engine"]:
                c["engine"]["plan"] = c["engine"]["plan"].replace("results/ci-gate", str(tmp_path / "elsewhere"))
    edit_results(cur, fresh)
    policy = load_policy(ROOT / "scenarios/ci-gate-policy.yaml")
    b, c = GateRun(base), GateRun(cur)
    refused = [str(d) for d in environment_differences(b, c, list(c.cells), policy) if d.action == "refuse"]
    assert refused == []


def test_cpu_change_blocks_raw_mode_but_is_a_warning_with_reference(tmp_path):
    base = synth_run(tmp_path / "base", 0, backends=("hf", "own"))
    env = copy.deepcopy(ENV)
    env["cpu"]["model"] = "Other CPU 1000"
    cur = synth_run(tmp_path / "cur", 1, backends=("hf", "own"), env=env, factors={"hf": 1.4, "own": 1.4})
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 2 and "cpu.model" in result.output
    result = gate("--baseline", base, "--current", cur, "--reference", "hf")
    assert result.exit_code == 0, result.output
    assert "warning: environment changed: cpu.model" in " ".join(result.output.split())


def test_same_cpu_name_with_another_instruction_set_is_another_machine(tmp_path):
    """Two CPUs sold under one name can differ in their extensions (bf16, AMX), and our engine's planner computes
    in another dtype on each: the guard sees the difference; a baseline from before `isa` was recorded only warns."""
    env = copy.deepcopy(ENV)
    env["cpu"]["isa"] = ["avx", "avx2", "fma"]
    base = synth_run(tmp_path / "base", 0, backends=("hf", "own"), env=env)
    env = copy.deepcopy(env)
    env["cpu"]["isa"] = ["avx", "avx2", "fma", "avx512f", "avx512_bf16"]
    cur = synth_run(tmp_path / "cur", 1, backends=("hf", "own"), env=env)
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 2 and "cpu.isa" in result.output
    old = synth_run(tmp_path / "old", 2, backends=("hf", "own"))  # ENV: no isa recorded
    result = gate("--baseline", old, "--current", cur)
    assert result.exit_code == 0, result.output
    assert "warning: environment changed: cpu.isa" in " ".join(result.output.split())


def test_no_matching_cells_exit_2(tmp_path):
    base = synth_run(tmp_path / "base", 0, backends=("hf",))
    cur = synth_run(tmp_path / "cur", 1, backends=("own",))
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 2
    assert "no matching cells" in result.output and "tiny__hf__short" in result.output


def test_cells_in_one_run_only_are_noted(tmp_path):
    base = synth_run(tmp_path / "base", 0, backends=("hf", "own"))
    cur = synth_run(tmp_path / "cur", 1, backends=("hf",))
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 0
    assert "tiny__own__short: in the baseline only, not compared" in result.output


def test_failed_current_cell_is_a_regression(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    cur = synth_run(tmp_path / "cur", 1)
    edit_results(cur, lambda d: d["cells"][0].update(status="failed", error="KeyError: [red]boom[/red]\nmore"))
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 1
    assert verdicts(cur) == {("tiny__hf__short", "status"): "regression"}
    assert "KeyError: [red]boom[/red]" in result.output  # printed as text, not as rich markup
    # and inert in the markdown: brackets escaped
    assert "ok in the baseline, failed now: KeyError: \\[red\\]boom\\[/red\\] |" in (cur / "gate.md").read_text()


def test_missing_requests_file_exit_2(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    cur = synth_run(tmp_path / "cur", 1)
    (base / "cells/tiny__hf__short/requests.jsonl").unlink()
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 2
    assert "requests.jsonl: missing" in result.output


# ---- samples and policy -------------------------------------------------------------------------------------------

def test_too_few_samples_is_inconclusive(tmp_path):
    base = synth_run(tmp_path / "base", 0, n_requests=3, repetitions=2)
    cur = synth_run(tmp_path / "cur", 1, n_requests=3, repetitions=2, factors={"hf": 1.5})
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 0, result.output  # the default policy: inconclusive passes
    assert set(verdicts(cur).values()) == {"inconclusive"}
    rows = json.loads((cur / "gate.json").read_text())["rows"]
    assert {r["note"] for r in rows} == {"6 sample(s) < min_samples 10", "2 sample(s) < min_samples 4"}

    strict = tmp_path / "strict.yaml"
    strict.write_text((ROOT / "harness/analyze/gate_policy.yaml").read_text().replace("inconclusive: pass", "inconclusive: fail"))
    assert gate("--baseline", base, "--current", cur, "--policy", strict).exit_code == 1


def test_mann_whitney_with_unreachable_alpha_is_inconclusive(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("metrics:\n  output_throughput_tok_s: {direction: higher, threshold: 0.9, min_samples: 3}\n")
    base = synth_run(tmp_path / "base", 0, repetitions=3)
    cur = synth_run(tmp_path / "cur", 1, repetitions=3, factors={"hf": 2.0})
    assert gate("--baseline", base, "--current", cur, "--policy", policy).exit_code == 0
    row = json.loads((cur / "gate.json").read_text())["rows"][0]
    assert row["verdict"] == "inconclusive" and "smallest attainable p is 0.05" in row["note"]


@pytest.mark.parametrize("text, expected", [
    ("metrics:\n  ttft_ms: {direction: lower, treshold: 1.1}\n", "metrics.ttft_ms.treshold: unknown key"),
    ("metrics:\n  ttft_ms: {direction: lower, threshold: 0.9}\n", "metrics.ttft_ms: with direction lower"),
    ("metrics:\n  ttft_ms: {direction: faster, threshold: 1.1}\n", "metrics.ttft_ms.direction: Input should be"),
    ("metrics:\n  itl_ms: {direction: lower, threshold: 1.1, samples: per_request}\n", "metrics: 'itl_ms' has no per-request"),
    ("metrics:\n  latency: {direction: lower, threshold: 1.1}\n", "metrics: unknown metric 'latency'"),
    ("inconclusive: maybe\nmetrics: {}\n", "inconclusive: Input should be 'pass' or 'fail'"),
    ("on_unstable: rerun 0\nmetrics: {}\n", "on_unstable: String should match pattern"),
    ("- just a list\n", "expected a mapping with `metrics`"),
    ("metrics: [\n", "not valid YAML"),
])
def test_bad_policy_exit_2_naming_file_and_field(tmp_path, text, expected):
    base = synth_run(tmp_path / "base", 0, n_requests=2, repetitions=1)
    policy = tmp_path / "gate.yaml"
    policy.write_text(text)
    result = gate("--baseline", base, "--current", base, "--policy", policy)
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert str(policy) in out and expected in out, out


def test_packaged_policy_is_valid_and_gates_the_documented_metrics():
    policy = load_policy(None)
    assert list(policy.metrics) == ["ttft_ms", "tpot_ms", "e2el_ms", "output_throughput_tok_s", "request_throughput_rps"]
    assert (policy.on_unstable, policy.reruns, policy.busy_cpu_percent) == ("inconclusive", 0, 25)
    assert load_policy(ROOT / "scenarios/ci-gate-policy.yaml").reruns == 2  # CI runs a busy cell again, twice
    assert policy.metrics["ttft_ms"].samples == "per_request"
    assert policy.metrics["output_throughput_tok_s"].samples == "per_repetition"


def test_per_request_samples_come_from_request_records(tmp_path):
    run_dir = synth_run(tmp_path / "run", 0, n_requests=4, repetitions=2)
    run = GateRun(run_dir)
    cell = run.result.cells[0]
    policy = load_policy(None)
    ttft = run.samples(cell, "ttft_ms", policy.metrics["ttft_ms"])
    lines = (run_dir / cell.requests_file).read_text().splitlines()
    expected = [(r["chunk_times"][0] - r["t_send"]) * 1e3 for r in map(json.loads, lines)]
    assert ttft.tolist() == pytest.approx(expected)
    thr = run.samples(cell, "output_throughput_tok_s", policy.metrics["output_throughput_tok_s"])
    assert thr.tolist() == [rep.value("output_throughput_tok_s") for rep in cell.repetitions]


# ---- baselines ----------------------------------------------------------------------------------------------------

def test_baseline_update_then_gate(tmp_path):
    src = synth_run(tmp_path / "run", 0)
    store = tmp_path / "baselines"
    result = CliRunner().invoke(app, ["baseline", "update", str(src), "--name", "ci", "--dir", str(store)])
    assert result.exit_code == 0, result.output
    baseline = store / "ci"
    meta = json.loads((baseline / "baseline.json").read_text())
    assert meta["name"] == "ci" and meta["source"] == str(src.resolve()) and meta["cells"] == ["tiny__hf__short"]
    assert (baseline / "cells/tiny__hf__short/requests.jsonl").read_bytes() == \
        (src / "cells/tiny__hf__short/requests.jsonl").read_bytes()
    shutil.rmtree(src)  # self-contained: the source run is no longer needed

    ok = synth_run(tmp_path / "ok", 1)
    result = gate("--baseline", baseline, "--current", ok)
    assert result.exit_code == 0, result.output
    assert "baseline 'ci' stored" in result.output
    slow = synth_run(tmp_path / "slow", 2, factors={"hf": 1.2})
    assert gate("--baseline", baseline, "--current", slow).exit_code == 1

    # A baseline is every build's yardstick: updating it with the defaults is refused, naming the one there.
    refused = CliRunner().invoke(app, ["baseline", "update", str(slow / "results.json"), "--name", "ci",
                                       "--dir", str(store)])
    assert refused.exit_code == 2 and "--force" in refused.output, refused.output
    assert f"baseline {store / 'ci'} exists (stored {meta['stored']}" in " ".join(refused.output.split())
    assert json.loads((baseline / "baseline.json").read_text()) == meta  # untouched
    # With --force it replaces the baseline: the slow run is now the yardstick, and the old one is gone.
    assert CliRunner().invoke(app, ["baseline", "update", str(slow / "results.json"), "--name", "ci",
                                    "--dir", str(store), "--force"]).exit_code == 0
    assert sorted(p.name for p in store.iterdir()) == ["ci"]
    assert gate("--baseline", baseline, "--current", slow, "--out", tmp_path / "g").exit_code == 0
    assert all(r["ratio"] == 1 for r in json.loads((tmp_path / "g/gate.json").read_text())["rows"])


def test_baseline_update_rejects_bad_name_and_missing_requests(tmp_path):
    src = synth_run(tmp_path / "run", 0, n_requests=2, repetitions=1)
    bad = CliRunner().invoke(app, ["baseline", "update", str(src), "--name", "../x", "--dir", str(tmp_path / "b")])
    assert bad.exit_code == 2 and "--name" in bad.output
    (src / "cells/tiny__hf__short/requests.jsonl").unlink()
    missing = CliRunner().invoke(app, ["baseline", "update", str(src), "--dir", str(tmp_path / "b")])
    assert missing.exit_code == 2 and "requests.jsonl: missing" in missing.output
    assert not (tmp_path / "b" / "synthetic").exists()


# ---- a real run -------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_real_ci_gate_run_passes_against_itself(tmp_path, tiny_model):
    """scenarios/ci-gate.yaml through `bench run`, stored as a baseline, gated against itself: every ratio is 1."""
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(ROOT / "scenarios/ci-gate.yaml"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert CliRunner().invoke(app, ["baseline", "update", str(out), "--dir", str(tmp_path / "b")]).exit_code == 0
    result = gate("--baseline", tmp_path / "b/ci-gate", "--current", out)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "gate.json").read_text())["rows"]
    assert {r["metric"] for r in rows} == {"ttft_ms", "tpot_ms", "e2el_ms", "output_throughput_tok_s",
                                           "request_throughput_rps"}
    assert all(r["ratio"] == 1 and r["verdict"] == "pass" and r["n_current"] >= 5 for r in rows)


# ---- launched servers, measured ---------------------------------------------------------------------------------

def test_gate_passes_the_same_launched_server_scenario_and_fails_a_30pct_slowdown(write_scenario, tiny_model,
                                                                                    tmp_path):
    """Two runs of one scenario whose backend launches a server (a random port, logs under --out) into different
    folders compare without --allow-env-change and pass; the same engine 30% slower fails."""
    from harness.config.load import load_scenario
    from harness.run.runner import Runner
    from tests.conftest import scenario_dict

    def run_with(out: Path, slower: float = 1.0) -> Path:
        b = {"name": "srv", "kind": "scripted",
             "options": {"server": True, "ttft_s": 0.05 * slower, "itl_s": 0.01 * slower}}
        workloads = [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 12, "warmup_requests": 1}]
        path = write_scenario(scenario_dict(tiny_model, [b], workloads, repetitions=3), name=f"{out.name}.yaml")
        assert Runner(load_scenario(path), str(path), out, in_process=True, write_report=False).run() == 0
        return out

    first, second = run_with(tmp_path / "first"), run_with(tmp_path / "second")
    urls = [GateRun(r).result.cells[0].engine.url for r in (first, second)]
    assert urls[0] != urls[1]  # a port of its own each time: not an environment difference
    result = gate("--baseline", first, "--current", second)
    assert result.exit_code == 0, result.output
    assert "regression" not in verdicts(second).values()
    assert json.loads((second / "gate.json").read_text())["environment_differences"] == []

    slow = run_with(tmp_path / "slow", slower=1.3)
    result = gate("--baseline", first, "--current", slow)
    assert result.exit_code == 1, result.output
    v = verdicts(slow)
    assert all(v[("tiny__srv__w", m)] == "regression" for m in LATENCIES), v
    md = (slow / "gate.md").read_text()
    assert "| cell | metric | baseline (CI) | current (CI) | change | threshold | p | verdict | note |" in md
    row = next(line for line in md.splitlines() if "| ttft_ms |" in line)
    assert "+30" in row or "+29" in row or "+31" in row, row  # the change, in percent
    assert re.search(r"\| \d+(\.\d+)? \\\[\d", row), row  # a median with its CI


def test_an_unstable_cell_is_flagged_in_the_gate(tmp_path):
    base = synth_run(tmp_path / "base", 0)
    cur = synth_run(tmp_path / "cur", 1)
    reason = "repetitions disagree beyond max_repetition_cv 0.25: TTFT p50 12.0 / 120.0 ms (CV 0.82)"
    edit_results(cur, lambda d: d["cells"][0].update(unstable=reason))
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 0, result.output
    rows = json.loads((cur / "gate.json").read_text())["rows"]
    assert all(r["note"].endswith("unstable in the current") for r in rows)
    assert f"tiny__hf__short is unstable in the current run: {reason}" in " ".join(result.output.split())
    assert "unstable in the current run" in (cur / "gate.md").read_text()


def busy(data: dict, cell: int, other_cpu: float) -> None:
    """Mark a cell of results.json unstable, with other processes using other_cpu% of a core in its last repetition
    (as the runner records it: the resource monitor's measure, and its note)."""
    c = data["cells"][cell]
    c["unstable"] = (f"repetitions disagree beyond max_repetition_cv 0.25: TTFT p50 6.7 / 14.7 / 95.0 ms (CV 1.1); "
                     f"meanwhile other processes on the machine used {other_cpu:.0f}% of a core on average")
    c["resources"] = {"whole": {"other_cpu_percent": other_cpu / 2},
                      "repetitions": [{"other_cpu_percent": 2.0}, {"other_cpu_percent": other_cpu}]}


def test_a_busy_machine_is_not_a_regression(tmp_path):
    """ci-gate under one busy core: own 3x slower and unstable while other processes used 89% of a core. The gate
    says the machine was busy, judges none of own's metrics, and the build goes as on_unstable says; the same
    slowdown on a quiet machine is a regression."""
    base = synth_run(tmp_path / "base", 0, backends=("hf", "own"))
    cur = synth_run(tmp_path / "cur", 1, backends=("hf", "own"), factors={"own": 3.0})
    edit_results(cur, lambda d: busy(d, 1, 89.0))
    result = gate("--baseline", base, "--current", cur, "--reference", "hf")
    out = " ".join(result.output.split())
    assert result.exit_code == 0, result.output  # on_unstable: inconclusive, and inconclusive: pass
    assert "the machine was busy, not a regression: tiny__own__short not judged" in out and "FAIL" not in out
    rows = json.loads((cur / "gate.json").read_text())["rows"]
    assert {r["verdict"] for r in rows} == {"busy"}
    assert all("up to 89% of a core" in r["note"] for r in rows)
    strict = tmp_path / "strict.yaml"
    strict.write_text((ROOT / "harness/analyze/gate_policy.yaml").read_text().replace("on_unstable: inconclusive",
                                                                                      "on_unstable: fail"))
    result = gate("--baseline", base, "--current", cur, "--reference", "hf", "--policy", strict)
    assert result.exit_code == 1 and "the machine was busy" in result.output and "regression" not in \
        json.loads((cur / "gate.json").read_text())["rows"][0]["verdict"]
    # Unstable on a quiet machine: the code, not the machine.
    edit_results(cur, lambda d: busy(d, 1, 3.0))
    result = gate("--baseline", base, "--current", cur, "--reference", "hf")
    assert result.exit_code == 1 and "gate FAIL" in result.output


def test_on_unstable_rerun_runs_the_busy_cell_again_and_judges_that(write_scenario, tiny_model, tmp_path):
    """on_unstable: rerun 1 — the gate runs the busy cell again (bench run --rerun, the other cells untouched) and
    judges the new run."""
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    backends = [{"name": "a", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}},
                {"name": "b", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}}]
    path = write_scenario(scenario_dict(tiny_model, backends, [
        {"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 12, "warmup_requests": 1}]))
    base, cur = tmp_path / "base", tmp_path / "cur"
    for out in (base, cur):
        assert Runner(load_scenario(path), str(path), out, in_process=True, write_report=False).run() == 0
    edit_results(cur, lambda d: busy(d, 0, 95.0))
    untouched = json.loads((cur / "results.json").read_text())["cells"][1]
    policy = tmp_path / "policy.yaml"
    policy.write_text("on_unstable: rerun 1\nmetrics: {ttft_ms: {direction: lower, threshold: 1.5}}\n")
    result = gate("--baseline", base, "--current", cur, "--policy", policy)
    assert result.exit_code == 0, result.output
    after = json.loads((cur / "results.json").read_text())["cells"]
    assert after[0]["unstable"] is None and "max_rss_bytes" in after[0]["resources"]["whole"]  # measured anew
    assert after[1] == untouched  # only the busy cell ran again
    gate_json = json.loads((cur / "gate.json").read_text())
    assert {r["verdict"] for r in gate_json["rows"]} <= {"pass", "improvement", "inconclusive"}
    assert any(n.startswith(f"on_unstable rerun 1: re-ran {after[0]['id']} (re-run 1 of 1)")
               for n in gate_json["notes"]), gate_json["notes"]


def test_ci_gates_without_allow_env_change():
    for path in (ROOT / ".ci/run", ROOT / ".github/workflows/perf-gate.yml"):
        commands = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        text = "\n".join(commands)
        assert "bench gate" in text and "--allow-env-change" not in text, path
        assert "ci-gate-policy.yaml" in text or "$POLICY" in text, path


def test_a_client_that_fell_behind_is_judged_from_the_schedule(tmp_path):
    """The engine answered as fast as in the baseline, but the client sent every request 30 ms late: from the send
    nothing changed; from the scheduled send (the client's own queue, as its users waited) TTFT and E2E latency
    regressed, and a cell whose latencies moved beyond noise that way is judged on those."""
    base = synth_run(tmp_path / "base", 0)
    cur = synth_run(tmp_path / "cur", 0)
    requests = cur / "cells/tiny__hf__short/requests.jsonl"
    late = [json.loads(line) | {"t_scheduled": json.loads(line)["t_send"] - 0.030}
            for line in requests.read_text().splitlines()]
    requests.write_text("".join(json.dumps(r) + "\n" for r in late))
    assert gate("--baseline", base, "--current", cur).exit_code == 0  # from the send: the same
    shift = "TTFT from the schedule p50 42.0 ms is outside the 95% CI of TTFT p50 from the send [11.8, 12.3] ms"
    edit_results(cur, lambda d: d["cells"][0].update(client_queue_shift=[shift]))
    result = gate("--baseline", base, "--current", cur)
    assert result.exit_code == 1, result.output
    rows = {r["metric"]: r for r in json.loads((cur / "gate.json").read_text())["rows"]}
    for metric in ("ttft_ms", "e2el_ms"):
        assert rows[metric]["verdict"] == "regression"
        assert f"judged as {metric.removesuffix('_ms')}_including_client_queue_ms" in rows[metric]["note"]
    assert rows["tpot_ms"]["verdict"] != "regression" and "judged as" not in (rows["tpot_ms"]["note"] or "")


def test_baseline_update_never_replaces_a_folder_that_is_not_a_baseline(tmp_path):
    """Issue 25: the harness deletes only what it created; a folder of the user's named like the baseline stays."""
    src = synth_run(tmp_path / "run", 0)
    theirs = tmp_path / "baselines" / "ci"
    theirs.mkdir(parents=True)
    (theirs / "notes.md").write_text("mine")
    result = CliRunner().invoke(app, ["baseline", "update", str(src), "--name", "ci", "--dir", str(tmp_path / "baselines")])
    assert result.exit_code == 2 and "is not a baseline" in result.output
    assert [p.name for p in theirs.iterdir()] == ["notes.md"]
