"""results.json, rewritten atomically after every cell, so a crash always leaves a valid file.

Layout of an output folder (docs/results.md):
  results.json            schema_version, scenario, environment, cells[]
  requests.jsonl          every measured request of every cell, tagged with its cell: written once, at the end
  cells/<cell id>/        cell.json (the CellPlan), requests.jsonl, worker.json, worker.log, timeline.json, server logs
  prompts/                the prompts sent, per model and workload
"""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.core.files import atomic_write
from harness.measure import environment
from harness.records import SCHEMA_VERSION, CellResult, RunResult, load_run


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    def __init__(self, out: Path, scenario: dict[str, Any], scenario_file: str, resume: bool):
        self.out = out
        out.mkdir(parents=True, exist_ok=True)
        self.path = out / "results.json"
        previous = load_run(self.path) if resume and self.path.exists() else None
        self.cells: dict[str, CellResult] = {c.id: c for c in previous.cells} if previous else {}
        self.run = RunResult(schema_version=SCHEMA_VERSION, created=previous.created if previous else _now(),
                             scenario_file=scenario_file, scenario=scenario, environment=environment.collect(),
                             cells=[])

    def fresh_cell_dir(self, cell_id: str) -> Path:
        """The cell's folder, emptied: files of an earlier try must not mix with this one's."""
        d = self.out / "cells" / cell_id
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True)
        return d

    def done(self, cell_id: str) -> bool:
        return cell_id in self.cells and self.cells[cell_id].ok

    def put(self, cell: CellResult, order: list[str]) -> None:
        """Record one cell and rewrite results.json; `order` is the scenario's cell order."""
        self.cells[cell.id] = cell
        rank = {cid: i for i, cid in enumerate(order)}
        self.run.cells = sorted(self.cells.values(), key=lambda c: rank.get(c.id, len(rank)))
        self.run.updated = _now()
        atomic_write(self.path, self.run.to_json())

    def write_requests(self) -> None:
        """The run-level requests.jsonl: every cell's records, each line tagged with its cell. Once, at the end."""
        lines = []
        for c in self.run.cells:
            f = self.out / (c.requests_file or f"cells/{c.id}/requests.jsonl")
            if f.is_file():
                prefix = json.dumps({"cell": c.id})[:-1] + ", "
                lines += [prefix + line[1:] for line in f.read_text().splitlines() if line.strip()]
        atomic_write(self.out / "requests.jsonl", "\n".join(lines) + ("\n" if lines else ""))
