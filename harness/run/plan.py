"""From a scenario cell to the `CellPlan` its worker runs: the model folder (a synthetic model is built once and
cached) and the prompts file (built once per model and workload, shared by every backend of that cell row)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from rich.console import Console

from harness.config.scenario import Cell, Scenario
from harness.inputs.models import cached_synthetic
from harness.inputs.prompts import PromptError, make_prompts
from harness.records import CellPlan
from own_engine.units import parse_size


class CellPlanner:
    def __init__(self, scenario: Scenario, out: Path, console: Console):
        self.scenario, self.out, self.console = scenario, out, console
        self.model_paths: dict[str, Path] = {}
        self.prompt_files: dict[tuple[str, str], Path | PromptError] = {}

    def plan(self, cell: Cell) -> CellPlan:
        """Raises PromptError when the prompts cannot be built: the cell fails, the others run."""
        backend = self.scenario.backend(cell.backend)
        resources = self.scenario.resources.model_copy(
            update=backend.resources.model_dump(exclude_unset=True) if backend.resources else {})
        return CellPlan(cell=cell, backend=backend, model_name=cell.model, model_path=self.model_path(cell.model),
                        workload=self.scenario.workload(cell.workload).spec,
                        prompts_file=self.prompts_file(cell.model, cell.workload),
                        repetitions=self.scenario.repetitions, seed=self.scenario.seed,
                        record_outputs=self.scenario.record_outputs, resources=resources,
                        vram_budget=parse_size(resources.vram_budget))

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
