"""One cell in its own process: start the backend, warm it up, send each repetition's requests under the load
pattern, and write raw request records. A crash, OOM or hang here cannot take down the runner.

Run as `python -m harness.run.worker CELL_DIR`; reads the CellPlan from stdin (the runner's, secrets included) or
else CELL_DIR/cell.json (secrets masked), writes
CELL_DIR/requests.jsonl (appended per request), CELL_DIR/timeline.json and the WorkerReport in CELL_DIR/worker.json,
and prints one JSON line per finished request for the runner's progress bar. With `load.clients: N` it starts
N - 1 more client processes, `python -m harness.run.worker CELL_DIR --client K N` (harness/run/clients.py).

While requests are in flight the event loop only sends, reads and stamps: records and progress lines are written
by a thread (harness/run/eventloop.py), whose probe also records the loop's lag per repetition.

A worker whose runner is gone (its parent changed, or the pipe to it broke), or whose cell.json names another
attempt (a resumed run took the folder over), stops its servers and exits without writing anything more.
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from backends.base import Backend
from backends.registry import get_backend_class
from harness.config.generators import senders
from harness.core.errors import BackendError, describe
from harness.core.events import CellContext, ModelInfo, Request, RequestSent, TokenEvent, Usage, now
from harness.core.files import atomic_write
from harness.core.processes import stop_launched
from harness.core.redact import Redactor
from harness.measure.disk import check_disk_space, drop_page_cache
from harness.measure.monitor import ResourceMonitor, over_budget
from harness.measure.phases import request_phases
from harness.records import (PROMPT_FILE, CellPlan, ConcurrencyCap, EngineInfo, LogicalIO, PromptEntry, RequestRecord,
                             ResourceUsage, ServerMetrics, Span, WorkerReport)
from harness.run import affinity
from harness.run.clients import GO_AHEAD_S, ClientProcesses, client_start, read_commands
from harness.run.eventloop import BackgroundWriter, LoopLagProbe
from harness.run.generators import RayGenerators
from harness.run.conversation import Conversation, Session
from harness.run.loadgen import Due, connections_needed, run_load
from harness.run.saturation import SaturationWatch
from harness.run.strategies import ClientShare, Paced, RunOutcome, strategy_for

# The longest a thread (the record writer, the resource monitor) holds the GIL while the event loop waits for it,
# down from Python's 5 ms: a chunk arriving meanwhile is stamped that much late.
SWITCH_INTERVAL_S = 0.0005


async def measure(backend: Backend, request: Request, repetition: int, keep_ids: bool,
                  t_scheduled: float | None = None) -> RequestRecord:
    rec = RequestRecord(id=request.id, repetition=repetition, t_send=now(), t_scheduled=t_scheduled)
    ids: list[int] = []
    texts: list[str] = []
    try:
        async for ev in backend.generate(request):
            if isinstance(ev, TokenEvent):
                # Events that arrived in the same read (one stamp) are one chunk: a zero gap is no inter-token latency.
                if rec.chunk_times and ev.t == rec.chunk_times[-1]:
                    rec.chunk_tokens[-1] += ev.n_tokens
                else:
                    rec.chunk_times.append(ev.t)
                    rec.chunk_tokens.append(ev.n_tokens)
                ids.extend(ev.token_ids or [])
                if ev.text:
                    texts.append(ev.text)
            elif isinstance(ev, RequestSent):
                rec.t_send = ev.t
            elif isinstance(ev, Usage):
                rec.input_tokens, rec.output_tokens = ev.prompt_tokens, ev.output_tokens
                rec.input_source, rec.output_source = ev.prompt_source, ev.output_source
                rec.finish_reason, rec.exact_length = ev.finish_reason, ev.exact_length
        if not rec.chunk_times:
            rec.error = "the stream ended without a generated token"
    except Exception as e:  # one failed request is counted, the others go on
        rec.error = describe(e)
    if keep_ids:
        rec.output_token_ids = ids
        # After the last stamp: an engine that streams ids only is decoded once, with the model's own tokenizer.
        rec.output_text = "".join(texts) if texts else backend.decode(ids) if ids else None
    return rec


class CellWorker:
    """The worker's state for one cell: its plan, backend, records so far and the report being filled in."""

    def __init__(self, cell_dir: Path, plan_json: str | None = None):
        self.dir = cell_dir
        # The runner sends the plan on stdin: cell.json has its secrets masked (harness/core/redact.py).
        self.plan = CellPlan.model_validate_json(plan_json or (cell_dir / "cell.json").read_text())
        self.report = WorkerReport(t_start=now())
        self.records: list[RequestRecord] = []  # warm-up included: its time is split into phases too
        self.engine_gone: str | None = None  # why the engine can serve nothing more (its server died)
        self._failing = False  # the last request failed
        self.prompts: list[PromptEntry] | None = None
        self.pinning: affinity.Pinning | None = None  # run() plans it before the engine starts
        self.conversation: Conversation | None = None  # prompts: conversation: the sessions' tokenizer and answers
        self.strategy = strategy_for(self.plan.workload.load, self.plan.slo)  # what is sent when

    async def measured(self, backend: Backend, request: Request, repetition: int, keep_ids: bool,
                       t_scheduled: float | None = None) -> RequestRecord | None:
        """measure(), and after a failure whether the engine itself is gone; None (not sent) once it is."""
        if self.engine_gone:
            return None
        rec = await measure(backend, request, repetition, keep_ids, t_scheduled)
        if not rec.ok and not self.engine_gone:
            # The first failure of a streak waits for a dying server to exit; the next ones only look.
            self.engine_gone = await backend.exit_reason(wait_s=0.0 if self._failing else 2.0)
        self._failing = not rec.ok
        return rec

    def check_engine(self) -> None:
        """A dead engine fails the cell, named as such, not as its requests' connection errors."""
        if self.engine_gone:
            served = sum(r.ok for r in self.records if r.repetition >= 0)
            head, _, details = self.engine_gone.partition("\n")
            raise BackendError(f"{head} after {served} requests" + (f"\n{details}" if details else ""))

    async def run(self) -> WorkerReport:
        plan, report = self.plan, self.report
        try:
            split = affinity.plan(plan.resources.isolate_client, senders(plan.workload.load))
            self.pinning, report.cpu_isolation = affinity.Pinning(split), split
            ctx = CellContext(dir=self.dir, seed=plan.seed, vram_budget=plan.vram_budget,
                              concurrency=self.strategy.width, engine_cpus=split.engine_cpus or None)
            cls = get_backend_class(plan.backend.kind, plan.backend.options)
            backend = cls(plan.backend, ModelInfo(plan.model_name, plan.model_path), ctx)
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
                        report.logical_io = LogicalIO.model_validate(io) if (io := backend.logical_io()) else None
                    finally:
                        await self.stop(backend)
            finally:
                load = (report.load.start, report.load.end) if report.load else None
                phases = request_phases(self.records, load)
                resources = monitor.result(phases, [(s.start, s.end) for s in report.repetitions])
                resources["vram_budget_bytes"] = plan.vram_budget
                resources["over_budget"] = over_budget(resources, plan.vram_budget)
                report.resources = ResourceUsage.model_validate(resources)
                self.check_owner()
                atomic_write(self.dir / "timeline.json", json.dumps(monitor.timeline(phases)))
            report.status, report.error = "ok", None
        except BaseException as e:  # the cell fails; the runner reads why from here
            if isinstance(e, (KeyboardInterrupt, asyncio.CancelledError)):
                report.error = "interrupted"
            else:
                report.error = str(e) if isinstance(e, BackendError) else describe(e)
            if not isinstance(e, (BackendError, KeyboardInterrupt, SystemExit, asyncio.CancelledError)):
                traceback.print_exc()
            if not isinstance(e, Exception):
                raise
        finally:
            self.check_owner()
            redact = Redactor(plan.model_dump(mode="json"))
            atomic_write(self.dir / "worker.json", json.dumps(redact(report.model_dump(mode="json")), indent=1))
        return report

    def check_owner(self) -> None:
        """Before writing into the cell's folder: a resumed run that took it over (cell.json names another attempt)
        owns it now, and this worker is an orphan."""
        try:
            attempt = json.loads((self.dir / "cell.json").read_text()).get("attempt")
        except (OSError, ValueError):
            attempt = None
        if attempt != self.plan.attempt:
            orphaned("cell.json names another attempt: a resumed run owns the cell's folder now")

    def request(self, i: int) -> Request:
        if self.prompts is None:
            self.prompts = PROMPT_FILE.validate_json(self.plan.prompts_file.read_bytes())
        p, workload = self.prompts[i], self.plan.workload
        # A length drawn per request is in the entry; else the workload's one number.
        max_tokens = p.max_tokens if p.max_tokens is not None else workload.output_tokens
        return Request(id=i, prompt=p.text, prompt_token_ids=p.token_ids, max_tokens=max_tokens,
                       temperature=workload.temperature, seed=self.plan.seed + i)

    def arrivals(self, requests: list[Request]) -> list[float] | None:
        """A replayed trace's send times (s after the repetition's start), one per request; None for other loads."""
        times = [t for r in requests if (t := self.prompts[r.id].arrival_s) is not None]
        return times if times and len(times) == len(requests) else None

    def repetition_requests(self, rep: int) -> list[Request]:
        # Fresh prompts per repetition: a prefix cache must not make later repetitions look faster.
        w = self.plan.workload
        return [self.request(w.warmup_requests + rep * w.num_requests + j) for j in range(w.num_requests)]

    async def exercise(self, backend: Backend) -> None:
        """Start the backend, warm it up, then send each repetition's requests under the load pattern."""
        report, workload, request = self.report, self.plan.workload, self.request

        self.pinning.engine_phase(asyncio.get_running_loop())  # what the engine starts runs on its CPUs
        t0 = now()
        await backend.prepare()
        report.prepare_time_s = now() - t0
        t0 = now()
        await backend.start()
        report.load = Span(start=t0, end=now())
        report.load_time_s = report.load.end - t0
        report.environment = EngineInfo.model_validate(backend.environment())
        report.capabilities = replace(backend.capabilities)  # as applied now: a copy
        self.pinning.client_phase()  # the event loop, and what it starts from now on, on the load generator's
        limit = backend.capabilities.max_concurrency
        width = self.strategy.width
        if limit is not None and (width is None or width > limit):
            report.concurrency_cap = ConcurrencyCap(requested=width or workload.num_requests, max_concurrency=limit,
                                                    queue_in_latency=True)
        if workload.prompts.type == "conversation":  # only these cells load a tokenizer in the worker
            request(0)
            self.conversation = await asyncio.to_thread(Conversation, self.plan.model_path, self.prompts)
        for i in range(workload.warmup_requests):
            if rec := await self.measured(backend, request(i), -1, False):
                self.records.append(rec)
        self.check_engine()
        self.check_owner()
        redact = Redactor(self.plan.model_dump(mode="json"))
        with (self.dir / "requests.jsonl").open("w") as records_file:
            def write(rec: RequestRecord) -> None:
                if rec.error:  # an engine's message may quote a secret (a URL's password, a header)
                    rec.error = redact(rec.error)
                records_file.write(rec.to_json() + "\n")
                records_file.flush()
                try:
                    print(json.dumps({"done": rec.id, "ok": rec.ok}), flush=True)
                except BrokenPipeError:
                    orphaned("the pipe to the runner is broken")

            writer = BackgroundWriter(write)
            try:
                await self.repetitions(backend, writer, limit)
            finally:
                writer.close()
        scraped = await backend.server_metrics()
        report.server_metrics = ServerMetrics.model_validate(scraped) if scraped else None
        if (reuse := await backend.prefix_reuse()) is not None:
            # Over the same requests as the engine's count: every one the cell sent, warm-up included.
            reuse.prompt_tokens = sum(r.input_tokens or 0 for r in self.records)
            report.prefix_reuse = reuse

    async def repetitions(self, backend: Backend, writer: BackgroundWriter, limit: int | None) -> None:
        """Each run the load's strategy drives (its repetitions, or a capacity search's steps), this process's share
        of it and, with load.clients, the other clients' (their records are written as they arrive, and merged here
        when the run ends)."""
        plan, report, load = self.plan, self.report, self.plan.workload.load
        count = senders(load)
        latency = max((r.e2el for r in self.records if r.ok), default=None)  # the warm-up's
        clients = None
        if count > 1:
            attach = backend.attach_spec()
            if attach is None or limit is not None:
                raise BackendError(f"load.clients: {count} client processes need an engine served over HTTP that "
                                   f"batches requests itself; {plan.backend.kind} "
                                   + ("runs in this process" if attach is None else f"serves {limit} at once"))
            if getattr(load, "generators", None):
                clients = RayGenerators(count, plan.model_dump_json(), attach, writer.put, load.client_placement)
            else:
                clients = ClientProcesses(self.dir, count, plan.model_dump_json(), attach, writer.put)
        try:
            if clients is not None:
                report.clients = await clients.start()
            with LoopLagProbe(asyncio.get_running_loop()) as probe:
                async def run(rep: int, strategy: Paced, may_all_fail: bool) -> RunOutcome:
                    return await self.one_run(backend, writer, limit, rep, strategy, probe, latency, clients,
                                              may_all_fail)

                report.capacity_steps = await self.strategy.drive(run, plan.repetitions, limit, plan.backend.kind)
        finally:
            if clients is not None:
                await asyncio.to_thread(clients.stop)

    async def one_run(self, backend: Backend, writer: BackgroundWriter, limit: int | None, rep: int,
                      strategy: Paced, probe: LoopLagProbe, latency: float | None,
                      clients: ClientProcesses | RayGenerators | None, may_all_fail: bool) -> RunOutcome:
        """One run `rep` (a repetition, or a capacity step) on the strategy's schedule; those max_duration_s or an
        over-saturation stop kept from leaving are counted in the report's not_sent."""
        plan, report = self.plan, self.report
        count = strategy.senders

        conversation = self.conversation
        watch = SaturationWatch(strategy.stop) if strategy.stop is not None else None

        async def send(req: Request, due: Due) -> RequestRecord | None:
            if watch is not None:
                watch.sent()
            # A conversation needs each answer's text for the next turn, kept or not.
            rec = await self.measured(backend, req, rep, plan.record_outputs or conversation is not None,
                                      due.t_scheduled)
            if rec is not None:
                rec.t_queued = due.t_queued
                if conversation is not None:
                    conversation.note(rec, plan.record_outputs)
                self.records.append(rec)
                writer.put(rec)
            if watch is not None:
                watch.done(rec)
            return rec

        requests = self.repetition_requests(rep)
        items: list[Request] | list[Session] = requests
        send_item: Callable[[Any, Due], Awaitable[Any]] = send
        if conversation is not None:  # the load's items are sessions, whose turns go one after another
            items = conversation.sessions(requests)

            async def send_item(session: Session, due: Due) -> list[RequestRecord | None]:
                return await session.send(due, send, deadline)

        arrivals = self.arrivals(requests)
        await backend.open_connections(connections_needed(strategy, limit, latency, ClientShare(0, count), arrivals))
        gc.freeze()  # what exists now is never garbage: a collection during the load need not scan it
        t0 = now() + (GO_AHEAD_S if clients else 0.0)
        deadline = t0 + (strategy.max_duration_s or math.inf)
        if clients is not None:
            clients.go(rep, t0, [connections_needed(strategy, limit, latency, ClientShare(k, count), arrivals)
                                 for k in range(1, count)])
        watching = asyncio.create_task(watch.run(t0)) if watch is not None else None
        try:
            sent = await run_load(strategy, items, send_item, seed=plan.seed + rep, max_concurrency=limit,
                                  share=ClientShare(0, count), t0=t0, arrivals=arrivals,
                                  stopped=watch.stopped if watch is not None else None)
        finally:
            if watching is not None:
                watching.cancel()
        report.oversaturation.append(watch.reason if watch is not None else None)
        if conversation is not None:
            sent = [r for turns, session in zip(sent, items) for r in (turns or [None] * len(session))]
        records = [r for r in sent if r is not None]
        lags = []
        if clients is not None:
            theirs, lags = await clients.finished(rep)
            self.records += theirs
            records += theirs
        end = now()
        report.repetitions.append(Span(start=t0, end=end))
        report.loop_lag_ms.append(probe.lags(t0, end) + lags)
        self.check_engine()
        report.not_sent.append(sum(r is None for r in sent))
        if not any(r.ok for r in records) and not (may_all_fail and records):
            raise BackendError(f"every request failed; first error: {records[0].error}" if records else
                               "no request was sent before max_duration_s")
        return RunOutcome(records, report.not_sent[-1], t0, end)

    async def stop(self, backend: Backend) -> None:
        try:
            await backend.stop()
        except Exception as e:
            self.report.stop_error = f"{type(e).__name__}: {e}"


def _interrupt(signum, frame):
    raise KeyboardInterrupt


RUNNER_POLL_S = 0.5
ORPHAN_GRACE_S = 5.0  # for the servers to stop on SIGTERM before SIGKILL


def watch_runner() -> None:
    """Once the process that started this one is gone (a runner killed with SIGKILL, say) nobody reads what the cell
    measures, and a resumed run may reuse its folder: stop everything and exit (orphaned)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(RUNNER_POLL_S)
        orphaned("the runner is gone")

    threading.Thread(target=watch, name="runner-watch", daemon=True).start()


def orphaned(why: str) -> NoReturn:
    """Stop the servers this worker launched (without touching the cell's files), then kill this worker's own group
    (in-process engines' children, load clients) and exit, writing nothing."""
    try:
        print(f"worker: {why}: stopping its servers and exiting", file=sys.stderr, flush=True)
    except (BrokenPipeError, ValueError):
        pass  # stderr is a pipe to the runner (which masks it into worker.log), gone with it
    stop_launched(ORPHAN_GRACE_S)
    if os.getpgid(0) == os.getpid():  # the runner starts every worker in a session of its own
        os.killpg(0, signal.SIGKILL)
    os._exit(1)


class ClientWorker(CellWorker):
    """Client `share.index` of a cell's load.clients, in a process of its own: attaches a backend to the engine the
    worker started and sends its share of each repetition when the worker says go (harness/run/clients.py)."""

    def __init__(self, cell_dir: Path, share: ClientShare, plan_json: str, attach: dict):
        super().__init__(cell_dir, plan_json)
        self.share, self.attach = share, attach

    async def serve(self, inbox: asyncio.Queue | None = None, emit: Callable[[str], None] | None = None) -> None:
        """Commands from `inbox` (default: stdin's lines), messages to `emit` (default: stdout's lines); a Ray
        generator (harness/run/generators.py) passes its own."""
        loop = asyncio.get_running_loop()
        if inbox is None:
            inbox = asyncio.Queue()
            threading.Thread(target=read_commands, args=(sys.stdin, loop, inbox), daemon=True).start()
        emit = emit or (lambda line: print(line, flush=True))
        writer = BackgroundWriter(lambda item: emit(item if isinstance(item, str) else item.to_json()))
        plan, strategy = self.plan, self.strategy
        assert isinstance(strategy, Paced), "a load with more than one client sends one schedule every repetition"
        spec = plan.backend.model_copy(update=self.attach)
        backend = get_backend_class(spec.kind, spec.options)(
            spec, ModelInfo(plan.model_name, plan.model_path), CellContext(dir=self.dir, seed=plan.seed))
        try:
            await backend.start()
            writer.put(json.dumps({"ready": True}))
            with LoopLagProbe(loop) as probe:
                while (cmd := await inbox.get()) is not None and "go" in cmd:
                    rep, t0 = cmd["go"], cmd["t0"]

                    async def send(req: Request, due: Due, rep=rep) -> RequestRecord | None:
                        rec = await self.measured(backend, req, rep, plan.record_outputs, due.t_scheduled)
                        if rec is not None:
                            writer.put(rec)
                        return rec

                    await backend.open_connections(cmd["connections"])
                    gc.freeze()
                    requests = self.repetition_requests(rep)
                    await run_load(strategy, requests, send, seed=plan.seed + rep, share=self.share, t0=t0,
                                   arrivals=self.arrivals(requests))
                    writer.put(json.dumps({"finished": rep, "loop_lag_ms": probe.lags(t0, now())}))
        except Exception as e:
            writer.put(json.dumps({"failed": str(e) if isinstance(e, BackendError) else describe(e)}))
        finally:
            await self.stop(backend)
            writer.close()


def main() -> None:
    # SIGTERM from the runner (Ctrl-C, timeout) unwinds like Ctrl-C, so backend.stop() tears servers down.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    watch_runner()
    sys.setswitchinterval(SWITCH_INTERVAL_S)
    if len(sys.argv) == 5 and sys.argv[2] == "--client":
        plan_json, attach = client_start(sys.stdin, sys.stdout)
        share = ClientShare(int(sys.argv[3]), int(sys.argv[4]))
        asyncio.run(ClientWorker(Path(sys.argv[1]), share, plan_json, attach).serve())
        return
    plan_json = "" if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    report = asyncio.run(CellWorker(Path(sys.argv[1]), plan_json or None).run())
    sys.exit(0 if report.status == "ok" else 1)


if __name__ == "__main__":
    main()
