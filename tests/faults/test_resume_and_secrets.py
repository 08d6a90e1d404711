"""Faults 7 and 8: --resume under a changed scenario, a resume with nothing left to run, secrets in what is written,
names that are markup, servers that would listen beyond 127.0.0.1, and `bench serve` given nonsense."""

import hashlib
import json

import pytest

from tests.conftest import scenario_dict
from tests.faults.conftest import cells_by_backend, valid_results

S = {"name": "s", "kind": "scripted", "options": {"ttft_s": 0.001, "itl_s": 0.001}}
W = {"name": "w", "input_tokens": 8, "output_tokens": 2, "num_requests": 2, "warmup_requests": 0}


def test_resume_refuses_a_changed_scenario_unless_forced(bench, write_scenario, tiny_model, tmp_path):
    marker = tmp_path / "fail"
    marker.touch()
    backends = [S, {"name": "later", "kind": "scripted", "options": {"fail_if_exists": str(marker)}}]
    path = write_scenario(scenario_dict(tiny_model, backends, [W]))
    out = tmp_path / "out"
    assert bench("run", str(path), "--out", str(out)).wait(120) == 1
    before = (out / "results.json").read_text()
    fingerprint = json.loads(before)["scenario_fingerprint"]
    assert fingerprint

    marker.unlink()
    changed = write_scenario(scenario_dict(tiny_model, backends, [{**W, "output_tokens": 3}]))
    refused = bench("run", str(changed), "--out", str(out), "--resume")
    assert refused.wait(60) == 2 and "Traceback" not in refused.output
    assert "the scenario changed since these results were measured (changed: workloads)" in refused.output
    assert "--force" in refused.output
    assert (out / "results.json").read_text() == before  # untouched

    forced = bench("run", str(changed), "--out", str(out), "--resume", "--force")
    assert forced.wait(120) == 0, forced.output
    run = valid_results(out)
    assert run.scenario_fingerprint != fingerprint
    assert [(r["changed"], r["previous_fingerprint"]) for r in run.forced_resumes] == [(["workloads"], fingerprint)]
    assert cells_by_backend(out)["later"].ok and cells_by_backend(out)["later"].workload_spec.output_tokens == 3
    assert not forced.wait_gone(5)

    # Every cell ok: a resume has nothing to run, and once rewrote summary.md as an empty table.
    summary = (out / "summary.md").read_text()
    assert "later" in summary
    again = bench("run", str(changed), "--out", str(out), "--resume")
    assert again.wait(120) == 0 and "2 cell(s) already ok, 0 to run" in again.output
    assert (out / "summary.md").read_text() == summary
    assert [c.status for c in valid_results(out).cells] == ["ok", "ok"]


SECRET = "hf_FaultSuiteSecret123"


def test_secrets_are_masked_and_names_escaped_in_every_file_written(bench, write_scenario, tiny_model, tmp_path):
    """An engine's environment (HF_TOKEN) reaches the worker and appears in no file the harness writes: cell.json,
    worker.json, results.json, requests.jsonl, summary.md, the report (the other rules: test_redaction_rules).
    Names that are markup are escaped in summary.md and the report."""
    backend = {**S, "options": {**S["options"], "env": {"HF_TOKEN": SECRET, "VLLM_OTHER": "kept"}}}
    scenario = scenario_dict(tiny_model, [backend], [W]) | {"name": "<script>alert(1)</script>|x"}
    scenario["models"] = {"<b>tiny</b>|*": scenario["models"]["tiny"]}
    path = write_scenario(scenario)
    out = tmp_path / "out"
    run = bench("run", str(path), "--out", str(out))
    assert run.wait(120) == 0, run.output
    cell_dir = next((out / "cells").iterdir())
    seen = json.loads((cell_dir / "env_seen.json").read_text())  # the test double's own record: hashes only
    assert seen["HF_TOKEN"] == hashlib.sha256(SECRET.encode()).hexdigest()
    written = [p for p in out.rglob("*") if p.is_file() and p.name != "env_seen.json"]
    assert {"cell.json", "worker.json", "results.json", "summary.md", "report.md", "report.html"} <= {p.name for p in written}
    for p in written:
        assert SECRET not in p.read_text(errors="replace"), p
    results = valid_results(out)
    assert results.scenario["backends"][0]["options"]["env"] == {"HF_TOKEN": "***", "VLLM_OTHER": "kept"}
    assert json.loads((cell_dir / "cell.json").read_text())["backend"]["options"]["env"]["HF_TOKEN"] == "***"

    summary = (out / "summary.md").read_text()
    assert "<script>" not in summary and "<b>" not in summary
    assert "&lt;script&gt;" in summary and "\\|" in summary
    assert "<script>alert" not in (out / "report.html").read_text()


def test_redaction_rules():
    from harness.core.redact import MASK, Redactor

    redact = Redactor()
    data = {"env": {"HF_TOKEN": "hf_a1", "PATH": "/bin"}, "api_key_env": "OPENAI_API_KEY", "apiKey": "k-1234",
            "server_args": ["--api-key", "s3cret-1", "--n_ctx", "8", "--password=pw-42"],
            "url": "https://user:hunter22@host/v1", "num_key_value_heads": 8, "max_tokens": 5,
            "tokenizer": "/models/t", "token_counts": {"input": "engine"}, "error": "401 for hf_a1: s3cret-1 rejected"}
    masked = redact(data)
    assert masked["env"] == {"HF_TOKEN": MASK, "PATH": "/bin"}
    assert masked["apiKey"] == MASK and masked["api_key_env"] == "OPENAI_API_KEY"  # a variable's name, no secret
    assert masked["server_args"] == ["--api-key", MASK, "--n_ctx", "8", f"--password={MASK}"]
    assert masked["url"] == f"https://user:{MASK}@host/v1"
    assert masked["num_key_value_heads"] == 8 and masked["max_tokens"] == 5 and masked["tokenizer"] == "/models/t"
    assert masked["token_counts"] == {"input": "engine"}
    assert masked["error"] == f"401 for {MASK}: {MASK} rejected"  # found once, masked wherever quoted


def test_secrets_are_masked_by_value_and_shape_as_well_as_by_key():
    """Issue 25: masking went by key name only. A token in a URL's user part or query, in a header string or a
    NAME=value string was written as is; api_keys, credentials, auth, cookie, passphrase were not masked; a secret
    of the environment quoted in a message was kept. Issue 29: the masking turned chunk_token_ids into ***."""
    from harness.core.redact import MASK, Redactor

    redact = Redactor(environ={"HF_TOKEN": "hf_FromTheEnvironment1", "USE_AUTH": "true", "PATH": "/bin"})
    data = {"url": "https://sk-abcdef123@host/v1", "query": "http://h:8000/v1?api_key=q-secret-1&stream=1",
            "headers": ["Authorization: Bearer b-secret-2", "Accept: text/event-stream", "X-Api-Key: x-secret-3"],
            "env_list": ["HF_TOKEN=hf_list_secret4", "OMP_NUM_THREADS=2"],
            "api_keys": ["k-secret-5", "k-secret-6"], "credentials": {"user": "u-secret-7", "pass": "p-secret-8"},
            "auth": "a-secret-9", "cookie": "session=c-secret-10", "passphrase": "pp-secret-11",
            "chunk_token_ids": [[1, 2], [3]], "max_tokens": 5, "token_counts": {"input": "engine"},
            "log": "non-default args: {'api_key': 'v-secret-12'}; --api-key f-secret-13 --port 80; first token: 12 ms",
            "error": "401 from http://h/v1 with hf_FromTheEnvironment1; true"}
    masked = redact(data)
    assert masked["url"] == f"https://{MASK}@host/v1"
    assert masked["query"] == f"http://h:8000/v1?api_key={MASK}&stream=1"
    assert masked["headers"] == [f"Authorization: Bearer {MASK}", "Accept: text/event-stream", f"X-Api-Key: {MASK}"]
    assert masked["env_list"] == [f"HF_TOKEN={MASK}", "OMP_NUM_THREADS=2"]
    assert masked["api_keys"] == [MASK, MASK] and masked["credentials"] == {"user": MASK, "pass": MASK}
    assert masked["auth"] == masked["cookie"] == masked["passphrase"] == MASK
    assert masked["chunk_token_ids"] == [[1, 2], [3]] and masked["max_tokens"] == 5
    assert masked["token_counts"] == {"input": "engine"}
    assert masked["log"] == (f"non-default args: {{'api_key': '{MASK}'}}; --api-key {MASK} --port 80; "
                             f"first token: 12 ms")
    assert masked["error"] == f"401 from http://h/v1 with {MASK}; true"  # short flag values are no secrets
    assert "secret" not in json.dumps(masked)


def test_a_rate_per_token_is_no_secret():
    """The own engine's decode_bound (bytes_per_token, bound_s_per_token) was written as *** and its numbers lost."""
    from harness.core.redact import MASK, Redactor, is_secret_name

    masked = Redactor()({"decode_bound": {"bytes_per_token": 4096.0, "measured_s_per_token": 0.5}, "hf_token": "x"})
    assert masked == {"decode_bound": {"bytes_per_token": 4096.0, "measured_s_per_token": 0.5}, "hf_token": MASK}
    assert not is_secret_name("seconds_per_token")
    assert is_secret_name("proxy_token") and is_secret_name("PER_USER_TOKEN")


def test_ray_tasks_get_masked_data_and_secrets_from_the_nodes_environment(monkeypatch):
    """What `--executor ray` hands a task: the scenario masked, and no secret-named LLMBENCH_ variable in runtime_env
    (both shown by Ray's dashboard and state API); a node puts the secrets back from its own variables
    (test_ray_scaleout.py runs it on a cluster)."""
    from harness.core.redact import MASK, Redactor, restore
    from harness.core.spec import Placement
    from harness.run.ray_executor import placement_options

    monkeypatch.setenv("LLMBENCH_CACHE", "/cache")
    monkeypatch.setenv("LLMBENCH_HF_TOKEN", "hf_NeverForwarded1")
    forwarded = placement_options(Placement())["runtime_env"]["env_vars"]
    assert forwarded["LLMBENCH_CACHE"] == "/cache" and "LLMBENCH_HF_TOKEN" not in forwarded
    scenario = {"backends": [{"options": {"env": {"HF_TOKEN": "hf_a1b2c3"}, "server_args": [
        "--api_key", "sk-123456", "--n_ctx", "8"], "engine_args": {"hf_token": "hf_x9y8z7"}}}],
        "url": "http://127.0.0.1:8000/v1"}
    masked = Redactor(environ={})(scenario)
    assert not [secret for secret in ("hf_a1b2c3", "sk-123456", "hf_x9y8z7") if secret in str(masked)]
    restored, missing = restore(masked, {"HF_TOKEN": "hf_a1b2c3", "API_KEY": "sk-123456"})
    assert missing == []  # engine_args.hf_token's variable is HF_TOKEN too
    assert restored["backends"][0]["options"]["server_args"] == ["--api_key", "sk-123456", "--n_ctx", "8"]
    assert restored["backends"][0]["options"]["env"] == {"HF_TOKEN": "hf_a1b2c3"}
    _, missing = restore(masked | {"url": f"http://u:{MASK}@h/v1"}, {})
    assert set(missing) == {"HF_TOKEN", "API_KEY", "a secret inside 'http://u:***@h/v1'"}


def test_a_failing_url_is_printed_without_its_password(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    backend = {"name": "o", "kind": "openai", "url": "http://user:UrlPassword123@127.0.0.1:9/v1"}
    result = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(tiny_model, [backend])))])
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == 2 and "cannot reach http://user:***@127.0.0.1:9/v1" in out.replace("\n", "")
    assert "UrlPassword123" not in out


@pytest.fixture(scope="module")
def served(tiny_model, tmp_path_factory):
    from starlette.testclient import TestClient

    from harness.serve import build_server

    server = build_server("scripted", tiny_model, {"ttft_s": 0.001, "itl_s": 0.001},
                          tmp_path_factory.mktemp("serve"), "tgi")
    with TestClient(server.app()) as client:
        yield client


@pytest.mark.parametrize("max_tokens", [-1, 0, 1e300, 2**40, "8", None])
def test_bench_serve_answers_bad_max_tokens_with_400(served, max_tokens):
    body = {"prompt": "hello", "max_tokens": max_tokens, "stream": True}
    r = served.post("/v1/completions", json=body)
    if max_tokens is None:
        assert r.status_code == 200
        return
    assert r.status_code == 422  # the TGI protocol's validation status; openai's is 400 (below)
    assert "max_tokens" in r.json()["message"]


def test_bench_serve_openai_protocol_says_400(tiny_model, tmp_path):
    from starlette.testclient import TestClient

    from harness.serve import build_server

    server = build_server("scripted", tiny_model, {}, tmp_path, "openai")
    with TestClient(server.app()) as client:
        for bad in (-1, 0, 1e300, float("inf")):
            body = json.dumps({"prompt": "hi", "max_tokens": bad})  # Infinity: what Python's json writes
            r = client.post("/v1/completions", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400 and "`max_tokens` must be" in r.json()["message"], (bad, r.text)
        r = client.post("/v1/completions", json={"prompt": "hi", "temperature": -2})
        assert r.status_code == 400 and "`temperature` must be from 0" in r.json()["message"]


def test_serve_options_use_the_limited_yaml_loader(tmp_path, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    result = CliRunner().invoke(app, ["serve", "--backend", "scripted", "--model", str(tiny_model),
                                      "--option", "env=&a [*a]"])
    assert result.exit_code == 2 and "recursive" in result.output + (result.stderr or "")
    # a value YAML parses but cannot hold (a date out of range) is a clear error too, not a ValueError traceback
    result = CliRunner().invoke(app, ["serve", "--backend", "scripted", "--model", str(tiny_model),
                                      "--option", "k=2001-02-30"])
    assert result.exit_code == 2 and "--option k: not valid YAML" in result.output + (result.stderr or "")
