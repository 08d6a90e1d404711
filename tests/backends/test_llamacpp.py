"""llama.cpp: GGUF conversion against HF, both modes through `bench run`, server failures, each mode's options and
request body, and layer placement under a VRAM budget (the launcher itself: test_servers.py)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.processes import GROUPS_FILE
from backends.llama_cpp.gguf import GGUFLayout
from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import scenario_dict

try:
    import gguf  # noqa: F401
    import llama_cpp
except ImportError:
    llama_cpp = None
# Everything but the pure placement function needs the engine: pip install -e '.[llamacpp]'.
needs_llama = pytest.mark.skipif(llama_cpp is None, reason="llama-cpp-python and gguf are not installed")

MiB = 2**20


@pytest.fixture(scope="module")
def tiny_gguf(tiny_model, tmp_path_factory) -> Path:
    from backends.llama_cpp.gguf import convert

    return convert(tiny_model, tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf", "f32")


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def group_members(pgid: int) -> list[int]:
    """Live processes of a process group (zombies already count as gone)."""
    import psutil

    members = []
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(p.pid)
        except ProcessLookupError:
            pass
    return members


def servers_with(needle: str) -> list[int]:
    import psutil

    return [p.pid for p in psutil.process_iter(["cmdline", "status"])
            if "llama_cpp.server" in " ".join(p.info["cmdline"] or []) and needle in " ".join(p.info["cmdline"] or [])
            and p.info["status"] != psutil.STATUS_ZOMBIE]


def server_pid(log: Path) -> int:
    """uvicorn's "Started server process [PID]" line; the launcher makes that pid the group id."""
    line = next(line for line in log.read_text().splitlines() if "Started server process" in line)
    return int(line.rsplit("[", 1)[1].rstrip("]"))


# ---- conversion -----------------------------------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_f32_gguf_gives_hf_fp32_greedy_tokens(tiny_model, tiny_gguf):
    """Same weights, same prompt: llama.cpp on the converted f32 file decodes the 32 tokens HF fp32 decodes."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from backends.llama_cpp.gguf import read_layout

    ids = AutoTokenizer.from_pretrained(tiny_model).encode("the city of music and the world", add_special_tokens=True)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    with torch.inference_mode():
        out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                          max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=1)
    expected = out[0, len(ids):].tolist()

    llm = llama_cpp.Llama(model_path=str(tiny_gguf), n_ctx=256, verbose=False)
    try:
        assert llm.tokenize(b"the city of music and the world", add_bos=True, special=True) == ids
        stream = llm.generate(ids, temp=0.0, repeat_penalty=1.0)
        got = [next(stream) for _ in range(32)]
    finally:
        llm.close()
    assert got == expected
    layout = read_layout(tiny_gguf)
    assert layout.n_layers == 4 and layout.file_type == "f32" and layout.n_vocab == 4096
    assert layout.n_embd_k_gqa == 4 * 32  # 4 KV heads × head dim 32


@needs_llama
def test_cli_converts_and_rejects_bad_input(tiny_model, tmp_path):
    out = tmp_path / "m.gguf"
    cli = [sys.executable, "-m", "harness.cli", "models", "gguf"]
    ok = subprocess.run([*cli, str(tiny_model), str(out), "--type", "q8_0"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    from backends.llama_cpp.gguf import read_layout

    assert read_layout(out).file_type == "q8_0"
    bad_type = subprocess.run([*cli, str(tiny_model), str(out), "--type", "q9"], capture_output=True, text=True)
    assert bad_type.returncode == 2 and "--type" in bad_type.stderr and "Traceback" not in bad_type.stderr
    no_model = subprocess.run([*cli, str(tmp_path), str(out)], capture_output=True, text=True)
    assert no_model.returncode == 2 and "config.json" in no_model.stderr and "Traceback" not in no_model.stderr


@needs_llama
def test_converted_files_are_cached_by_source(tiny_model, tmp_path, monkeypatch):
    import shutil

    from backends.llama_cpp import gguf

    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    src = tmp_path / "model"
    shutil.copytree(tiny_model, src)
    first = gguf.cached_gguf(src, "f16")
    assert gguf.cached_gguf(src, "f16") == first and first.is_file()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"rms_norm_eps": 1e-6}))
    assert gguf.cached_gguf(src, "f16") != first  # a changed source is converted again


# ---- both modes through bench run -------------------------------------------------------------------------------------

def beside_in_process(tiny_model, write_scenario, tmp_path, name: str, mode: str) -> tuple[Path, dict]:
    """In-process llama.cpp ("inproc") and the same f32 GGUF in `mode`: 4 requests of 32 in, 16 out, 2 at once, the
    outputs recorded; every cell must end ok. The results folder and its results.json."""
    backends = [{"name": "inproc", "kind": "llama_cpp", "options": {"gguf_type": "f32"}},
                {"name": name, "kind": "llama_cpp", "options": {"mode": mode, "gguf_type": "f32"}}]
    workloads = [{"name": "w", "input_tokens": 32, "output_tokens": 16, "num_requests": 4, "warmup_requests": 1,
                  "load": {"type": "concurrency", "concurrency": 2}}]
    path = write_scenario(scenario_dict(tiny_model, backends, workloads, record_outputs=True))
    out = tmp_path / "out"
    assert Runner(load_scenario(path), str(path), out, write_report=False).run() == 0
    return out, results(out)


@needs_llama
@pytest.mark.slow
def test_both_modes_give_full_metrics(tiny_model, write_scenario, tmp_path):
    out, data = beside_in_process(tiny_model, write_scenario, tmp_path, "server", "server")
    cells = {c["backend"]: c for c in data["cells"]}
    for name, cell in cells.items():
        assert cell["status"] == "ok", cell["error"]
        m = cell["metrics"]
        assert m["completed"] == 4 and m["errors"] == 0
        assert m["total_input_tokens"] == 4 * 32 and m["total_output_tokens"] == 4 * 16
        for key in ("ttft_ms", "e2el_ms"):
            assert m[key]["count"] == 4 and m[key]["min"] > 0, (name, key, m[key])
        # A busy machine can hand a request's whole stream to one read: its tokens share a time, TPOT and ITL 0.
        assert m["tpot_ms"]["count"] == 4 and m["tpot_ms"]["min"] >= 0 and m["tpot_ms"]["mean"] > 0, m["tpot_ms"]
        assert m["itl_ms"]["count"] >= 4 and m["itl_ms"]["min"] >= 0
        assert m["e2el_ms"]["min"] >= m["ttft_ms"]["min"]
        assert m["output_throughput_tok_s"] > 0 and m["request_throughput_rps"] > 0
        assert m["total_token_throughput_tok_s"] > m["output_throughput_tok_s"]
        assert cell["token_counts"]["exact_output_length"] is True
        assert cell["engine"]["engine"] == "llama.cpp" and cell["engine"]["n_gpu_layers"] == -1
    assert cells["inproc"]["token_counts"]["input"] == ["engine"]
    assert cells["inproc"]["token_counts"]["output"] == ["engine"]
    assert cells["server"]["token_counts"]["input"] == ["client_tokenizer"]
    assert cells["server"]["token_counts"]["output"] == ["server_finish_reason"]
    assert cells["server"]["engine"]["exact_length"].startswith("logit_bias")
    # Greedy in both modes and the same file: the server's text must come from the same tokens; in-process we see ids.
    records = [json.loads(line) for line in (out / "cells" / cells["inproc"]["id"] / "requests.jsonl").open()]
    assert all(len(r["output_token_ids"]) == 16 for r in records)
    server_dir = out / "cells" / cells["server"]["id"]
    assert not (server_dir / GROUPS_FILE).exists()  # stopped cleanly: nothing left to clean up
    assert not group_members(server_pid(server_dir / "llama_server.log"))


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@needs_llama
def test_in_process_prefix_reuse_is_what_llama_cpp_kept_and_none_without_it(tiny_model, write_scenario, tmp_path):
    """A document asked two questions: with prefix_reuse llama.cpp keeps, for each request, the prefix its prompt
    shares with the one before (the second question: the document); without it, nothing. The server is not asked:
    it keeps the prefix too, and says nothing of it."""
    from harness.records import PROMPT_FILE, load_run

    backends = [{"name": "reuse", "kind": "llama_cpp", "options": {"gguf_type": "f32", "prefix_reuse": True}},
                {"name": "reset", "kind": "llama_cpp", "options": {"gguf_type": "f32"}}]
    workloads = [{"name": "doc", "prompts": {"type": "document", "kind": "contract", "questions_per_document": 2},
                  "input_tokens": 300, "output_tokens": 4, "num_requests": 2, "warmup_requests": 1}]
    path = write_scenario(scenario_dict(tiny_model, backends, workloads))
    out = tmp_path / "out"
    assert Runner(load_scenario(path), str(path), out).run() == 0
    cells = {c.backend: c for c in load_run(out).cells}
    (prompts,) = (out / "prompts").glob("*.json")
    ids = [e.token_ids for e in PROMPT_FILE.validate_json(prompts.read_bytes())]  # the warm-up, then two questions
    sent = sum(map(len, ids))
    # what each prompt shares with the one before: the BOS token, then the document and "Question:"
    shared = common_prefix(ids[0], ids[1]) + common_prefix(ids[1], ids[2])
    assert common_prefix(ids[1], ids[2]) > 250
    reuse, reset = cells["reuse"].prefix_reuse, cells["reset"].prefix_reuse
    assert (reuse.reused_tokens, reuse.prompt_tokens) == (shared, sent), reuse
    assert (reset.reused_tokens, reset.prompt_tokens) == (0, sent) and "prefix_reuse: false" in reset.source
    report = (out / "report.md").read_text()
    assert "## Prefix reuse" in report and f"| {shared:,} | {sent:,} |" in report


@needs_llama
@pytest.mark.slow
async def test_greedy_is_greedy_in_both_modes(tiny_model, tiny_gguf, tmp_path):
    """The server gets exactly the request body the backend builds: it must decode the in-process tokens, all 48 of
    them (the EOS bias in place), where its own defaults (temperature 0.8, repeat_penalty 1.1) would not."""
    from transformers import AutoTokenizer

    from backends.base import CellContext, ModelInfo, Request, TokenEvent
    from backends.llama_cpp.in_process import LlamaCppInProcessBackend
    from backends.llama_cpp.server import LlamaCppServerBackend
    from harness.core.spec import BackendSpec

    text = "the city of music and the world"
    request = Request(0, text, AutoTokenizer.from_pretrained(tiny_model).encode(text), max_tokens=48)
    model, ctx = ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path)
    local = LlamaCppInProcessBackend(BackendSpec(name="l", kind="llama_cpp", options={"gguf": str(tiny_gguf)}), model,
                                     ctx)
    await local.start()
    try:
        ids = [i for ev in [e async for e in local.generate(request)] if isinstance(ev, TokenEvent) for i in ev.token_ids]
        expected = local.llm.detokenize(ids).decode("utf-8", errors="ignore")
    finally:
        await local.stop()
    served = LlamaCppServerBackend(BackendSpec(name="s", kind="llama_cpp", options={"gguf": str(tiny_gguf)}), model,
                                   ctx)
    await served.start()
    try:
        body = served.client.body(request)
        assert body["temperature"] == 0 and body["repeat_penalty"] == 1.0 and "min_tokens" not in body
        assert set(body["logit_bias"]) == {"1", "4"}  # <|end_of_text|> and <|eot_id|>, found by llama.cpp
        r = await served.client.http.post(served.client.base_url + "/completions", json=body | {"stream": False})
        reply = r.json()
    finally:
        await served.stop()
    assert len(ids) == 48 and reply["usage"]["completion_tokens"] == 48
    assert reply["choices"][0]["text"] == expected


# ---- failures -----------------------------------------------------------------------------------------------------

@needs_llama
@pytest.mark.slow
def test_bad_model_files_fail_their_cells_with_the_log(tiny_model, write_scenario, tmp_path):
    """A GGUF that llama.cpp cannot load (5 layers declared, 4 present) makes the server die at start: the cell
    fails with the server's own words; a file that is not GGUF at all fails before anything starts."""
    import shutil

    from backends.llama_cpp.gguf import convert

    broken_src = tmp_path / "five-layers"
    shutil.copytree(tiny_model, broken_src)
    config = json.loads((broken_src / "config.json").read_text())
    (broken_src / "config.json").write_text(json.dumps(config | {"num_hidden_layers": 5}))
    broken = convert(broken_src, tmp_path / "broken.gguf", "f32")
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file" * 100)
    backends = [{"name": "dies", "kind": "llama_cpp", "options": {"mode": "server", "gguf": str(broken)}},
                {"name": "garbage", "kind": "llama_cpp", "options": {"gguf": str(garbage)}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    out = tmp_path / "out"
    assert Runner(load_scenario(path), str(path), out, write_report=False).run() == 1
    cells = {c["backend"]: c for c in results(out)["cells"]}
    dies = cells["dies"]
    assert dies["status"] == "failed"
    assert "llama_server did not start" in dies["error"] and "llama_server.log" in dies["error"]
    assert "blk.4" in dies["error"]  # llama.cpp's message about the missing layer, from the log tail
    assert cells["garbage"]["status"] == "failed" and "not a readable GGUF file" in cells["garbage"]["error"]
    assert not servers_with(str(broken))


@needs_llama
@pytest.mark.slow
def test_a_server_killed_mid_stream_fails_the_cell_and_leaves_nothing(tiny_model, tiny_gguf, write_scenario, tmp_path):
    backends = [{"name": "victim", "kind": "llama_cpp", "options": {"mode": "server", "gguf": str(tiny_gguf)}}]
    workloads = [{"name": "long", "input_tokens": 16, "output_tokens": 3000, "num_requests": 1, "warmup_requests": 0}]
    path = write_scenario(scenario_dict(tiny_model, backends, workloads))
    out = tmp_path / "out"
    cell_dir = out / "cells" / "tiny__victim__long"
    proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        log = cell_dir / "llama_server.log"
        while time.time() < deadline and not (log.exists() and "POST /v1/completions" in log.read_text(errors="replace")):
            time.sleep(0.05)
        assert log.exists(), "the server never received the request"
        time.sleep(0.3)  # well into the 3000-token stream
        groups = [json.loads(line) for line in (cell_dir / GROUPS_FILE).read_text().splitlines()]
        pgid = next(g["pgid"] for g in groups if g["name"] == "llama_server")
        os.killpg(pgid, signal.SIGKILL)
        assert proc.wait(timeout=120) == 1
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    cell = results(out)["cells"][0]
    assert cell["status"] == "failed"
    # Named as a dead server, not as its request's connection error.
    assert cell["error"].startswith("llama_server exited (SIGKILL) after 0 requests\n"), cell["error"]
    assert "llama_server.log" in cell["error"]
    assert not group_members(pgid)
    assert not (cell_dir / GROUPS_FILE).exists()


def test_url_needs_server_mode(tiny_model, write_scenario):
    from harness.config.load import ScenarioError

    b = {"name": "x", "kind": "llama_cpp", "url": "http://127.0.0.1:9/v1"}
    with pytest.raises(ScenarioError, match="options.mode: server"):
        load_scenario(write_scenario(scenario_dict(tiny_model, [b])))
    b = {"name": "x", "kind": "llama_cpp", "options": {"gguf_type": "q9"}}
    with pytest.raises(ScenarioError, match="gguf_type"):
        load_scenario(write_scenario(scenario_dict(tiny_model, [b])))


def test_mode_selects_the_variant_and_its_options(tiny_model, write_scenario):
    from backends.llama_cpp.in_process import LlamaCppInProcessBackend
    from backends.llama_cpp.server import LlamaCppServerBackend
    from backends.registry import get_backend_class
    from harness.config.load import ScenarioError

    assert get_backend_class("llama_cpp") is LlamaCppInProcessBackend
    assert get_backend_class("llama_cpp", {"mode": "in_process"}) is LlamaCppInProcessBackend
    assert get_backend_class("llama_cpp", {"mode": "server"}) is LlamaCppServerBackend
    server = {"name": "x", "kind": "llama_cpp", "options": {"mode": "server", "timeout_s": 5, "n_ctx": 256}}
    assert load_scenario(write_scenario(scenario_dict(tiny_model, [server]))).backends[0].options["timeout_s"] == 5
    for options, expected in (({"timeout_s": 5}, "backends[0].options.timeout_s: unknown key"),
                              ({"server_args": ["-v"]}, "backends[0].options.server_args: unknown key"),
                              ({"mode": "server", "prefix_reuse": True},
                               "backends[0].options.prefix_reuse: unknown key"),
                              ({"mode": "served"},
                               "backends[0].options.mode: expected in_process or server or llama_server")):
        b = {"name": "x", "kind": "llama_cpp", "options": options}
        with pytest.raises(ScenarioError, match=re.escape(expected)):
            load_scenario(write_scenario(scenario_dict(tiny_model, [b])))


def test_an_unknown_mode_is_a_clean_error(tiny_model, write_scenario):
    b = {"name": "x", "kind": "llama_cpp", "options": {"mode": ["server"]}}
    path = write_scenario(scenario_dict(tiny_model, [b]))
    r = subprocess.run([sys.executable, "-m", "harness.cli", "validate", str(path)], capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "backends[0].options.mode: expected in_process or server or llama_server" in " ".join(r.stderr.split())


def test_server_body_biases_eos_away_and_leaves_the_user_the_last_word(tiny_model, tmp_path):
    """What the server variant sends (no server needed): llama_cpp.server's fields, the EOS bias instead of
    ignore_eos/min_tokens when the end-of-generation ids are known, min_tokens when they are not; extra_body last."""
    from backends.base import CellContext, ModelInfo, Request
    from backends.llama_cpp.server import EOS_BIAS, LlamaCppServerBackend
    from harness.core.spec import BackendSpec

    spec = BackendSpec(name="s", kind="llama_cpp", url="http://127.0.0.1:9/v1", served_model="tiny",
                       options={"mode": "server", "extra_body": {"top_k": 40}})
    backend = LlamaCppServerBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))
    assert backend.capabilities.max_concurrency == 1 and not backend.capabilities.token_ids
    request = Request(0, "hi", [1, 2], max_tokens=8)
    body = backend.client.body(request)
    assert body["min_tokens"] == 8 and "ignore_eos" not in body and "logit_bias" not in body
    assert body["top_k"] == 40 and body["repeat_penalty"] == 1.0 and body["prompt"] == "hi"
    backend.eog_ids = [1, 4]
    body = backend.client.body(request)
    assert body["logit_bias"] == {"1": EOS_BIAS, "4": EOS_BIAS} and "min_tokens" not in body
    assert "logit_bias" not in backend.client.body(Request(0, "hi", [1, 2], max_tokens=8, ignore_eos=False))


@needs_llama
def test_the_server_flag_allowlist_is_the_servers_own_less_where_it_listens():
    """SERVER_FLAGS is every flag of the installed llama_cpp.server but those that choose where it listens (or read
    a file that could) and those the harness sets from the scenario: a new version's flags show up here."""
    from llama_cpp.server.settings import Settings

    from backends.llama_cpp.options import SERVER_FLAGS

    assert {f"--{n}" for n in Settings.model_fields} - set(SERVER_FLAGS) == {
        "--host", "--port", "--ssl_keyfile", "--ssl_certfile", "--model", "--model_alias"}
    assert set(SERVER_FLAGS) <= {f"--{n}" for n in Settings.model_fields}  # --config_file is added by its main()


@needs_llama
async def test_an_api_key_reaches_the_server_through_its_environment_not_its_command_line(tiny_model, tiny_gguf,
                                                                                          tmp_path, monkeypatch):
    """Issue 25: server_args became command-line flags, readable by every local user in /proc/*/cmdline."""
    import httpx
    import psutil

    from backends.base import CellContext, ModelInfo
    from backends.llama_cpp.server import LlamaCppServerBackend
    from harness.core.spec import BackendSpec

    secret = "sk-LlamaServerKey42"
    monkeypatch.setenv("BENCH_TEST_KEY", secret)
    spec = BackendSpec(name="s", kind="llama_cpp", options={
        "mode": "server", "gguf": str(tiny_gguf), "server_args": ["--n_ubatch", "64", "--api_key", secret],
        "api_key_env": "BENCH_TEST_KEY", "startup_timeout_s": 60})
    served = LlamaCppServerBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))
    await served.start()
    try:
        procs = [psutil.Process(served.server.pgid), *psutil.Process(served.server.pgid).children(recursive=True)]
        cmdlines = [" ".join(p.cmdline()) for p in procs]
        assert "--n_ubatch 64" in cmdlines[0] and not any(secret in c for c in cmdlines)
        assert httpx.get(served.server.url + "/v1/models").status_code == 401  # the key is in force
        assert (await served.client.http.get(served.client.base_url + "/models")).status_code == 200
    finally:
        await served.stop()
    assert secret not in (tmp_path / "llama_server.log").read_text()


# ---- VRAM budget → layers on the GPU ------------------------------------------------------------------------------

def llama_8b_q8_layout() -> GGUFLayout:
    """Llama-3.1-8B shaped: 32 layers of 218 MiB, 532 MiB of output head, 8 KV heads × 128."""
    return GGUFLayout(n_layers=32, layer_bytes=[218 * MiB] * 32, output_bytes=532 * MiB, n_embd_k_gqa=1024,
                      n_embd_v_gqa=1024, n_vocab=128256, n_ctx_train=131072, file_type="q8_0")


def test_plan_offload_everything_when_it_fits():
    from backends.llama_cpp.offload import plan_offload

    layout = llama_8b_q8_layout()
    plan = plan_offload(80 * 2**30, layout, n_ctx=4096, n_batch=512)
    kv = 32 * 4096 * 2048 * 2  # layers × tokens × (K + V widths) × f16
    reserve = 512 * MiB + 512 * 128256 * 4
    assert plan.n_gpu_layers == 33 and plan.offload_kqv  # 32 layers + the output head
    assert plan.gpu_bytes == 32 * 218 * MiB + 532 * MiB + kv + reserve


def test_plan_offload_partial_layers_under_a_small_budget():
    from backends.llama_cpp.offload import plan_offload

    layout = llama_8b_q8_layout()
    reserve = 512 * MiB + 512 * 128256 * 4
    kv_layer = 4096 * 2048 * 2  # 16 MiB per layer at 4k context
    budget = reserve + 10 * (218 * MiB + kv_layer) + 10 * MiB  # ten layers with their KV, or ten without
    plan = plan_offload(budget, layout, n_ctx=4096, n_batch=512)
    assert (plan.n_gpu_layers, plan.offload_kqv) == (10, True)
    assert plan.gpu_bytes <= budget


def test_plan_offload_moves_kv_to_host_when_that_fits_more_layers():
    from backends.llama_cpp.offload import plan_offload

    layout = llama_8b_q8_layout()
    reserve = 512 * MiB + 512 * 128256 * 4
    kv_layer = 131072 * 2048 * 2  # 512 MiB per layer at 128k context: more than a layer's weights
    budget = reserve + 10 * 218 * MiB
    plan = plan_offload(budget, layout, n_ctx=131072, n_batch=512)
    assert (plan.n_gpu_layers, plan.offload_kqv) == (10, False)
    assert plan_offload(budget, layout, n_ctx=131072, n_batch=512).gpu_bytes <= budget
    assert 3 * (218 * MiB + kv_layer) > budget - reserve  # with their KV only 2 layers would have fit


def test_plan_offload_nothing_when_the_budget_is_below_the_reserve():
    from backends.llama_cpp.offload import plan_offload

    plan = plan_offload(256 * MiB, llama_8b_q8_layout(), n_ctx=4096, n_batch=512)
    assert plan.n_gpu_layers == 0
