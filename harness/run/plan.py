"""From a scenario cell to the `CellPlan` its worker runs: the model folder (a synthetic model is built once and
cached) and the prompts file (built once per model and workload, shared by every backend of that cell row). Both are
built in subprocesses, the prompts under the cell's timeout once the tokenizer is loaded: the runner imports neither
torch nor a tokenizer."""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

from rich.console import Console

from harness.config.prompts import input_files
from harness.config.scenario import Cell, Scenario, TraceLoad, safe_name
from harness.core.errors import BackendError
from harness.core.processes import log_tail
from harness.inputs.models import synthetic_dir
from harness.inputs.prompts import PromptError, write_prompts
from harness.records import CellPlan
from harness.run.strategies import strategy_for
from llmbench.units import parse_size


TOKENIZER_TIMEOUT_S = 300  # importing transformers and loading a tokenizer: seconds, more on a busy machine


class CellPlanner:
    def __init__(self, scenario: Scenario, out: Path, console: Console, in_process: bool = False):
        self.scenario, self.out, self.console = scenario, out, console
        self.in_process = in_process  # prompts built here: tests of the harness only (Runner's in_process)
        self.model_paths: dict[str, Path | BackendError] = {}
        self.prompt_files: dict[Path, PromptError | None] = {}

    def plan(self, cell: Cell) -> CellPlan:
        """Raises BackendError (PromptError) when the model or prompts cannot be built: the cell fails, the others run."""
        backend = self.scenario.backend(cell.backend)
        resources = self.scenario.resources.model_copy(
            update=backend.resources.model_dump(exclude_unset=True) if backend.resources else {})
        model_path = self.model_path(cell.model)
        workload = self.scenario.workload(cell.workload).spec
        return CellPlan(cell=cell, backend=backend, model_name=cell.model, model_path=model_path, workload=workload,
                        prompts_file=self.prompts_file(cell.model, model_path, workload),
                        repetitions=self.scenario.repetitions, seed=self.scenario.seed,
                        record_outputs=self.scenario.record_outputs, resources=resources, slo=self.scenario.slo,
                        vram_budget=parse_size(resources.vram_budget), attempt=uuid.uuid4().hex)

    def model_path(self, name: str) -> Path:
        if name not in self.model_paths:
            spec = self.scenario.models[name]
            self.model_paths[name] = spec.path if spec.synthetic is None else self.synthetic(spec.synthetic)
        result = self.model_paths[name]
        if isinstance(result, BackendError):
            raise result
        return result

    def synthetic(self, spec) -> Path | BackendError:
        path = synthetic_dir(spec.preset, spec.seed)
        if (path / "config.json").is_file():
            return path
        log = self.out / f"build-{spec.preset}-seed{spec.seed}.log"
        with self.console.status(f"building synthetic model {spec.preset} (cached after the first run)"), \
                log.open("w") as f:
            done = subprocess.run([sys.executable, "-m", "harness.inputs.models", spec.preset, str(spec.seed)],
                                  stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            return BackendError(f"cannot build the synthetic model {spec.preset}; last lines of {log}:\n"
                                f"{log_tail(log, 15)}")
        log.unlink()
        return path

    def prompts_file(self, model: str, model_path: Path, workload) -> Path:
        """Built once per model, workload and count (cells that differ in nothing else share them), in a subprocess
        (a tokenizer would make the runner big); named after all that decides them, the input files' sizes and
        times included, so a file another run left is never misread."""
        runs = strategy_for(workload.load).runs(self.scenario.repetitions)  # a capacity search: at most max_steps
        count = workload.warmup_requests + workload.num_requests * runs
        args = [str(model_path), str(count), str(self.scenario.seed), workload.model_dump_json(exclude_unset=True)]
        # The name (a sweep's, say) decides nothing: workloads that differ only in it share their prompts.
        decides = [args[:3], workload.model_dump(mode="json", exclude={"name", "max_error_rate"}),
                   [_stamp(f) for f in input_files(workload)]]
        digest = hashlib.sha256(json.dumps(decides).encode()).hexdigest()[:10]
        # A trace's rows give the lengths: an input_tokens beside it is not used.
        size = ("trace" if isinstance(workload.load, TraceLoad) else workload.input_tokens
                if isinstance(workload.input_tokens, int) else workload.prompts.type)
        path = self.out / "prompts" / f"{safe_name(model)}__{size}x{count}-{digest}.json"
        if path not in self.prompt_files and path.is_file():
            self.prompt_files[path] = None  # an earlier run built the same prompts
        if path not in self.prompt_files:
            with self.console.status(f"building {count} prompts ({workload.prompts.type}, {size}) for {model}"):
                problem = self.build_here(path, model_path, count, workload) if self.in_process \
                    else self.build_prompts(path, args)
            self.prompt_files[path] = problem and PromptError(f"cannot build prompts for model {model!r}: {problem}")
        if self.prompt_files[path] is not None:
            raise self.prompt_files[path]
        return path

    def build_here(self, path: Path, model_path: Path, count: int, workload) -> str | None:
        try:
            write_prompts(path, model_path, count, self.scenario.seed, workload)
        except PromptError as e:
            return str(e)
        return None

    def build_prompts(self, path: Path, args: list[str]) -> str | None:
        """None when built, else why not. Loading the tokenizer may take TOKENIZER_TIMEOUT_S; building, which grows
        with num_requests, the cell's timeout."""
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen([sys.executable, "-m", "harness.inputs.prompts", str(path), *args],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, text=True)
            try:
                if not select.select([proc.stdout], [], [], TOKENIZER_TIMEOUT_S)[0]:
                    return f"the tokenizer was not loaded after {TOKENIZER_TIMEOUT_S} s"
                proc.stdout.readline()  # "tokenizer loaded", or nothing when it failed
                timeout = self.scenario.cell_timeout_s
                try:
                    if proc.wait(timeout=timeout) == 0:
                        return None
                except subprocess.TimeoutExpired:
                    return f"building them took more than cell_timeout_s ({timeout:g} s)"
                err.seek(0)
                return (err.read().strip().splitlines() or [f"the builder exited with code {proc.returncode}"])[-1]
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()


def _stamp(path: Path) -> list:
    try:
        st = path.stat()
    except OSError:
        return [str(path)]  # the builder says it is missing
    return [str(path), st.st_size, st.st_mtime_ns]
