"""`bench run`: every cell of the scenario in its own worker process, reduced and stored as soon as it ends, then the
summary and the report. The jobs are in their own modules: plan.py (models, prompts, the CellPlan), process.py (the
worker subprocess), worker.py (inside it), results/metrics.py (the reducer), results/store.py (results.json)."""

from __future__ import annotations

import sys
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from harness.analyze.report import write_report
from harness.config.load import ScenarioError, check_reachable
from harness.config.scenario import Cell, Scenario
from harness.inputs.prompts import PromptError
from harness.records import CellResult, WorkerReport, read_requests
from harness.results.metrics import reduce_cell
from harness.results.store import ResultsStore
from harness.results.summary import print_summary, write_summary
from harness.run.plan import CellPlanner
from harness.run.process import Interrupted, describe_exit, run_worker


class Runner:
    def __init__(self, scenario: Scenario, source: str, out: Path, only_backends: list[str] | None = None,
                 resume: bool = False, console: Console | None = None):
        unknown = set(only_backends or []) - {b.name for b in scenario.backends}
        if unknown:
            raise ScenarioError(f"--backend: unknown backend {', '.join(sorted(unknown))}; "
                                f"the scenario has {', '.join(b.name for b in scenario.backends)}")
        self.scenario, self.source, self.out = scenario, source, out
        self.cells = scenario.cells(only_backends)
        # Without a terminal rich assumes 80 columns, too narrow for the summary table in a CI log.
        self.console = console or Console(width=None if sys.stdout.isatty() else 200)
        self.store = ResultsStore(out, scenario.model_dump(mode="json"), source, resume)
        self.planner = CellPlanner(scenario, out, self.console)

    def run(self) -> int:
        """Exit code: 0 all cells ok, 1 some failed, 130 interrupted."""
        check_reachable(self.scenario, self.source)
        todo = [c for c in self.cells if not self.store.done(c.id)]
        if len(todo) < len(self.cells):
            self.console.print(f"resume: {len(self.cells) - len(todo)} cell(s) already ok, {len(todo)} to run")
        order = [c.id for c in self.cells]
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=self.console, transient=False) as progress:
            cells_task = progress.add_task("cells", total=len(todo))
            for cell in todo:
                try:
                    result = self.run_cell(cell, progress)
                except Interrupted:
                    self.store.put(self.failed(cell, "interrupted by the user"), order)
                    self.store.write_requests()
                    self.console.print("[red]interrupted[/red]: results so far are in " + str(self.store.path))
                    return 130
                self.store.put(result, order)
                progress.advance(cells_task)
        self.store.write_requests()
        run = self.store.run
        print_summary(run, self.console)
        write_summary(run, self.out / "summary.md")
        with self.console.status("writing the report"):
            report = write_report([self.out], self.out)
        self.console.print(f"results: {self.store.path}\nsummary: {self.out / 'summary.md'}\n"
                           f"report:  {', '.join(str(p) for p in report)}")
        return 0 if all(c.ok for c in run.cells) else 1

    def run_cell(self, cell: Cell, progress: Progress) -> CellResult:
        cell_dir = self.store.fresh_cell_dir(cell.id)
        try:
            plan = self.planner.plan(cell)
        except PromptError as e:
            return self.failed(cell, str(e))
        (cell_dir / "cell.json").write_text(plan.model_dump_json(indent=1))
        task = progress.add_task(f"  {cell.id}", total=plan.workload.num_requests * plan.repetitions)
        try:
            exit_code, log_tail = run_worker(plan.backend.python, cell_dir, self.scenario.cell_timeout_s,
                                             lambda: progress.advance(task))
        finally:
            progress.remove_task(task)
        report_file = cell_dir / "worker.json"
        report = WorkerReport.model_validate_json(report_file.read_text()) if report_file.exists() else None
        if report is None or report.status != "ok" or exit_code != 0:
            why = exit_code if isinstance(exit_code, str) else (report and report.error) or describe_exit(exit_code)
            failed = self.failed(cell, why + (f"\n--- worker log (tail) ---\n{log_tail}" if log_tail else ""))
            if report is not None and report.resources is not None:
                failed = failed.model_copy(update=self.measured(cell, report))
            return failed
        records = read_requests(cell_dir / "requests.jsonl")
        return CellResult(**self.header(cell), status="ok", **self.measured(cell, report),
                          **reduce_cell(records, self.scenario.repetitions, self.scenario.slo),
                          load_time_s=report.load_time_s, engine=report.environment,
                          capabilities=report.capabilities, concurrency_cap=report.concurrency_cap,
                          requests_file=f"cells/{cell.id}/requests.jsonl", logical_io=report.logical_io or None,
                          server_metrics=report.server_metrics or None)

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
                "over_budget": report.resources.get("over_budget")}

    def failed(self, cell: Cell, error: str) -> CellResult:
        return CellResult(**self.header(cell), status="failed", error=error)

