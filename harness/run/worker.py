"""One cell in its own process: start the backend, warm it up, send each repetition's requests under the load
pattern, and write raw request records. A crash, OOM or hang here cannot take down the runner.

Run as `python -m harness.run.worker CELL_DIR`; reads the CellPlan in CELL_DIR/cell.json, writes
CELL_DIR/requests.jsonl (appended per request), CELL_DIR/timeline.json and the WorkerReport in CELL_DIR/worker.json,
and prints one JSON line per finished request for the runner's progress bar.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import traceback
from dataclasses import asdict
from pathlib import Path

from backends.base import Backend
from backends.registry import get_backend_class
from harness.core.errors import BackendError
from harness.core.events import CellContext, ModelInfo, Request, TokenEvent, Usage, now
from harness.core.files import atomic_write
from harness.measure.disk import check_disk_space, drop_page_cache
from harness.measure.monitor import ResourceMonitor, over_budget
from harness.measure.phases import request_phases
from harness.records import CellPlan, ConcurrencyCap, RequestRecord, Span, WorkerReport
from harness.run.loadgen import load_width, run_load


async def measure(backend: Backend, request: Request, repetition: int, keep_ids: bool) -> RequestRecord:
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


class Cell:
    """The worker's state for one cell: its plan, backend, records so far and the report being filled in."""

    def __init__(self, cell_dir: Path):
        self.dir = cell_dir
        self.plan = CellPlan.model_validate_json((cell_dir / "cell.json").read_text())
        self.report = WorkerReport(t_start=now())
        self.records: list[RequestRecord] = []  # warm-up included: its time is split into phases too

    async def run(self) -> WorkerReport:
        plan, report = self.plan, self.report
        try:
            ctx = CellContext(dir=self.dir, seed=plan.seed, vram_budget=plan.vram_budget)
            backend = get_backend_class(plan.backend.kind, plan.backend.options)(
                plan.backend, ModelInfo(plan.model_name, plan.model_path), ctx)
            need = backend.disk_need()
            if need and (problem := check_disk_space(*need)):
                raise BackendError(f"disk preflight: {problem}")
            if plan.resources.drop_page_cache:
                drop_page_cache([plan.model_path, *backend.offload_dirs()])
            monitor = ResourceMonitor(os.getpid(), plan.resources.sample_interval_ms,
                                      offload_dirs=backend.offload_dirs(), torch_allocator=backend.torch_allocator(),
                                      cache_paths=[plan.model_path])
            try:
                with monitor:
                    try:
                        await self.exercise(backend)
                        report.logical_io = backend.logical_io()
                    finally:
                        await self.stop(backend)
            finally:
                load = (report.load.start, report.load.end) if report.load else None
                phases = request_phases(self.records, load)
                resources = monitor.result(phases)
                resources["vram_budget_bytes"] = plan.vram_budget
                resources["over_budget"] = over_budget(resources, plan.vram_budget)
                report.resources = resources
                atomic_write(self.dir / "timeline.json", json.dumps(monitor.timeline(phases)))
            report.status, report.error = "ok", None
        except BaseException as e:  # the cell fails; the runner reads why from here
            if isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
                report.error = "interrupted"
            else:
                report.error = str(e) if isinstance(e, BackendError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, (BackendError, KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                traceback.print_exc()
            if not isinstance(e, Exception):
                raise
        finally:
            atomic_write(self.dir / "worker.json", report.model_dump_json(indent=1))
        return report

    async def exercise(self, backend: Backend) -> None:
        """Start the backend, warm it up, then send each repetition's requests under the load pattern."""
        plan, report, workload = self.plan, self.report, self.plan.workload
        prompts = json.loads(plan.prompts_file.read_text())

        def request(i: int) -> Request:
            p = prompts[i]
            return Request(id=i, prompt=p["text"], prompt_token_ids=p["token_ids"], max_tokens=workload.output_tokens,
                           temperature=workload.temperature, seed=plan.seed + i)

        t0 = now()
        await backend.start()
        report.load = Span(start=t0, end=now())
        report.load_time_s = report.load.end - t0
        report.environment = backend.environment()
        report.capabilities = asdict(backend.capabilities)
        limit = backend.capabilities.max_concurrency
        width = load_width(workload.load)
        if limit is not None and (width is None or width > limit):
            report.concurrency_cap = ConcurrencyCap(requested=width or workload.num_requests, max_concurrency=limit)
        for i in range(workload.warmup_requests):
            self.records.append(await measure(backend, request(i), -1, False))
        first = workload.warmup_requests
        with (self.dir / "requests.jsonl").open("w") as records_file:
            for rep in range(plan.repetitions):
                # Fresh prompts per repetition: a prefix cache must not make later repetitions look faster.
                reqs = [request(first + rep * workload.num_requests + j) for j in range(workload.num_requests)]

                async def send(req: Request, rep=rep) -> RequestRecord:
                    rec = await measure(backend, req, rep, plan.record_outputs)
                    self.records.append(rec)
                    records_file.write(rec.to_json() + "\n")
                    records_file.flush()
                    print(json.dumps({"done": rec.id, "ok": rec.ok}), flush=True)
                    return rec

                t_rep = now()
                records = await run_load(workload.load, reqs, send, seed=plan.seed + rep, max_concurrency=limit)
                report.repetitions.append(Span(start=t_rep, end=now()))
                if not any(r.ok for r in records):
                    raise BackendError(f"every request failed; first error: {records[0].error}")
        report.server_metrics = await backend.server_metrics()

    async def stop(self, backend: Backend) -> None:
        try:
            await backend.stop()
        except Exception as e:
            self.report.stop_error = f"{type(e).__name__}: {e}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main() -> None:
    # SIGTERM from the runner (Ctrl-C, timeout) unwinds like Ctrl-C, so backend.stop() tears servers down.
    signal.signal(signal.SIGTERM, _interrupt)
    report = asyncio.run(Cell(Path(sys.argv[1])).run())
    sys.exit(0 if report.status == "ok" else 1)


if __name__ == "__main__":
    main()
