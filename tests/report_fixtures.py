"""Results for report and guide tests: one small real run on the scripted backend, and results folders built from
synthetic requests.

Synthetic cells go through the real reducer (harness.results.metrics), so their metrics are what a run with those
request timings would have stored; only the timings and the resource numbers are made up.
Loaded by the report/guide test modules with `pytest_plugins`, so the scripted run happens once per session; those
modules also import its helpers first, hence PYTEST_DONT_REWRITE (its one assert carries its own message).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


import pytest
from pydantic import TypeAdapter

from harness.records import RequestRecord
from harness.results.metrics import CellMetrics, reduce_cell
from harness.config.scenario import SLO

REDUCED = TypeAdapter(CellMetrics)  # the reducer's blocks as results.json stores them

ROOT = Path(__file__).resolve().parent.parent
GiB = 2**30


def environment(cpu: str = "Test CPU", gpu: str | None = None) -> dict[str, Any]:
    return {
        "llmbench": {"version": "0.1.0", "git_sha": "0" * 40}, "python": "3.11.7", "os": "Linux-test",
        "hostname": "testhost", "cpu": {"model": cpu, "logical_cores": 8, "physical_cores": 4}, "ram_bytes": 32 * GiB,
        "gpu": ({"available": True, "driver": "550.0", "cuda_driver": "12.4",
                 "devices": [{"index": 0, "name": gpu, "memory_bytes": 8 * GiB}]} if gpu
                else {"available": False, "reason": "NVML: NVML Shared Library Not Found"}),
        "packages": {"torch": "2.13.0", "transformers": "5.23.0"},
    }


def cell_id(model: str, backend: str, workload: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "_.-" else "_" for ch in f"{model}__{backend}__{workload}")


class ResultsBuilder:
    """Build a results folder cell by cell: `add(...)` then `write()`."""

    def __init__(self, out: Path, name: str = "synthetic", env: dict[str, Any] | None = None,
                 slo: SLO = SLO(ttft_ms=500, tpot_ms=50), repetitions: int = 2):
        self.out, self.name, self.env, self.slo, self.repetitions = out, name, env or environment(), slo, repetitions
        self.cells: list[dict[str, Any]] = []
        self.workloads: dict[str, dict[str, Any]] = {}
        self.backends: dict[str, str] = {}

    def add(self, backend: str, workload: dict[str, Any], ttft_s: float, tpot_s: float, *, model: str = "m",
            sweep: dict[str, Any] | None = None, base: str | None = None, kind: str = "transformers",
            device: str = "cpu", resources: dict[str, Any] | None = None, timeline: dict[str, Any] | None = None,
            request_errors: dict[int, str] | None = None, failed: str | None = None,
            load_time_s: float = 2.0, rep_scale: list[float] | None = None,
            logical_io: dict[str, Any] | None = None, client_lag_s: float = 0.0) -> dict[str, Any]:
        """One cell whose requests take `ttft_s` to the first token and `tpot_s` per token after it; `rep_scale`
        slows each repetition by its factor; each request left `client_lag_s` after its scheduled time."""
        name = workload["name"]
        cid = cell_id(model, backend, name)
        self.backends[backend] = kind
        self.workloads.setdefault(base or name, {**workload, "name": base or name})
        cell: dict[str, Any] = {"id": cid, "model": model, "backend": backend, "workload": name, "backend_kind": kind}
        if sweep:
            cell |= {"base_workload": base, "sweep": sweep, "workload_spec": workload}
        if failed:
            self.cells.append(cell | {"status": "failed", "error": failed, "metrics": None, "repetitions": []})
            return self.cells[-1]
        records = self.records(workload, ttft_s, tpot_s, request_errors or {}, rep_scale)
        for r in records:
            r.t_scheduled = r.t_send - client_lag_s
        d = self.out / "cells" / cid
        d.mkdir(parents=True, exist_ok=True)
        (d / "requests.jsonl").write_text("".join(r.to_json() + "\n" for r in records))
        if timeline:
            (d / "timeline.json").write_text(json.dumps(timeline))
        reduced = REDUCED.dump_python(reduce_cell(records, self.repetitions, self.slo, 0.25), mode="json")
        cell |= {"status": "ok", "error": None, **reduced,
                 "load_time_s": load_time_s, "engine": {"engine": kind, "device": device},
                 "requests_file": f"cells/{cid}/requests.jsonl", "logical_io": logical_io}
        if resources is not None:
            cell["resources"] = resources
        self.cells.append(cell)
        return cell

    def records(self, w: dict[str, Any], ttft0: float, tpot0: float, errors: dict[int, str],
                rep_scale: list[float] | None) -> list[RequestRecord]:
        conc = (w.get("load") or {}).get("concurrency", 1)
        n_out = w["output_tokens"]
        out = []
        for rep in range(self.repetitions):
            scale = rep_scale[rep] if rep_scale else 1.0
            ttft_s, tpot_s = ttft0 * scale, tpot0 * scale
            e2e = ttft_s + tpot_s * (n_out - 1)
            for i in range(w["num_requests"]):
                # `conc` requests start together, the next wave when they end; a small jitter per request.
                t_send = rep * 1000.0 + (i // conc) * e2e
                jitter = 1 + 0.02 * (i % 5)
                times = [t_send + ttft_s * jitter + k * tpot_s for k in range(n_out)]
                err = errors.get(i)
                out.append(RequestRecord(id=i, repetition=rep, t_send=t_send, chunk_times=[] if err else times,
                                         chunk_tokens=[] if err else [1] * n_out, input_tokens=w["input_tokens"],
                                         output_tokens=None if err else n_out, input_source="engine",
                                         output_source="engine", exact_length=True, error=err))
        return out

    def write(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        scenario = {"name": self.name, "models": {"m": {"path": "/models/m", "synthetic": None}},
                    "backends": [{"name": b, "kind": k, "options": {}} for b, k in self.backends.items()],
                    "workloads": list(self.workloads.values()), "repetitions": self.repetitions, "seed": 0,
                    "slo": self.slo.model_dump(), "record_outputs": False}
        data = {"schema_version": 1, "created": "2026-01-01T00:00:00+00:00", "updated": "2026-01-01T00:01:00+00:00",
                "scenario_file": "synthetic.yaml", "scenario": scenario, "environment": self.env, "cells": self.cells}
        (self.out / "results.json").write_text(json.dumps(data, indent=1))
        return self.out


def workload(name: str, input_tokens: int = 64, output_tokens: int = 16, num_requests: int = 8,
             concurrency: int | None = None) -> dict[str, Any]:
    load = {"type": "concurrency", "concurrency": concurrency} if concurrency else {"type": "sequential"}
    return {"name": name, "input_tokens": input_tokens, "output_tokens": output_tokens,
            "num_requests": num_requests, "load": load, "warmup_requests": 1}


def resources(vram: float | None, budget: float | None = 8 * GiB, rss: float = 3 * GiB) -> dict[str, Any]:
    """A resources block whose absolute peak VRAM is `vram` (None: no GPU), as the monitor stores it."""
    # NVML peaks are stored above the idle baseline (docs/resources.md): 0.25 GiB of CUDA context here.
    base = 0.25 * GiB if vram is not None else None
    above = vram - base if vram is not None else None
    whole = {"max_rss_bytes": rss, "cpu_percent_mean": 90.0, "disk_read_bytes": 2 * GiB, "disk_write_bytes": 0,
             "max_global_vram_bytes": above, "max_process_vram_bytes": above, "max_allocated_bytes": None,
             "max_reserved_bytes": None, "energy_j": None, "duration_s": 10.0}
    nvml_missing = "NVML: NVML Shared Library Not Found"
    return {"sample_interval_ms": 20, "page_cache": "warm",
            "baseline": {"rss_bytes": GiB // 2, "global_vram_bytes": base, "process_vram_bytes": base},
            "unavailable": {} if vram is not None else {"max_global_vram_bytes": nvml_missing,
                                                        "max_process_vram_bytes": nvml_missing},
            "vram_budget_bytes": budget, "over_budget": bool(vram and budget and vram > budget),
            "whole": whole, "phases": {}}


def timeline(seconds: int = 10, vram: bool = True) -> dict[str, Any]:
    t = [i * 0.1 + 0.05 for i in range(seconds * 10)]
    return {"t": t, "rss_bytes": [GiB * (1 + min(x, 3) / 3) for x in t],
            "disk_read_bps": [5e8 if x < 3 else 1e6 for x in t], "disk_write_bps": [0.0 for _ in t],
            "global_vram_bytes": [GiB * min(x, 5) for x in t] if vram else None,
            "process_vram_bytes": [GiB * min(x, 4.5) for x in t] if vram else None,
            "phases": [["load", 0.0, 3.0], ["idle", 3.0, 3.5], ["prefill", 3.5, 4.0], ["decode", 4.0, 9.5], ["idle", 9.5, 10.0]]}


def swept_gpu_results(out: Path) -> Path:
    """Two GPU backends: `fastgpu` is quicker but outgrows 8 GiB at 32k context; `offload` always fits.

    Under load (a concurrency sweep), `fastgpu` leads at concurrency 1 and `batcher` overtakes it from 4 on.
    """
    b = ResultsBuilder(out, "sweeps", environment(cpu="Test CPU", gpu="NVIDIA GeForce RTX 3060 Ti"))
    for n_in, vram_fast in ((8192, 5.0), (16384, 7.0), (32768, 9.5)):
        w = workload(f"long[input_tokens={n_in}]", input_tokens=n_in, output_tokens=16, num_requests=4)
        sweep = {"input_tokens": n_in}
        b.add("fastgpu", w, ttft_s=0.2 * n_in / 8192, tpot_s=0.02, sweep=sweep, base="long", device="cuda:0",
              resources=resources(vram_fast * GiB), timeline=timeline() if n_in == 8192 else None)
        b.add("offload", w, ttft_s=0.9 * n_in / 8192, tpot_s=0.2, sweep=sweep, base="long", kind="own",
              device="cuda:0", resources=resources((3 + n_in / 32768) * GiB))
    for conc, (fast_tpot, batch_tpot) in ((1, (0.005, 0.008)), (4, (0.020, 0.009)), (16, (0.080, 0.012))):
        w = workload(f"chat[load.concurrency={conc}]", input_tokens=256, output_tokens=32, num_requests=16,
                     concurrency=conc)
        sweep = {"load.concurrency": conc}
        b.add("fastgpu", w, ttft_s=0.05, tpot_s=fast_tpot, sweep=sweep, base="chat", device="cuda:0",
              resources=resources(4 * GiB))
        b.add("batcher", w, ttft_s=0.08, tpot_s=batch_tpot, sweep=sweep, base="chat", kind="vllm", device="cuda:0",
              resources=resources(6 * GiB))
    return b.write()


@pytest.fixture(scope="session")
def scripted_results(tiny_model, tmp_path_factory) -> Path:
    """A results folder as `bench run` writes it (requests.jsonl, cells, environment), from two scripted backends run
    in this process: for the report and guide tests that need a real run's shape but no engine's numbers."""
    from tests.conftest import run_scenario, scenario_dict

    backends = [{"name": "fast", "kind": "scripted", "options": {"ttft_s": 0.005, "itl_s": 0.001}},
                {"name": "slow", "kind": "scripted", "options": {"ttft_s": 0.01, "itl_s": 0.002}}]
    out, _ = run_scenario(scenario_dict(tiny_model, backends), tmp_path_factory.mktemp("scripted"), write_report=False)
    return out


def hacked(results: Path, out: Path, payload: str) -> Path:
    """A copy of a results folder with `payload` in names, errors and a request's error."""
    import shutil

    shutil.copytree(results, out)
    data = json.loads((out / "results.json").read_text())
    original = copy.deepcopy(data["cells"][0])
    data["cells"][0]["backend"] = payload
    data["cells"][0]["model"] = f"model|{payload}"
    data["scenario"]["backends"][0]["name"] = payload
    data["environment"]["cpu"]["model"] = payload
    failed = {**original, "id": original["id"] + "_failed", "status": "failed", "metrics": None, "repetitions": [],
              "backend": f"{payload}[x](http://evil.example/a.png)", "error": f"{payload}\nTraceback follows"}
    data["cells"].append(failed)
    data["cells"][0]["metrics"]["errors"] = 1
    (out / "results.json").write_text(json.dumps(data))
    req = out / original["requests_file"]
    lines = req.read_text().splitlines()
    first = json.loads(lines[0])
    first |= {"error": f"server said {payload}", "chunk_times": [], "chunk_tokens": []}
    req.write_text("\n".join([json.dumps(first)] + lines[1:]) + "\n")
    return out
