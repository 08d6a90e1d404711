"""One cell in its own process: start the backend, warm it up, send each repetition's requests under the load
pattern, and write raw request records. A crash, OOM or hang here cannot take down the runner.

Run as `python -m harness.worker CELL_DIR`; reads CELL_DIR/cell.json, writes CELL_DIR/requests.jsonl (appended
per request) and CELL_DIR/worker.json, and prints one JSON line per finished request for the runner's progress bar.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from pathlib import Path

from backends.base import BackendError, CellContext, ModelInfo, Request, TokenEvent, Usage, now
from backends.registry import get_backend_class
from harness.disk import check_disk_space, drop_page_cache
from harness.loadgen import run_load
from harness.monitor import ResourceMonitor, over_budget
from harness.metrics import RequestRecord
from harness.results import atomic_write
from harness.scenario import BackendSpec, Workload


async def measure(backend, request: Request, repetition: int, keep_ids: bool) -> RequestRecord:
    rec = RequestRecord(id=request.id, repetition=repetition, t_send=now())
    ids: list[int] = []
    try:
        async for ev in backend.generate(request):
            if isinstance(ev, TokenEvent):
                rec.chunk_times.append(ev.t)
                rec.chunk_tokens.append(ev.n_tokens)
                ids.extend(ev.token_ids or [])
            elif isinstance(ev, Usage):
                rec.input_tokens, rec.output_tokens = ev.prompt_tokens, ev.output_tokens
                rec.input_source, rec.output_source = ev.prompt_source, ev.output_source
                rec.finish_reason, rec.exact_length = ev.finish_reason, ev.exact_length
        if not rec.chunk_times:
            rec.error = "the stream ended without a generated token"
    except Exception as e:  # one failed request is counted, the others go on
        rec.error = f"{type(e).__name__}: {e}"
    if keep_ids:
        rec.output_token_ids = ids
    return rec


async def run_cell(cell_dir: Path) -> dict:
    spec = json.loads((cell_dir / "cell.json").read_text())
    ctx = CellContext(dir=cell_dir, seed=spec["seed"], vram_budget=spec.get("vram_budget"))
    report: dict = {"status": "failed", "error": None, "environment": {}, "repetitions": []}
    t_start = now()
    try:
        bspec = BackendSpec.model_validate(spec["backend"])
        model_path = Path(spec["model"]["path"])
        backend = get_backend_class(bspec.kind)(bspec, ModelInfo(spec["model"]["name"], model_path), ctx)
        res = spec["resources"]
        need = backend.disk_need()
        if need and (problem := check_disk_space(*need)):
            raise BackendError(f"disk preflight: {problem}")
        if res["drop_page_cache"]:
            drop_page_cache([model_path, *backend.offload_dirs()])
        monitor = ResourceMonitor(os.getpid(), res["sample_interval_ms"], offload_dirs=backend.offload_dirs(),
                                  torch_allocator=backend.torch_allocator(), cache_paths=[model_path])
        try:
            with monitor:
                try:
                    await exercise(backend, spec, ctx, report)
                    report["logical_io"] = backend.logical_io()
                finally:
                    await stop(backend, report)
        finally:
            report["resources"] = resources_block(monitor, ctx)
            atomic_write(cell_dir / "timeline.json", json.dumps(monitor.timeline(ctx.phase_marks)))
        report["status"], report["error"] = "ok", None
    except BaseException as e:  # the cell fails; the runner reads why from here
        if isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
            report["error"] = "interrupted"
        else:
            report["error"] = str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}"
        if not isinstance(e, (BackendError, KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
            traceback.print_exc()
        if not isinstance(e, Exception):
            raise
    finally:
        report["t_start"], report["phase_marks"] = t_start, ctx.phase_marks
        atomic_write(cell_dir / "worker.json", json.dumps(report, indent=1))
    return report


async def exercise(backend, spec: dict, ctx: CellContext, report: dict) -> None:
    """Start the backend, warm it up, then send each repetition's requests under the load pattern."""
    workload = Workload.model_validate(spec["workload"])
    prompts = json.loads(Path(spec["prompts_file"]).read_text())

    def request(i: int) -> Request:
        p = prompts[i]
        return Request(id=i, prompt=p["text"], prompt_token_ids=p["token_ids"], max_tokens=workload.output_tokens,
                       temperature=spec.get("temperature", 0.0), seed=spec["seed"] + i)

    t0 = now()
    await backend.start()
    report["load_time_s"] = now() - t0
    report["environment"] = backend.environment()
    for i in range(workload.warmup_requests):
        await measure(backend, request(i), -1, False)
    first = workload.warmup_requests
    with (ctx.dir / "requests.jsonl").open("w") as records_file:
        for rep in range(spec["repetitions"]):
            # Fresh prompts per repetition: a prefix cache must not make later repetitions look faster.
            reqs = [request(first + rep * workload.num_requests + j) for j in range(workload.num_requests)]

            async def send(req: Request, rep=rep) -> RequestRecord:
                rec = await measure(backend, req, rep, spec["record_outputs"])
                records_file.write(json.dumps(rec.to_dict()) + "\n")
                records_file.flush()
                print(json.dumps({"done": rec.id, "ok": rec.ok}), flush=True)
                return rec

            t_rep = now()
            records = await run_load(workload.load, reqs, send, seed=spec["seed"] + rep)
            report["repetitions"].append({"start": t_rep, "end": now()})
            if not any(r.ok for r in records):
                raise BackendError(f"every request failed; first error: {records[0].error}")
    report["server_metrics"] = await backend.server_metrics()


async def stop(backend, report: dict) -> None:
    try:
        await backend.stop()
    except Exception as e:
        report["stop_error"] = f"{type(e).__name__}: {e}"


def resources_block(monitor: ResourceMonitor, ctx: CellContext) -> dict:
    res = monitor.result(ctx.phase_marks)
    res["vram_budget_bytes"] = ctx.vram_budget
    res["over_budget"] = over_budget(res, ctx.vram_budget)
    return res


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM from the runner (Ctrl-C, timeout) unwinds like Ctrl-C, so backend.stop() tears servers down.
    signal.signal(signal.SIGTERM, _interrupt)
    report = asyncio.run(run_cell(Path(sys.argv[1])))
    sys.exit(0 if report["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
