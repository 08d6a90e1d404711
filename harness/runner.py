"""`bench run`: build the models, make the prompts, run every cell in its own worker process, reduce, store."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

import harness
from backends.servers import kill_leftover_groups, log_tail, stop_process_group
from harness.metrics import (PERCENTILE_METHOD, RequestRecord, median_over_repetitions, reduce_repetition,
                             spread_over_repetitions, token_sources)
from harness.models import cached_synthetic
from harness.prompts import PromptError, make_prompts
from harness.report import write_report
from harness.results import ResultsStore
from harness.scenario import Cell, Scenario, ScenarioError, check_reachable, parse_bytes
from harness.summary import print_summary, write_summary

REPO_ROOT = Path(harness.__file__).resolve().parent.parent


class Interrupted(Exception):
    pass


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
        self.model_paths: dict[str, Path] = {}
        self.prompt_files: dict[tuple[str, str], Path | PromptError] = {}

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
                    self.console.print("[red]interrupted[/red]: results so far are in " + str(self.store.path))
                    return 130
                self.store.put(result, order)
                progress.advance(cells_task)
        results = self.store.data
        print_summary(results, self.console)
        write_summary(results, self.out / "summary.md")
        with self.console.status("writing the report"):
            report = write_report([self.out], self.out)
        self.console.print(f"results: {self.store.path}\nsummary: {self.out / 'summary.md'}\n"
                           f"report:  {', '.join(str(p) for p in report)}")
        return 0 if all(c["status"] == "ok" for c in results["cells"]) else 1

    # ---- per model / workload preparation, done once and shared by every backend ------------------------------

    def model_path(self, name: str) -> Path:
        if name not in self.model_paths:
            spec = self.scenario.models[name]
            if spec.synthetic is not None:
                with self.console.status(f"building synthetic model {spec.synthetic.preset} (cached after the first run)"):
                    self.model_paths[name] = cached_synthetic(spec.synthetic.preset, spec.synthetic.seed)
            else:
                self.model_paths[name] = spec.path
        return self.model_paths[name]

    def prompts_file(self, model: str, workload_name: str) -> Path:
        key = (model, workload_name)
        if key not in self.prompt_files:
            from transformers import AutoTokenizer

            w = self.scenario.workload(workload_name).spec
            count = w.warmup_requests + w.num_requests * self.scenario.repetitions
            try:
                tokenizer = AutoTokenizer.from_pretrained(self.model_path(model))
                prompts = make_prompts(tokenizer, count, w.input_tokens, self.scenario.seed)
            except (PromptError, OSError, ValueError) as e:
                self.prompt_files[key] = PromptError(f"cannot build prompts for model {model!r}: {e}")
            else:
                path = self.out / "prompts" / (re.sub(r"[^A-Za-z0-9_.=,-]", "_", f"{model}__{workload_name}") + ".json")
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps([p.to_dict() for p in prompts]))
                self.prompt_files[key] = path
        result = self.prompt_files[key]
        if isinstance(result, PromptError):
            raise result
        return result

    # ---- one cell ---------------------------------------------------------------------------------------------

    def run_cell(self, cell: Cell, progress: Progress) -> dict[str, Any]:
        backend = self.scenario.backend(cell.backend)
        workload = self.scenario.workload(cell.workload).spec
        cell_dir = self.store.fresh_cell_dir(cell.id)
        try:
            prompts = self.prompts_file(cell.model, cell.workload)
        except PromptError as e:
            return self.failed(cell, str(e))
        resources = self.scenario.resources.model_copy(
            update=backend.resources.model_dump(exclude_unset=True) if backend.resources else {})
        (cell_dir / "cell.json").write_text(json.dumps({
            "cell": cell.model_dump(), "backend": backend.model_dump(mode="json"),
            "model": {"name": cell.model, "path": str(self.model_path(cell.model))},
            "workload": workload.model_dump(mode="json"), "prompts_file": str(prompts),
            "repetitions": self.scenario.repetitions, "seed": self.scenario.seed,
            "record_outputs": self.scenario.record_outputs,
            "resources": resources.model_dump(),
            "vram_budget": parse_bytes(resources.vram_budget) if resources.vram_budget else None,
        }, indent=1))
        total = workload.num_requests * self.scenario.repetitions
        task = progress.add_task(f"  {cell.id}", total=total)
        try:
            exit_code, log_tail = self.run_worker(backend.python, cell_dir, progress, task)
        finally:
            progress.remove_task(task)
        return self.reduce(cell, cell_dir, exit_code, log_tail)

    def run_worker(self, python: Path | None, cell_dir: Path, progress: Progress, task) -> tuple[int | str, str]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                   PYTHONUNBUFFERED="1")
        log_path = cell_dir / "worker.log"
        with log_path.open("w") as log:
            proc = subprocess.Popen([str(python or sys.executable), "-m", "harness.worker", str(cell_dir)],
                                    stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)

            def pump() -> None:
                for line in proc.stdout:
                    if line.startswith("{\"done\""):
                        progress.advance(task)
                    else:
                        log.write(line)

            reader = threading.Thread(target=pump, daemon=True)
            reader.start()
            try:
                exit_code: int | str = proc.wait(timeout=self.scenario.cell_timeout_s)
            except subprocess.TimeoutExpired:
                stop_process_group(proc)
                exit_code = f"timed out after {self.scenario.cell_timeout_s:g} s (cell_timeout_s)"
            except KeyboardInterrupt:
                stop_process_group(proc)
                raise Interrupted from None
            finally:
                # Servers run in sessions of their own: a worker that died without stopping them leaves them here.
                kill_leftover_groups(cell_dir)
            reader.join(timeout=5)
        return exit_code, log_tail(log_path, 25)

    def failed(self, cell: Cell, error: str) -> dict[str, Any]:
        return {**self.cell_header(cell), "status": "failed", "error": error, "metrics": None, "repetitions": []}

    def cell_header(self, cell: Cell) -> dict[str, Any]:
        """What identifies a cell in results: names, the concrete workload, and the swept values that made it."""
        w = self.scenario.workload(cell.workload)
        return {"id": cell.id, **cell.model_dump(), "backend_kind": self.scenario.backend(cell.backend).kind,
                "base_workload": w.base, "sweep": w.sweep, "workload_spec": w.spec.model_dump(mode="json")}

    def reduce(self, cell: Cell, cell_dir: Path, exit_code: int | str, log_tail: str) -> dict[str, Any]:
        report_file = cell_dir / "worker.json"
        report = json.loads(report_file.read_text()) if report_file.exists() else {}
        measured = {"resources": report["resources"], "timeline_file": f"cells/{cell.id}/timeline.json",
                    "over_budget": report["resources"]["over_budget"]} if "resources" in report else {}
        if report.get("status") != "ok" or exit_code != 0:
            why = exit_code if isinstance(exit_code, str) else report.get("error") or describe_exit(exit_code)
            return {**self.failed(cell, why + (f"\n--- worker log (tail) ---\n{log_tail}" if log_tail else "")),
                    **measured}
        records = [RequestRecord(**json.loads(line)) for line in (cell_dir / "requests.jsonl").read_text().splitlines()]
        reps = [reduce_repetition([r for r in records if r.repetition == i], self.scenario.slo)
                for i in range(self.scenario.repetitions)]
        return {
            **self.cell_header(cell), "status": "ok", "error": None,
            "metrics": {**median_over_repetitions(reps), "ttft_p99_cv": spread_over_repetitions(reps, "ttft_ms", "p99")},
            "repetitions": reps,
            "percentile_method": PERCENTILE_METHOD, "token_counts": token_sources(records),
            "load_time_s": report.get("load_time_s"), "engine": report.get("environment", {}),
            "requests_file": f"cells/{cell.id}/requests.jsonl", "logical_io": report.get("logical_io") or None,
            "server_metrics": report.get("server_metrics") or None,
            **measured,
        }


def describe_exit(code: int) -> str:
    if code < 0:
        name = signal.Signals(-code).name
        hint = " (likely out of memory)" if code == -signal.SIGKILL else ""
        return f"the worker was killed by {name}{hint}"
    return f"the worker exited with code {code}"
