"""The `tgi` backend and `bench serve --protocol tgi`, spoken through the real `text-generation` client.

No TGI server runs on a CPU machine; `bench serve --protocol tgi` serves TGI's routes and shapes, and the real
client (the one the backend uses) must parse every reply.
"""

import json
from pathlib import Path

import pytest

from backends.base import vram_share
from backends.tgi_backend import TGILaunch, launch_command
from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import bench_serve, scenario_dict

SERVED = "own"


@pytest.fixture(scope="module")
def tgi_url(tiny_model):
    with bench_serve(tiny_model, SERVED, "tgi") as url:
        yield url


def test_the_installed_client_imports_beside_transformers():
    import text_generation
    import transformers

    assert text_generation.AsyncClient and int(transformers.__version__.split(".")[0]) >= 4


def test_streaming_and_list_shaped_replies_parse_with_the_real_client(tgi_url):
    from text_generation import Client

    client = Client(tgi_url)
    whole = client.generate("the city of water", max_new_tokens=7)  # POST / without stream: a list body
    assert whole.details.generated_tokens == 7 and whole.details.finish_reason.value == "length"
    events = list(client.generate_stream("the city of water", max_new_tokens=7))
    assert [e.token.id for e in events] == [t.id for t in whole.details.tokens]
    assert events[-1].details.generated_tokens == 7 and events[-1].generated_text == whole.generated_text
    assert all(e.details is None and e.generated_text is None for e in events[:-1])


def test_generate_route_info_and_metrics(tgi_url):
    import httpx

    r = httpx.post(tgi_url + "/generate", json={"inputs": "the city", "parameters": {"max_new_tokens": 3, "details": True}})
    assert r.status_code == 200 and r.json()["details"]["generated_tokens"] == 3  # an object, not a list
    assert httpx.get(tgi_url + "/info").json()["model_pipeline_tag"] == "text-generation"
    assert "llmbench_generated_tokens_total" in httpx.get(tgi_url + "/metrics").text
    bad = httpx.post(tgi_url + "/generate", json={"inputs": 3})
    assert bad.status_code == 422 and "inputs" in bad.json()["error"]


def test_tgi_backend_gives_full_metrics_and_in_process_tokens(tgi_url, tiny_model, write_scenario, tmp_path):
    backends = [{"name": "local", "kind": SERVED}, {"name": "tgi", "kind": "tgi", "url": tgi_url}]
    wl = [{"name": "w", "input_tokens": 24, "output_tokens": 12, "num_requests": 3,
           "load": {"type": "concurrency", "concurrency": 2}}]
    path = write_scenario(scenario_dict(tiny_model, backends, wl, record_outputs=True))
    assert Runner(load_scenario(path), str(path), tmp_path / "out", write_report=False).run() == 0
    cells = {c["backend"]: c for c in json.loads((tmp_path / "out" / "results.json").read_text())["cells"]}
    m = cells["tgi"]["metrics"]
    assert m["completed"] == 3 and m["total_output_tokens"] == 36 and m["total_input_tokens"] == 72
    assert m["ttft_ms"]["p50"] > 0 and m["tpot_ms"]["p50"] > 0 and m["itl_ms"]["count"] == 33
    assert cells["tgi"]["token_counts"]["output"] == ["server_usage"]
    assert cells["tgi"]["engine"]["info"]["backend"] == SERVED
    scraped = cells["tgi"]["server_metrics"]  # bench serve names its counters llmbench_*, not TGI's
    assert scraped["scrapes"] >= 2 and "failed_scrapes" not in scraped and "queue_size" in scraped["missing"]

    def outputs(cell):
        lines = (tmp_path / "out" / cell["requests_file"]).read_text().splitlines()
        return {r["id"]: r["output_token_ids"] for r in map(json.loads, lines)}

    assert outputs(cells["tgi"]) == outputs(cells["local"])


def test_openai_backend_against_serve_openai(tiny_model, write_scenario, tmp_path):
    with bench_serve(tiny_model, SERVED, "openai") as url:
        b = [{"name": "oa", "kind": "openai", "url": url + "/v1"}]
        path = write_scenario(scenario_dict(tiny_model, b))
        assert Runner(load_scenario(path), str(path), tmp_path / "out", write_report=False).run() == 0


def test_launch_command_from_the_scenario_and_budget():
    o = TGILaunch(max_input_tokens=4096, max_total_tokens=8192, quantize="awq", extra_args=["--max-concurrent-requests", "64"])
    frac = vram_share(8 * 2**30, 80 * 2**30)
    assert frac == 0.1 and vram_share(100 * 2**30, 80 * 2**30) == 1.0 and vram_share(2**30, 3 * 2**30) == 0.3333
    argv = launch_command(o, Path("/models/llama"), 8123, frac)
    assert argv == ["text-generation-launcher", "--model-id", "/models/llama", "--max-input-tokens", "4096",
                    "--max-total-tokens", "8192", "--quantize", "awq", "--cuda-memory-fraction", "0.1",
                    "--hostname", "127.0.0.1", "--port", "8123", "--max-concurrent-requests", "64"]
    docker = launch_command(TGILaunch(via="docker", image="tgi:3"), Path("/models/llama"), 9000, None, "c1")
    assert docker[:12] == ["docker", "run", "--rm", "--name", "c1", "--label", "llmbench=tgi", "--gpus", "all",
                           "--shm-size", "1g", "-p"]
    assert "127.0.0.1:9000:80" in docker and "/models/llama:/data/model:ro" in docker
    assert docker[docker.index("tgi:3") + 1:] == ["--model-id", "/data/model", "--port", "80"]


def test_tgi_needs_url_or_launch(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    r = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(tiny_model, [{"name": "t", "kind": "tgi"}])))])
    assert r.exit_code == 2 and "backends[0]" in r.output and "options.launch" in r.output


FAKE_DOCKER = """
import os, signal, subprocess, sys, time
state, args = os.environ["FAKE_DOCKER_STATE"], sys.argv[1:]
if args[0] == "run":
    name = args[args.index("--name") + 1] if "--name" in args else f"unnamed-{os.getpid()}"
    # the container runs under the docker daemon, outside the client's process group
    port = next(a.split(":")[1] for a in args if a.startswith("127.0.0.1:"))
    serve = os.environ.get("FAKE_DOCKER_SERVES")  # a stand-in TGI answering /health, /info and /metrics
    code = (f"import sys; sys.argv = ['x', {port!r}]; exec(open({serve!r}).read())" if serve
            else "import time; time.sleep(120)")
    # started by a process that exits at once, so it is nobody's child: as under the docker daemon
    spawn = (f"import subprocess, sys; print(subprocess.Popen([sys.executable, '-c', {code!r}], "
             "start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid)")
    pid = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True).stdout.strip()
    open(os.path.join(state, name), "w").write(pid)
    time.sleep(120)  # the client waits on its container
elif args[:2] == ["rm", "--force"]:
    os.kill(int(open(os.path.join(state, args[2])).read()), signal.SIGKILL)
    open(os.path.join(state, args[2] + ".removed"), "w").close()
"""


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    """A stand-in `docker` on PATH whose containers run outside the client's process tree, as under the daemon;
    yields the folder where it notes each container's pid (by name) and each removal; kills what is left after."""
    import os
    import sys

    import psutil

    bin_dir, state = tmp_path / "bin", tmp_path / "containers"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "docker").write_text(f"#!{sys.executable}\n{FAKE_DOCKER}")
    (bin_dir / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_DOCKER_STATE", str(state))
    yield state
    for p in state.iterdir():
        if not p.name.endswith(".removed"):
            try:
                psutil.Process(int(p.read_text())).kill()
            except psutil.NoSuchProcess:
                pass


async def test_a_docker_container_is_named_and_removed_when_the_launch_fails(tiny_model, tmp_path, fake_docker):
    """Issue 25: `docker run --rm` without a name: killing the docker client after a timeout left the container
    running and holding the GPU. No docker here: a stand-in `docker` starts its "container" outside the client's
    process group, as the daemon does."""
    import psutil

    from backends.base import BackendError, CellContext, ModelInfo
    from backends.tgi_backend import TGIBackend
    from harness.core.spec import BackendSpec

    spec = BackendSpec(name="t", kind="tgi", options={"launch": {"via": "docker", "startup_timeout_s": 2}})
    backend = TGIBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))
    with pytest.raises(BackendError, match="not ready after 2 s"):
        await backend.start()
    (name,) = [p.name for p in fake_docker.iterdir() if not p.name.endswith(".removed")]
    assert name.startswith("llmbench-tgi-") and (fake_docker / f"{name}.removed").exists()
    pid = int((fake_docker / name).read_text())
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


FAKE_TGI = """
import http.server, json, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"model_id": "fake"}).encode() if self.path == "/info" else b""
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


async def test_a_docker_launch_is_ready_though_the_port_is_published_outside_its_tree(tiny_model, tmp_path,
                                                                                       fake_docker, monkeypatch):
    """docker's proxy, not the docker client we start, listens on the published port: readiness used to require our
    process tree to listen there, so a docker launch could never become ready. The container is removed at stop."""
    from backends.base import CellContext, ModelInfo
    from backends.tgi_backend import TGIBackend
    from harness.core.spec import BackendSpec

    (tmp_path / "tgi.py").write_text(FAKE_TGI)
    monkeypatch.setenv("FAKE_DOCKER_SERVES", str(tmp_path / "tgi.py"))
    spec = BackendSpec(name="t", kind="tgi", options={"launch": {"via": "docker", "startup_timeout_s": 20},
                                                      "metrics_interval_s": None})
    backend = TGIBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))
    await backend.start()
    assert backend.info == {"model_id": "fake"}
    (name,) = [p.name for p in fake_docker.iterdir()]
    await backend.stop()
    assert (fake_docker / f"{name}.removed").exists()
