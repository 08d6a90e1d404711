"""CPU isolation of the load generator (resources.isolate_client): the worker's event loop on its own CPU(s), the
engine's server and threads on the rest, thread counts to match, recorded in results.json and the report."""

import json
import os

import pytest

from harness.run import affinity
from tests.conftest import scenario_dict


@pytest.mark.parametrize("cpus, clients, client, engine", [
    ({0, 1}, 1, [1], [0]),
    ({0, 1, 2, 3, 4, 5, 6, 7}, 1, [7], [0, 1, 2, 3, 4, 5, 6]),
    ({0, 1, 2, 3, 4, 5, 6, 7}, 2, [6, 7], [0, 1, 2, 3, 4, 5]),
    ({2, 3, 5, 9}, 8, [5, 9], [2, 3]),  # never more than half for the clients
])
def test_the_load_generator_gets_one_cpu_per_client_and_the_engine_the_rest(monkeypatch, cpus, clients, client,
                                                                             engine):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: cpus)
    split = affinity.plan(True, clients)
    assert (split.isolated, split.client_cpus, split.engine_cpus) == (True, client, engine)
    assert split.describe().startswith(f"load generator on CPU {', '.join(map(str, client))}, engine on CPU")


def test_no_isolation_says_why(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {3})
    assert affinity.plan(True).why == "only CPU 3 is available" and not affinity.plan(True).isolated
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    off = affinity.plan(False)
    assert not off.isolated and off.describe() == ("load generator and engine on the same CPUs: "
                                                   "resources.isolate_client is false")


@pytest.mark.slow
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="isolation needs 2 CPUs")
def test_the_engine_and_the_load_generator_run_on_their_own_cpus(tiny_model, write_scenario, tmp_path):
    """A launched server and the engine's threads on the engine's CPUs, the event loop on the client's, the engine's
    thread count one per CPU it got; with isolate_client: false, everything everywhere."""
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    options = {"ttft_s": 0.005, "itl_s": 0.001, "server": True, "record_affinity": True}
    backends = [{"name": "isolated", "kind": "scripted", "options": options},
                {"name": "shared", "kind": "scripted", "options": options, "resources": {"isolate_client": False}}]
    path = write_scenario(scenario_dict(tiny_model, backends))
    assert Runner(load_scenario(path), str(path), tmp_path / "out").run() == 0
    cells = {c["backend"]: c for c in json.loads((tmp_path / "out" / "results.json").read_text())["cells"]}
    every = sorted(os.sched_getaffinity(0))
    client, engine = every[-1:], every[:-1]
    assert cells["isolated"]["cpu_isolation"] == {"isolated": True, "why": f"{len(every)} CPUs available",
                                                  "client_cpus": client, "engine_cpus": engine}
    seen = json.loads((tmp_path / "out" / "cells" / cells["isolated"]["id"] / "affinity.json").read_text())
    assert seen == {"loop": client, "engine_thread": engine, "server": engine, "engine_threads": len(engine)}
    assert cells["shared"]["cpu_isolation"]["isolated"] is False
    seen = json.loads((tmp_path / "out" / "cells" / cells["shared"]["id"] / "affinity.json").read_text())
    assert seen == {"loop": every, "engine_thread": every, "server": every, "engine_threads": None}
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"load generator on CPU {client[0]}, engine on CPU" in report
    assert "load generator and engine on the same CPUs: resources.isolate_client is false" in report
