"""The `openai` backend against a real OpenAI-protocol server (`bench serve` with the transformers engine), and the
request body of the client it shares with the served engines."""

import json
import os
import signal
import subprocess
import sys

import pytest

from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import bench_serve, free_port, scenario_dict


@pytest.fixture(scope="module")
def server(tiny_model):
    with bench_serve(tiny_model, "transformers", "openai") as url:
        yield url + "/v1"


def cells_of(path, out):
    code = Runner(load_scenario(path), str(path), out, write_report=False).run()
    return code, {c["backend"]: c for c in json.loads((out / "results.json").read_text())["cells"]}


def test_completions_and_chat_streams_give_full_metrics_and_hf_tokens(server, tiny_model, write_scenario, tmp_path):
    backends = [
        {"name": "hf", "kind": "transformers"},
        {"name": "remote", "kind": "openai", "url": server},
        {"name": "chat", "kind": "openai", "url": server, "api": "chat"},
        {"name": "no-usage", "kind": "openai", "url": server,
         "options": {"extra_body": {"stream_options": {"include_usage": False}}}},
    ]
    wl = [{"name": "w", "input_tokens": 24, "output_tokens": 16, "num_requests": 3,
           "load": {"type": "concurrency", "concurrency": 2}}]
    path = write_scenario(scenario_dict(tiny_model, backends, wl, record_outputs=True))
    code, cells = cells_of(path, tmp_path / "out")
    assert code == 0, {k: c["error"] for k, c in cells.items()}
    for name, c in cells.items():
        m = c["metrics"]
        assert m["completed"] == 3 and m["total_output_tokens"] == 48, name
        # one gap per chunk after the first: tokens that arrive in one read are one chunk, so at most 15 a request
        assert m["ttft_ms"]["p50"] > 0 and m["tpot_ms"]["p50"] > 0 and 0 < m["itl_ms"]["count"] <= 3 * 15, name
    assert cells["remote"]["token_counts"] == {"input": ["server_usage"], "output": ["server_usage"],
                                               "exact_output_length": True}
    assert cells["no-usage"]["token_counts"]["output"] == ["stream_chunks"]
    assert cells["remote"]["metrics"]["total_input_tokens"] == 3 * 24  # the prompt is exact in the server's tokenizer
    assert cells["chat"]["metrics"]["total_input_tokens"] > 3 * 24  # the chat template adds its tokens

    def outputs(cell):
        lines = (tmp_path / "out" / cell["requests_file"]).read_text().splitlines()
        return {r["id"]: r["output_token_ids"] for r in map(json.loads, lines)}

    assert outputs(cells["remote"]) == outputs(cells["hf"])  # greedy over the wire equals greedy in process


def test_http_errors_fail_requests_with_the_servers_message(server, tiny_model, write_scenario, tmp_path):
    b = {"name": "bad", "kind": "openai", "url": server, "options": {"extra_body": {"max_tokens": "lots"}}}
    path = write_scenario(scenario_dict(tiny_model, [b]))
    code, cells = cells_of(path, tmp_path / "out")
    assert code == 1 and "HTTP 400" in cells["bad"]["error"] and "max_tokens" in cells["bad"]["error"]


def test_missing_api_key_variable_fails_the_cell(server, tiny_model, write_scenario, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMBENCH_TEST_KEY", raising=False)
    b = {"name": "keyed", "kind": "openai", "url": server, "options": {"api_key_env": "LLMBENCH_TEST_KEY"}}
    code, cells = cells_of(write_scenario(scenario_dict(tiny_model, [b])), tmp_path / "out")
    assert code == 1 and "LLMBENCH_TEST_KEY is not set" in cells["keyed"]["error"]


def test_client_body_adapted_by_the_engine_then_extra_body():
    from backends.base import Request
    from backends.openai_backend import OpenAIClient, OpenAIClientOptions

    def adapt(body, request):
        return body | {"top_k": 0, "prompt": request.prompt_token_ids}

    options = OpenAIClientOptions(extra_body={"top_k": 40})
    request = Request(0, "hi", [1, 2], max_tokens=8, temperature=0.5, seed=7)
    body = OpenAIClient(options, "completions", "m", exact_length=True, adapt=adapt).body(request)
    assert body == {"model": "m", "max_tokens": 8, "temperature": 0.5, "stream": True,
                    "stream_options": {"include_usage": True}, "seed": 7, "prompt": [1, 2], "ignore_eos": True,
                    "min_tokens": 8, "top_k": 40}
    chat = OpenAIClient(OpenAIClientOptions(), "chat", "m", exact_length=False).body(request)
    assert chat["messages"] == [{"role": "user", "content": "hi"}] and "ignore_eos" not in chat and "prompt" not in chat


@pytest.mark.slow
def test_bench_serve_says_where_it_listens_and_when_it_stopped(tiny_model):
    """The lines a user of `bench serve` waits for: listening on (once the engine is loaded and the port bound),
    and at SIGINT what it served, before it exits."""
    import httpx

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "serve", "--backend", "scripted", "--model",
                             str(tiny_model), "--port", str(port), "--option", "ttft_s=0.001"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        assert lines[0].startswith("loading the scripted engine on") and lines[1].startswith(
            f"listening on http://127.0.0.1:{port} (openai protocol; the scripted engine on {tiny_model.name})"), lines
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"prompt": "hi", "max_tokens": 3}, timeout=30)
        assert r.status_code == 200
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[0]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, rest  # interrupted, as every command says it
    assert "stopped: 1 request(s) served (0 failed), 3 tokens generated; the engine is unloaded" in rest

