"""`bench run`: every cell of the scenario in its own worker process, reduced and stored as soon as it ends, then the
summary and the report. The jobs are in their own modules: plan.py (models, prompts, the CellPlan), process.py (the
worker subprocess), worker.py (inside it), results/metrics.py (the reducer), results/store.py (results.json)."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from backends.registry import get_backend_class
from harness.config.load import ScenarioError, check_reachable
from harness.config.scenario import Cell, Scenario
from harness.core.redact import Redactor
from harness.records import CellResult, WorkerReport, load_run, read_requests
from harness.results.metrics import background_note, reduce_cell, too_many_errors
from harness.results.store import OutputError, ResultsStore
from harness.results.summary import print_summary, write_summary
from harness.run.attempt import Attempt, attempt_cell
from harness.run.plan import CellPlanner
from harness.run.process import Interrupted, describe_exit, interruptible
from harness.run.progress import LineProgress
from harness.run.strategies import strategy_for


class Executor(Protocol):
    """Where cells run: one after another here (LocalExecutor), or across a Ray cluster (ray_executor.py). It yields
    each cell's result as it ends, keeping `runner.in_flight` to the cells started and not yet yielded."""

    def results(self, runner: Runner, cells: list[Cell], progress: Progress) -> Iterator[CellResult]: ...


class LocalExecutor:
    """The default: each cell on this machine, in order."""

    def results(self, runner: Runner, cells: list[Cell], progress: Progress) -> Iterator[CellResult]:
        for cell in cells:
            runner.in_flight = [cell]
            result = runner.run_cell(cell, progress)
            runner.in_flight = []  # an interruption from here on must not relabel a finished cell
            yield result


class Runner:
    def __init__(self, scenario: Scenario, source: str, out: Path, only_backends: list[str] | None = None,
                 resume: bool = False, console: Console | None = None, force: bool = False,
                 executor: Executor | None = None, rerun: list[str] | None = None, in_process: bool = False,
                 write_report: bool = True):
        """in_process runs each cell's worker and prompt builder in this process, without isolation: for tests of
        the harness with the scripted backend only. write_report=False skips the report (and its plotting process)
        for tests that do not read it."""
        unknown = set(only_backends or []) - {b.name for b in scenario.backends}
        if unknown:
            raise ScenarioError(f"--backend: unknown backend {', '.join(sorted(unknown))}; "
                                f"the scenario has {', '.join(b.name for b in scenario.backends)}")
        self.scenario, self.source, self.out = scenario, source, out
        self.cells = scenario.cells(only_backends)
        if rerun:
            ids = {c.id for c in self.cells}
            if unknown := sorted(set(rerun) - ids):
                raise ScenarioError(f"--rerun: no cell {', '.join(unknown)} in the scenario; its cells: "
                                    f"{', '.join(sorted(ids))}")
            if not (out / "results.json").is_file():
                raise ScenarioError(f"--rerun: {out} holds no results.json to run the cells again into")
            resume = True
        self.rerun = set(rerun or [])
        # Without a terminal rich assumes 80 columns, too narrow for the summary table in a CI log.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        # Secrets are masked in every file written (cell.json, results.json, reports): the worker gets its plan whole
        # on its stdin.
        self.redact = Redactor(scenario.model_dump(mode="json"))
        self.store = ResultsStore(out, scenario.model_dump(mode="json"), source, resume, self.redact, force)
        self.planner = CellPlanner(scenario, out, self.console, in_process)
        self.in_process, self.write_report = in_process, write_report
        self.executor = executor or LocalExecutor()
        self.in_flight: list[Cell] = []

    def run(self) -> int:
        """Exit code: 0 all cells ok, 1 some failed, 130 interrupted (SIGINT or SIGTERM: the cell in flight is stopped
        with its servers and recorded as interrupted; results.json stays valid)."""
        with interruptible():
            try:
                return self.run_all()
            except Interrupted as e:
                why = "interrupted by the user" if e.signal == signal.SIGINT else f"interrupted by {e.signal.name}"
                for cell in self.in_flight:
                    self.store.put(self.failed(cell, why), [c.id for c in self.cells])
                self.store.write_requests()
                self.console.print(f"[red]interrupted[/red] ({e.signal.name}): results so far are in {self.store.path}")
                return 130
            except OSError as e:  # the runner writes nowhere but --out
                raise OutputError(f"cannot write to {self.out}: {e.strerror or e} ({e.filename}); results.json keeps "
                                  f"the cells stored before") from None

    def run_all(self) -> int:
        check_reachable(self.scenario, self.source)
        for warning in self.scenario.warnings():
            self.console.print(f"[yellow]warning:[/yellow] {escape(warning)}", highlight=False)
        todo = [c for c in self.cells if c.id in self.rerun or not self.rerun and not self.store.done(c.id)]
        if self.rerun:
            self.console.print(f"running {', '.join(sorted(self.rerun))} again; the other cells stay as stored")
        elif len(todo) < len(self.cells):
            self.console.print(f"resume: {len(self.cells) - len(todo)} cell(s) already ok, {len(todo)} to run")
        order = [c.id for c in self.cells]
        self.store.save()  # before the first cell: a run killed during it still leaves a valid results.json
        for cell in list(todo):
            if why := self.not_installed(cell.backend):
                todo.remove(cell)
                self.store.put(CellResult(**self.header(cell), status="skipped", error=why), order)
                self.console.print(f"skipped {cell.id}: {escape(why)}", highlight=False)
        # Without a terminal (a CI log), rich's bar would say nothing until the end: plain lines instead.
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=self.console, transient=False) if self.console.is_terminal \
            else LineProgress(self.console)
        with progress:
            cells_task = progress.add_task("cells", total=len(todo))
            for result in self.executor.results(self, todo, progress):
                self.store.put(result, order)
                progress.advance(cells_task)
        self.store.write_requests()
        self.store.compare_outputs()
        run = load_run(self.store.path)  # as stored: secrets masked
        print_summary(run, self.console)
        write_summary(run, self.out / "summary.md")
        report = self.report() if self.write_report else []
        self.console.print(f"results: {self.store.path}\nsummary: {self.out / 'summary.md'}\n"
                           f"report:  {', '.join(report) or 'none'}")
        return 0 if all(c.ok or c.status == "skipped" for c in run.cells) else 1

    def report(self) -> list[str]:
        """The report's files, written in a process of its own: plotting libraries would double the runner's
        memory."""
        with self.console.status("writing the report"):
            argv = [sys.executable, "-m", "harness.cli", "report", str(self.out), "--out", str(self.out)]
            done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            self.console.print(f"[red]the report could not be written[/red]:\n{escape(done.stderr.strip()[-2000:])}")
        return [line.removeprefix("wrote ") for line in done.stdout.splitlines() if line.startswith("wrote ")]

    def not_installed(self, backend: str) -> str | None:
        """Why an optional backend's engine is not installed here; None when it is, or the backend is not optional
        (a missing engine then fails its cells, saying the same)."""
        spec = self.scenario.backend(backend)
        return get_backend_class(spec.kind, spec.options).missing(spec) if spec.optional else None

    def run_cell(self, cell: Cell, progress: Progress) -> CellResult:
        cell_dir = self.store.fresh_cell_dir(cell.id)
        spec = self.scenario.workload(cell.workload).spec  # a capacity search: at most max_steps runs
        task = progress.add_task(f"  {cell.id}",
                                 total=spec.num_requests * strategy_for(spec.load).runs(self.scenario.repetitions))
        try:
            attempt = attempt_cell(self.planner, cell, cell_dir, self.scenario.cell_timeout_s,
                                   lambda: progress.advance(task), self.redact, self.in_process)
        finally:
            progress.remove_task(task)
        return self.collect(cell, cell_dir, attempt)

    def collect(self, cell: Cell, cell_dir: Path, attempt: Attempt) -> CellResult:
        """The cell's result from what its worker wrote into cell_dir (here, or shipped back from a node)."""
        if attempt.error is not None:
            return self.failed(cell, attempt.error, attempt.node)
        exit_code, log_tail = attempt.exit_code, attempt.log_tail
        report_file = cell_dir / "worker.json"
        report = WorkerReport.model_validate_json(report_file.read_text()) if report_file.exists() else None
        if report is None or report.status != "ok" or exit_code != 0:
            why = exit_code if isinstance(exit_code, str) else (report and report.error) or describe_exit(exit_code)
            failed = self.failed(cell, why + (f"\n--- worker log (tail) ---\n{log_tail}" if log_tail else ""),
                                 attempt.node)
            if report is not None and report.resources is not None:
                failed = failed.model_copy(update=self.measured(cell, report))
            return failed
        # A capacity search's metrics are its capacity step's, every step in `capacity` (harness/run/strategies.py).
        view = strategy_for(self.scenario.workload(cell.workload).spec.load, self.scenario.slo).measured(
            read_requests(cell_dir / "requests.jsonl"), report, self.scenario.repetitions)
        records, capacity = view.records, view.capacity
        reduced = reduce_cell(records, view.repetitions, self.scenario.slo, self.scenario.max_repetition_cv,
                              view.load, view.loop_lag_ms,
                              capped=report.concurrency_cap is not None,
                              steady_state=self.scenario.workload(cell.workload).spec.steady_state)
        measured = self.measured(cell, report)
        if reduced["unstable"] and (note := background_note(report.resources)):
            reduced["unstable"] += f"; meanwhile {note}"
        errors = too_many_errors(records, self.scenario.max_error_rate_of(cell.workload))
        return CellResult(**self.header(cell), status="failed" if errors else "ok", error=errors,
                          **measured, **reduced,
                          load_time_s=report.load_time_s, prepare_time_s=report.prepare_time_s,
                          engine=report.environment,
                          capabilities=report.capabilities, concurrency_cap=report.concurrency_cap,
                          requests_file=f"cells/{cell.id}/requests.jsonl", logical_io=report.logical_io,
                          server_metrics=report.server_metrics, clients=report.clients, node=attempt.node,
                          not_sent=report.not_sent, capacity=capacity, prefix_reuse=report.prefix_reuse,
                          oversaturation=[f"repetition {i}: {why}" for i, why in enumerate(report.oversaturation)
                                          if why], cpu_isolation=report.cpu_isolation)

    def header(self, cell: Cell) -> dict:
        """What identifies a cell in results: names, the concrete workload, and the swept values that made it."""
        w = self.scenario.workload(cell.workload)
        return {"id": cell.id, **cell.model_dump(), "backend_kind": self.scenario.backend(cell.backend).kind,
                "base_workload": w.base, "sweep": w.sweep, "workload_spec": w.spec.model_dump(mode="json")}

    @staticmethod
    def measured(cell: Cell, report: WorkerReport) -> dict:
        if report.resources is None:
            return {}
        return {"resources": report.resources, "timeline_file": f"cells/{cell.id}/timeline.json",
                "over_budget": report.resources.over_budget}

    def failed(self, cell: Cell, error: str, node: dict | None = None) -> CellResult:
        return CellResult(**self.header(cell), status="failed", error=error, node=node)

