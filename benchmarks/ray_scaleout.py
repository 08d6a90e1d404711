"""Scale-out on Ray (issue 16), two measurements. Not a test: run it on a quiet machine.

    .venv/bin/python -m benchmarks.ray_scaleout [--part executor|generators|both] [--cell-seconds 2]
        [--rates 25 50 100 200 400] [--seconds 5] [--generators 1 2 4] [--out results/ray-scaleout]

(with -m from the repository's root: the scripted backend is the tests' own, tests/scripted_backend.py)

executor: an 8-cell scenario (the scripted in-process backend, each cell a fixed `--cell-seconds` of requests) run
  locally, then with --executor ray on a local cluster of two nodes (ray.cluster_utils.Cluster, one CPU each):
  wall times, their ratio (ideal: 1/2), and the overhead per cell, (wall_ray - wall_local / 2) × 2 / 8.
generators: at each Poisson rate, a cell against the scripted server (harness/calibrate.py: TTFT 5 ms, ITL 2 ms) with
  1, 2 and 4 generators (load.generators; 1: the worker alone); a rate is sustained when the arrival rate the server
  saw is within 5% of the offered and the TPOT p50 within 0.5 ms of the server's. Prints the highest sustained rate
  per generator count.
Writes OUT/ray_scaleout.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
TTFT_MS, ITL_MS, OUTPUT_TOKENS = 5.0, 2.0, 16
CELLS, NODES = 8, 2


def run(scenario: dict, out: Path, executor=None) -> tuple[int, float]:
    from harness.config.load import load_scenario
    from harness.run.runner import Runner

    out.mkdir(parents=True, exist_ok=True)
    path = out / "scenario.yaml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    t0 = time.perf_counter()
    code = Runner(load_scenario(path), str(path), out / "results", executor=executor).run()
    return code, time.perf_counter() - t0


def executor_part(model: Path, cell_seconds: float, out: Path) -> dict:
    from harness.run.ray_executor import RayExecutor

    # 4 backends × 2 workloads; each cell sends 10 requests one after another, each cell_seconds / 10 long.
    per_request = cell_seconds / 10
    backends = [{"name": f"s{k}", "kind": "scripted",
                 "options": {"ttft_s": per_request / 2, "itl_s": per_request / 2 / 3}} for k in range(4)]
    workloads = [{"name": f"w{k}", "input_tokens": 8, "output_tokens": 4, "num_requests": 10, "warmup_requests": 0}
                 for k in range(2)]
    scenario = {"name": "ray-scaleout", "models": {"tiny": {"path": str(model)}}, "backends": backends,
                "workloads": workloads, "repetitions": 1}
    code_local, local = run(scenario, out / "local")
    code_ray, remote = run(scenario, out / "ray", RayExecutor(max_retries=0))
    return {"cells": CELLS, "nodes": NODES, "cell_seconds": cell_seconds, "wall_local_s": local, "wall_ray_s": remote,
            "ratio": remote / local, "ideal_ratio": 1 / NODES,
            "overhead_per_cell_s": (remote - local / NODES) * NODES / CELLS,
            "exit_codes": {"local": code_local, "ray": code_ray}}


def generator_point(url: str, model: Path, rate: float, seconds: float, generators: int, out: Path) -> dict:
    from harness.records import load_run
    from harness.records import Distribution
    from harness.results.catalogue import rate as rate_of

    n = max(50, math.ceil(rate * seconds))
    load = {"type": "poisson", "rate": rate}
    if generators > 1:
        load |= {"generators": generators, "client_placement": {"num_cpus": 0}}
    scenario = {"name": "ray-generators", "models": {"tiny": {"path": str(model)}},
                "backends": [{"name": "scripted", "kind": "openai", "url": url + "/v1"}],
                "workloads": [{"name": "w", "input_tokens": 16, "output_tokens": OUTPUT_TOKENS, "num_requests": n,
                               "warmup_requests": 1, "load": load}], "repetitions": 1}
    httpx.post(url + "/scripted/reset").raise_for_status()
    code, _ = run(scenario, out)
    (cell,) = load_run(out / "results").cells
    truth = httpx.get(f"{url}/scripted/stats?last={n}").json()
    if code != 0 or not cell.ok:
        return {"rate": rate, "generators": generators, "status": f"failed: {cell.error_line}"}
    m = cell.metrics
    server_rate = rate_of(truth["arrivals"])
    tpot_error_ms = m.value("tpot_ms.p50") - Distribution.of(truth["tpot_ms"]).p50
    return {"rate": rate, "generators": generators, "requests": n, "status": "ok", "server_rate": server_rate,
            "achieved_rate": m.value("achieved_rate_rps"),
            "ttft_error_ms": m.value("ttft_ms.p50") - Distribution.of(truth["ttft_ms"]).p50,
            "tpot_error_ms": tpot_error_ms,
            "offset_error_ms": max((c.offset_error_s * 1e3 for c in cell.clients), default=0.0),
            "sustained": server_rate is not None and server_rate >= 0.95 * rate and abs(tpot_error_ms) <= 0.5}


def generators_part(model: Path, rates: list[float], seconds: float, counts: list[int], out: Path,
                    address: str) -> dict:
    from harness.calibrate import scripted_server

    os.environ["RAY_ADDRESS"] = address  # the workers' generators join the benchmark's cluster
    rows = []
    with scripted_server(out / "server", TTFT_MS, ITL_MS) as url:
        for g in counts:
            for rate in rates:
                rows.append(generator_point(url, model, rate, seconds, g, out / f"g{g}-rate{rate:g}"))
                print(json.dumps(rows[-1]), flush=True)
    best = {g: max((r["rate"] for r in rows if r["generators"] == g and r.get("sustained")), default=None)
            for g in counts}
    return {"rows": rows, "max_sustained_rate": best}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["executor", "generators", "both"], default="both")
    parser.add_argument("--cell-seconds", type=float, default=2.0)
    parser.add_argument("--rates", type=float, nargs="+", default=[25, 50, 100, 200, 400])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--generators", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--out", type=Path, default=ROOT / "results/ray-scaleout")
    a = parser.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    from harness.inputs.models import cached_synthetic

    # The scripted backend is the tests' (tests/scripted_backend.py): workers load it through this variable.
    os.environ["LLMBENCH_PLUGINS"] = "tests.scripted_backend"
    model = cached_synthetic("tiny-llama")
    store = 100 * 1024**2
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "object_store_memory": store})
    for _ in range(NODES):
        cluster.add_node(num_cpus=1, object_store_memory=store)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="warning")
    result: dict = {}
    try:
        if a.part in ("executor", "both"):
            result["executor"] = executor_part(model, a.cell_seconds, a.out / "executor")
            print(json.dumps(result["executor"]), flush=True)
        if a.part in ("generators", "both"):
            result["generators"] = generators_part(model, a.rates, a.seconds, a.generators, a.out / "generators",
                                                   cluster.address)
            print("highest rate sustained (server rate ≥ 95% of offered, |TPOT error| ≤ 0.5 ms):",
                  json.dumps(result["generators"]["max_sustained_rate"]))
    finally:
        ray.shutdown()
        cluster.shutdown()
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "ray_scaleout.json").write_text(json.dumps(result, indent=1))
    print(f"written: {a.out / 'ray_scaleout.json'}")


if __name__ == "__main__":
    main()
