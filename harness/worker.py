"""One cell in its own process: start the backend, warm it up, send each repetition's requests under the load
pattern, and write raw request records. A crash, OOM or hang here cannot take down the runner.

Run as `python -m harness.worker CELL_DIR`; reads CELL_DIR/cell.json, writes CELL_DIR/requests.jsonl (appended
per request) and CELL_DIR/worker.json, and prints one JSON line per finished request for the runner's progress bar.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import traceback
from pathlib import Path

from backends.base import BackendError, CellContext, ModelInfo, Request, TokenEvent, Usage, now
from backends.registry import get_backend_class
from harness.loadgen import run_load
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
    workload = Workload.model_validate(spec["workload"])
    ctx = CellContext(dir=cell_dir, seed=spec["seed"], vram_budget=spec.get("vram_budget"))
    report: dict = {"status": "failed", "error": None, "environment": {}, "repetitions": []}
    backend = None

    def request(i: int) -> Request:
        p = prompts[i]
        return Request(id=i, prompt=p["text"], prompt_token_ids=p["token_ids"], max_tokens=workload.output_tokens,
                       temperature=spec.get("temperature", 0.0), seed=spec["seed"] + i)

    records_file = (cell_dir / "requests.jsonl").open("w")
    t_start = now()
    try:
        prompts = json.loads(Path(spec["prompts_file"]).read_text())
        bspec = BackendSpec.model_validate(spec["backend"])
        backend = get_backend_class(bspec.kind)(bspec, ModelInfo(spec["model"]["name"], Path(spec["model"]["path"])), ctx)
        await backend.start()
        report["load_time_s"] = now() - t_start
        report["environment"] = backend.environment()
        for i in range(workload.warmup_requests):
            await measure(backend, request(i), -1, False)
        first = workload.warmup_requests
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
        records_file.close()
        try:
            if backend is not None:
                await backend.stop()
        except Exception as e:
            report["stop_error"] = f"{type(e).__name__}: {e}"
        report["t_start"], report["phase_marks"] = t_start, ctx.phase_marks
        atomic_write(cell_dir / "worker.json", json.dumps(report, indent=1))
    return report


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM from the runner (Ctrl-C, timeout) unwinds like Ctrl-C, so backend.stop() tears servers down.
    signal.signal(signal.SIGTERM, _interrupt)
    report = asyncio.run(run_cell(Path(sys.argv[1])))
    sys.exit(0 if report["status"] == "ok" else 1)


if __name__ == "__main__":
    main()
