"""`bench run --executor ray` on a local multi-node Ray cluster (ray.cluster_utils.Cluster: one head without CPUs for
tasks and two nodes of one CPU each, told apart by the custom resources node_a and node_b, all on this machine). One
cluster serves every test here: Ray's start-up cost stays out of every other test file."""

from __future__ import annotations

import json
import statistics
import threading
import time

import pytest

from harness.config.load import load_scenario
from harness.records import load_run, read_requests
from harness.run.runner import Runner
from tests.conftest import scenario_dict

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STORE = 80 * 1024**2


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                      "object_store_memory": STORE})
    nodes = {name: c.add_node(num_cpus=1, resources={name: 1}, object_store_memory=STORE)
             for name in ("node_a", "node_b")}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, logging_level="warning")
    try:
        yield c, nodes
    finally:
        ray.shutdown()
        c.shutdown()


def executor(**kw):
    from harness.run.ray_executor import RayExecutor

    return RayExecutor(**kw)


def run(path, out, ex=None, **kw) -> int:
    return Runner(load_scenario(path), str(path), out, executor=ex, **kw).run()


def scripted(name: str, **options) -> dict:
    return {"name": name, "kind": "scripted", "options": {"ttft_s": 0.01, "itl_s": 0.002, **options}}


def test_bench_never_starts_a_ray_cluster_itself(monkeypatch):
    """Ray's services listen on every interface: without --address or RAY_ADDRESS the run is refused (exit 2), where
    ray.init() would have started a cluster open to the network."""
    from harness.run.ray_executor import ClusterError, connect

    class NotConnected:
        @staticmethod
        def is_initialized():
            return False

        @staticmethod
        def init(**kwargs):
            raise AssertionError(f"ray.init({kwargs}) was called")

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="no Ray cluster given: pass --address"):
        connect(NotConnected, None)


def test_cluster_flags_and_keys_are_checked_before_anything_runs(write_scenario, tiny_model, tmp_path):
    """No cluster needed: mistakes exit 2 with the flag or key named, without a traceback."""
    from typer.testing import CliRunner

    from harness.cli import app

    path = write_scenario(scenario_dict(tiny_model, [scripted("s")]))
    for argv, said in ((["--executor", "dask"], "--executor: expected local or ray, got 'dask'"),
                       (["--max-parallel", "2"], "only go with --executor ray"),
                       (["--executor", "ray", "--max-parallel", "0"], "--max-parallel: expected a positive number"),
                       (["--executor", "ray", "--max-retries", "-1"], "--max-retries: expected 0 or more")):
        r = CliRunner().invoke(app, ["run", str(path), "--out", str(tmp_path / "out"), *argv])
        assert r.exit_code == 2 and said in " ".join(r.output.split()) and "Traceback" not in r.output, r.output
    load = {"type": "poisson", "rate": 5}
    for bad, said in (({"placement": {"num_gpu": 1}}, "backends[0].placement.num_gpu"),
                      ({"placement": {"resources": {"node_a": -1}}}, None)):
        r = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(
            tiny_model, [{**scripted("s"), **bad}])))])
        assert (r.exit_code == 2) == (said is not None) and (said is None or said in r.output), r.output
    for extra, said in (({"generators": 1}, "generators"), ({"generators": 2, "clients": 2}, "not both"),
                        ({"client_placement": {"num_cpus": 2}}, "it needs generators")):
        wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 4, "load": {**load, **extra}}]
        r = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(tiny_model, [scripted("s")], wl)))])
        assert r.exit_code == 2 and said in r.output and "Traceback" not in r.output, r.output


def test_doctor_lists_the_cluster_nodes_and_their_resources(cluster):
    from harness.doctor import cluster_checks

    c, nodes = cluster
    checks = {k.component: k for k in cluster_checks(c.address)}
    assert checks["Ray cluster"].status == "ok" and "3 node(s) alive of 3" in checks["Ray cluster"].detail
    details = [k.detail for k in checks.values()]
    for name, node in nodes.items():
        assert any(f"custom {name}: 1" in d and "CPU 1" in d and node.node_id in d for d in details), details


def test_quickstart_cpu_backends_give_the_same_cells_and_metrics_as_a_local_run(cluster, write_scenario, tiny_model,
                                                                                  tmp_path):
    backends = [{"name": "hf", "kind": "transformers", "options": {"dtype": "float32"}},
                {"name": "own", "kind": "own", "options": {"max_batch": 4}}]
    workloads = [{"name": "short", "input_tokens": 16, "output_tokens": 8, "num_requests": 4, "warmup_requests": 1,
                  "load": {"type": "concurrency", "concurrency": 2}}]
    # As in the quickstart, a synthetic model: on a node its folder is resolved (built if missing) by the node's planner.
    path = write_scenario(scenario_dict(tiny_model, backends, workloads,
                                        models={"tiny": {"synthetic": {"preset": "tiny-llama", "seed": 0}}}))
    assert run(path, tmp_path / "local") == 0
    assert run(path, tmp_path / "ray", executor()) == 0
    local, remote = load_run(tmp_path / "local"), load_run(tmp_path / "ray")
    assert [c.id for c in remote.cells] == [c.id for c in local.cells] and len(remote.cells) == 2
    nodes = {n.node_id for n in [cluster[1]["node_a"], cluster[1]["node_b"]]}
    for a, b in zip(local.cells, remote.cells):
        assert b.ok and set(b.metrics.keys()) == set(a.metrics.keys()) and set(b.ci) == set(a.ci)
        assert b.metrics.value("completed") == a.metrics.value("completed") == 4
        assert b.node.ray_node_id in nodes and b.node.hostname == a.node.hostname
        assert [t.status for t in b.attempts] == ["ok"]
        # the cell folder came back from the node: the run-level files are built from it as locally
        for name in ("cell.json", "worker.json", "requests.jsonl", "timeline.json", "worker.log"):
            assert (tmp_path / "ray" / "cells" / b.id / name).is_file(), name
    lines = (tmp_path / "ray" / "requests.jsonl").read_text().splitlines()
    assert len(lines) == 8 and {json.loads(x)["cell"] for x in lines} == {c.id for c in local.cells}
    assert (tmp_path / "ray" / "report.html").is_file()


def test_pinned_cells_land_on_their_nodes_and_a_failing_cell_is_retried_on_the_other(cluster, write_scenario,
                                                                                      tiny_model, tmp_path):
    _, nodes = cluster
    flag = tmp_path / "fail"
    flag.touch()
    backends = [{**scripted("on-a"), "placement": {"resources": {"node_a": 1}}},
                {**scripted("on-b"), "placement": {"resources": {"node_b": 1}}},
                scripted("bad", fail_if_exists=str(flag))]
    path = write_scenario(scenario_dict(tiny_model, backends))
    assert run(path, tmp_path / "out", executor(max_retries=1)) == 1
    cells = {c.backend: c for c in load_run(tmp_path / "out").cells}
    assert cells["on-a"].ok and cells["on-a"].node.ray_node_id == nodes["node_a"].node_id
    assert cells["on-b"].ok and cells["on-b"].node.ray_node_id == nodes["node_b"].node_id
    bad = cells["bad"]
    assert bad.status == "failed" and bad.error.startswith("scripted start failure")
    assert [t.status for t in bad.attempts] == ["failed", "failed"]
    assert bad.attempts[0].ray_node_id != bad.attempts[1].ray_node_id  # the retry went to the other node
    # --resume on the cluster reruns only the failed cell
    flag.unlink()
    assert run(path, tmp_path / "out", executor(), resume=True) == 0
    again = {c.backend: c for c in load_run(tmp_path / "out").cells}
    assert again["bad"].ok and again["on-a"].attempts == cells["on-a"].attempts


def test_ctrl_c_cancels_every_cell_and_stops_their_servers(cluster, write_scenario, tiny_model, tmp_path):
    """`bench run --executor ray` interrupted while two cells run, one per node, each with a server it launched:
    exit 130, both cells recorded as interrupted, and no process of theirs left (worker, server)."""
    import os
    import signal
    import subprocess
    import sys

    import psutil

    cache = str(tmp_path / "cache")  # the nodes' work folder is in it: every process of the run has it in its env

    def theirs() -> list[str]:
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.environ().get("LLMBENCH_CACHE") == cache:
                    found.append(" ".join(p.info["cmdline"] or []))
            except (psutil.Error, OSError):
                pass
        return found

    backends = [scripted(f"s{k}", server=True, ttft_s=0.5) for k in range(2)]
    wl = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 40, "warmup_requests": 0}]
    path = write_scenario(scenario_dict(tiny_model, backends, wl))
    bench = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", str(path), "--executor", "ray",
                              "--address", cluster[0].address, "--out", str(tmp_path / "out")],
                             env={**os.environ, "LLMBENCH_CACHE": cache}, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while sum("http.server" in c for c in theirs()) < 2 and time.time() < deadline:
        time.sleep(0.3)
    assert sum("http.server" in c for c in theirs()) == 2, theirs()
    bench.send_signal(signal.SIGINT)
    out, _ = bench.communicate(timeout=120)
    assert bench.returncode == 130, out[-3000:]
    cells = load_run(tmp_path / "out").cells
    assert [c.error for c in cells] == ["interrupted by the user"] * 2
    deadline = time.time() + 15
    while theirs() and time.time() < deadline:
        time.sleep(0.3)
    assert not theirs()


def test_two_generators_share_a_poisson_load_against_the_scripted_server(cluster, write_scenario, tiny_model,
                                                                          tmp_path, monkeypatch):
    """The worker and a Ray actor on node_b (client_placement) each send half of one schedule to the scripted server
    (harness/calibrate.py, timing known exactly): merged onto one clock, TTFT and TPOT are the server's and the
    achieved rate is the two halves' sum."""
    from harness.calibrate import scripted_server

    ttft_ms, itl_ms = 5.0, 2.0
    _, nodes = cluster
    monkeypatch.setenv("RAY_ADDRESS", cluster[0].address)  # the worker joins the test's cluster
    wl = [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 40, "warmup_requests": 1,
           "load": {"type": "poisson", "rate": 20, "generators": 2,
                    "client_placement": {"resources": {"node_b": 1}}}}]
    with scripted_server(tmp_path / "server", ttft_ms, itl_ms) as url:
        path = write_scenario(scenario_dict(tiny_model, [{"name": "remote", "kind": "openai", "url": url + "/v1"}],
                                            wl))
        assert run(path, tmp_path / "out") == 0
    (cell,) = load_run(tmp_path / "out").cells
    (clock,) = cell.clients
    assert clock.index == 1 and clock.node == nodes["node_b"].node_id
    # one machine, one monotonic clock: the offset measured over Ray calls is zero within its own error bound
    assert clock.offset_error_s < 0.01 and abs(clock.offset_s) <= clock.offset_error_s + 1e-4
    records = read_requests(tmp_path / "out" / cell.requests_file)
    assert sorted(r.id for r in records) == list(range(1, 41))
    assert {r.client for r in records if r.id % 2} == {0} and {r.client for r in records if r.id % 2 == 0} == {1}
    m = cell.metrics
    assert m.value("completed") == 40 and m.value("offered_rate_rps") == pytest.approx(20.0, rel=1e-6)
    assert m.value("achieved_rate_rps") == pytest.approx(20.0, rel=0.05)
    assert abs(m.value("ttft_ms.p50") - ttft_ms) < 3 and abs(m.value("tpot_ms.p50") - itl_ms) < 1
    for k in (0, 1):  # each generator alone measures the server's timing too
        mine = [r for r in records if r.client == k]
        assert abs(statistics.median(r.ttft for r in mine) * 1e3 - ttft_ms) < 3
        assert abs(statistics.median(r.tpot for r in mine) * 1e3 - itl_ms) < 1


def test_two_generators_replay_a_trace_on_its_arrival_times(cluster, write_scenario, tiny_model, tmp_path,
                                                            monkeypatch):
    """A mooncake trace dealt out to the worker and a Ray actor: every row is sent once, at the trace's time (merged
    onto the worker's clock, within the actor's clock-offset error), by alternating senders."""
    from harness.calibrate import scripted_server

    monkeypatch.setenv("RAY_ADDRESS", cluster[0].address)
    times_ms = [0, 40, 55, 130, 200, 210, 290, 400, 430, 520, 600, 610, 700, 790, 800, 905]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": t, "input_length": 16, "output_length": 4,
                                         "hash_ids": [k % 3]}) + "\n" for k, t in enumerate(times_ms)))
    wl = [{"name": "w", "input_tokens": 16, "output_tokens": 4, "num_requests": len(times_ms), "warmup_requests": 0,
           "load": {"type": "trace", "path": str(trace), "block_tokens": 8, "generators": 2,
                    "client_placement": {"resources": {"node_b": 1}}}}]
    with scripted_server(tmp_path / "server", 5.0, 2.0) as url:
        path = write_scenario(scenario_dict(tiny_model, [{"name": "remote", "kind": "openai", "url": url + "/v1"}],
                                            wl))
        assert run(path, tmp_path / "out") == 0
    (cell,) = load_run(tmp_path / "out").cells
    (clock,) = cell.clients
    records = sorted(read_requests(tmp_path / "out" / cell.requests_file), key=lambda r: r.id)
    assert [r.id for r in records] == list(range(len(times_ms)))
    assert [r.client for r in records] == [k % 2 for k in range(len(times_ms))]
    first = records[0].t_scheduled
    for r, t_ms in zip(records, times_ms):
        assert abs((r.t_scheduled - first) - t_ms / 1e3) <= clock.offset_error_s + 1e-3
        assert 0 <= r.t_send - r.t_scheduled < 0.05


def test_a_node_killed_mid_cell_retries_it_elsewhere(cluster, write_scenario, tiny_model, tmp_path):
    """Last here: it takes a node away."""
    c, nodes = cluster
    workloads = [{"name": "w", "input_tokens": 8, "output_tokens": 4, "num_requests": 8, "warmup_requests": 0}]
    path = write_scenario(scenario_dict(tiny_model, [scripted("slow", ttft_s=0.5)], workloads))
    ex = executor(max_retries=1)
    killed: list[str] = []

    def kill_its_node() -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for node_id in ex.running().values():
                victim = next(n for n in nodes.values() if n.node_id == node_id)
                time.sleep(1.0)  # mid-cell: its worker is sending requests
                c.remove_node(victim, allow_graceful=False)
                killed.append(node_id)
                return
            time.sleep(0.2)

    killer = threading.Thread(target=kill_its_node, daemon=True)
    killer.start()
    assert run(path, tmp_path / "out", ex) == 0
    killer.join()
    (cell,) = load_run(tmp_path / "out").cells
    assert killed and cell.ok and len(cell.attempts) == 2
    assert cell.attempts[0].status == "failed" and cell.attempts[0].ray_node_id == killed[0]
    assert cell.node.ray_node_id != killed[0] and cell.metrics.value("completed") == 8


def test_secrets_reach_a_node_only_through_its_own_environment(cluster, write_scenario, tiny_model, tmp_path):
    """Issue 25: the whole unmasked scenario was pickled into each task's arguments, which Ray's dashboard and state
    API show. A task gets the scenario masked and takes each secret from the node's environment: these nodes were
    started without the variable, so the cell fails saying which one to set, and the secret is nowhere."""
    import os

    secret = "tok-RayTaskArgument99"
    assert "BENCH_RAY_TOKEN" not in os.environ
    backend = scripted("s") | {"options": {"env": {"BENCH_RAY_TOKEN": secret}}}
    path = write_scenario(scenario_dict(tiny_model, [backend], [{"name": "w", "input_tokens": 8, "output_tokens": 2,
                                                                 "num_requests": 2, "warmup_requests": 0}]))
    assert run(path, tmp_path / "ray", executor(max_retries=0)) == 1
    (cell,) = load_run(tmp_path / "ray").cells
    assert not cell.ok and "set: BENCH_RAY_TOKEN" in cell.error
    assert not [p for p in (tmp_path / "ray").rglob("*") if p.is_file() and secret in p.read_text(errors="replace")]
