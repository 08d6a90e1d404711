"""llama.cpp's own C++ llama-server (`mode: llama_server`): its slots from the load, the flags a scenario may add,
the request it is sent, skipped where it is not installed, and greedy tokens equal to in-process llama.cpp's."""

import json
import re
from pathlib import Path

import pytest

from backends.base import CellContext, ModelInfo, Request
from backends.llama_cpp.server import SDIST_VERSION, LlamaServerBackend, built_binary, find_binary
from backends.registry import get_backend_class
from harness.config.load import ScenarioError, load_scenario
from harness.core.spec import BackendSpec
from harness.run.runner import Runner
from tests.backends.test_llamacpp import beside_in_process
from tests.conftest import ROOT, scenario_dict

needs_server = pytest.mark.skipif(find_binary() is None, reason="llama-server is not built: "
                                                                "scripts/install-llama-server.sh")


def server(tmp_path, concurrency=None, **options) -> LlamaServerBackend:
    spec = BackendSpec(name="ls", kind="llama_cpp", options={"mode": "llama_server", **options})
    return LlamaServerBackend(spec, ModelInfo("tiny", tmp_path), CellContext(dir=tmp_path, seed=7,
                                                                            concurrency=concurrency))


def test_the_install_script_builds_the_version_the_backend_looks_for():
    script = (ROOT / "scripts" / "install-llama-server.sh").read_text()
    assert f"version={SDIST_VERSION}\n" in script and "-DGGML_NATIVE=OFF" in script
    assert "llama.cpp/$version" in script and built_binary().parent.parent.name == SDIST_VERSION
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in script  # nothing prebuilt is downloaded


def test_its_slots_are_the_loads_concurrency_and_it_listens_on_loopback_only(tmp_path):
    assert get_backend_class("llama_cpp", {"mode": "llama_server"}) is LlamaServerBackend
    assert LlamaServerBackend.capabilities.max_concurrency is None  # its slots batch: the harness queues nothing
    b = server(tmp_path, concurrency=4, n_ctx=512, server_args=["--cache-type-k", "q8_0", "--no-warmup"])
    b.binary, b.gguf_path = Path("/opt/llama-server"), tmp_path / "m.gguf"
    b.placement = {"n_gpu_layers": -1, "offload_kqv": True}
    argv = b.argv(8123)
    flag = lambda name: argv[argv.index(name) + 1]  # noqa: E731
    assert (flag("--host"), flag("--port"), flag("--parallel")) == ("127.0.0.1", "8123", "4")
    assert flag("--ctx-size") == str(512 * 4) and "--cont-batching" in argv  # n_ctx per slot
    assert argv[-3:] == ["--cache-type-k", "q8_0", "--no-warmup"] and argv.count("--host") == 1
    assert server(tmp_path, concurrency=None).parallel == 4  # an open loop: llama-server's own default
    assert server(tmp_path, concurrency=1).parallel == 1 and server(tmp_path, 4, parallel=2).parallel == 2


@pytest.mark.parametrize("args", [["--host", "0.0.0.0"], ["--port=80"], ["--hos", "0.0.0.0"], ["-m", "/x.gguf"],
                                  ["--api-key", "k"], ["--ctx-size", "9"], ["--threads", "1"], ["--log-file", "/x"],
                                  ["--no-warmup", "--host", "0.0.0.0"], ["--cache_ram", "0"]])
def test_extra_flags_pass_an_allowlist(tiny_model, write_scenario, args):
    """Where it listens, the model, files, secrets and what the options set are the harness's; a flag spelled
    another way (an abbreviation, underscores, which llama.cpp reads as dashes) is refused too."""
    b = {"name": "ls", "kind": "llama_cpp", "options": {"mode": "llama_server", "server_args": args}}
    with pytest.raises(ScenarioError, match=re.escape("backends[0].options.server_args")):
        load_scenario(write_scenario(scenario_dict(tiny_model, [b])))


def test_the_request_is_the_token_ids_with_ignore_eos_and_plain_sampling(tmp_path):
    b = server(tmp_path, extra_body={"top_k": 40})
    body = b.client.body(Request(0, "hi there", [1, 5, 9], max_tokens=8))
    assert body["prompt"] == [1, 5, 9] and body["ignore_eos"] is True and "min_tokens" not in body
    assert (body["temperature"], body["repeat_penalty"], body["top_p"], body["min_p"]) == (0.0, 1.0, 1.0, 0.0)
    assert body["top_k"] == 40  # extra_body has the last word
    assert "ignore_eos" not in b.client.body(Request(0, "hi", [1], max_tokens=8, ignore_eos=False))


def test_an_optional_server_that_is_not_installed_is_skipped_with_how_to_install_it(tiny_model, write_scenario,
                                                                                    tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    backends = [{"name": "ls", "kind": "llama_cpp", "optional": True, "options": {"mode": "llama_server"}},
                {"name": "ok", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    out = tmp_path / "out"
    # The skipped cell never runs, and the scripted one needs no process of its own.
    assert Runner(load_scenario(path), str(path), out, in_process=True, write_report=False).run() == 0
    cells = {c["backend"]: c for c in json.loads((out / "results.json").read_text())["cells"]}
    assert cells["ok"]["status"] == "ok" and cells["ls"]["status"] == "skipped"
    assert "llama-server is not installed" in cells["ls"]["error"]
    assert "scripts/install-llama-server.sh builds it" in cells["ls"]["error"]
    summary = (out / "summary.md").read_text()
    assert "## Skipped cells" in summary and "llama-server is not installed" in summary
    # Not optional: the same reason fails the cell.
    path = write_scenario(scenario_dict(tiny_model, [backends[0] | {"optional": False}]))
    assert Runner(load_scenario(path), str(path), tmp_path / "out2", write_report=False).run() == 1
    (cell,) = json.loads((tmp_path / "out2" / "results.json").read_text())["cells"]
    assert cell["status"] == "failed" and "llama-server is not installed" in cell["error"]


@needs_server
@pytest.mark.slow
def test_greedy_tokens_equal_in_process_llama_cpp_under_concurrent_slots(tiny_model, write_scenario, tmp_path):
    """The same GGUF in process and in llama-server with 2 slots at concurrency 2: every answer the same (greedy,
    exact lengths from ignore_eos), the input exactly the tokens sent, nothing queued by the harness, the prefix
    reuse it reports, and no process left behind."""
    out, data = beside_in_process(tiny_model, write_scenario, tmp_path, "ls", "llama_server")
    cells = {c["backend"]: c for c in data["cells"]}
    ls = cells["ls"]
    assert ls["concurrency_cap"] is None and ls["engine"]["parallel"] == 2 and ls["engine"]["version"] != "unknown"
    assert ls["metrics"]["total_input_tokens"] == 4 * 32 and ls["metrics"]["total_output_tokens"] == 4 * 16
    assert ls["token_counts"] == {"input": ["server_usage"], "output": ["server_usage"], "exact_output_length": True}
    assert ls["prefix_reuse"]["reused_tokens"] is not None and "cached_tokens" in ls["prefix_reuse"]["source"]
    assert cells["inproc"]["concurrency_cap"] == {"requested": 2, "max_concurrency": 1, "queue_in_latency": True}
    (agree,) = data["agreement"]
    assert agree["compared"] == 4 and agree["matching"] == 4, agree
    assert not (out / "cells" / ls["id"] / "process_groups.jsonl").exists()
