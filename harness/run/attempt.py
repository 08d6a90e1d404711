"""One attempt at a cell, wherever it runs (this machine, or a Ray node under --executor ray): plan it (the model
and prompts resolved where it runs), write cell.json, and run the worker subprocess in the cell's folder. What the
worker wrote there is then reduced by the runner on the head."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from backends.registry import get_backend_class
from harness.config.scenario import Cell
from harness.core.errors import BackendError
from harness.core.files import atomic_write
from harness.core.redact import Redactor
from harness.measure.environment import node
from harness.run.plan import CellPlanner
from harness.run.process import run_here, run_worker


@dataclass
class Attempt:
    """How an attempt ended: `error` when the cell could not be planned (no worker ran), else the worker's exit code
    (or why it has none) and its log's tail; `node` is the machine it ran on."""
    exit_code: int | str | None = None
    log_tail: str = ""
    error: str | None = None
    node: dict[str, Any] = field(default_factory=dict)
    prompts_file: Path | None = None


def attempt_cell(planner: CellPlanner, cell: Cell, cell_dir: Path, timeout_s: float,
                 on_request_done: Callable[[], None], redact: Redactor, in_process: bool = False) -> Attempt:
    where = node()
    try:
        plan = planner.plan(cell)
    except BackendError as e:
        return Attempt(error=str(e), node=where)
    atomic_write(cell_dir / "cell.json", json.dumps(redact(plan.model_dump(mode="json")), indent=1))
    if in_process:
        exit_code, log_tail = run_here(cell_dir, plan.model_dump_json())
    else:
        environment = get_backend_class(plan.backend.kind, plan.backend.options).process_environment(plan.backend)
        exit_code, log_tail = run_worker(plan.backend.python, cell_dir, timeout_s, on_request_done,
                                         plan.model_dump_json(), redact, environment)
    return Attempt(exit_code=exit_code, log_tail=log_tail, node=where, prompts_file=plan.prompts_file)
