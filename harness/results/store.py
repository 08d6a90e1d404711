"""results.json, rewritten atomically after every cell, so a crash always leaves a valid file.

Layout of an output folder (docs/results.md):
  results.json            schema_version, scenario, environment, cells[]
  requests.jsonl          every measured request of every cell, tagged with its cell: written once, at the end
  cells/<cell id>/        cell.json (the CellPlan), requests.jsonl, worker.json, worker.log, timeline.json, server logs
  prompts/                the prompts sent, per model, prompt length and count
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from harness.core.errors import UserError
from harness.core.files import atomic_write, is_ours, make_folder, remove_folder
from harness.core.processes import kill_leftover_groups
from harness.core.redact import Redactor
from harness.measure import environment
from harness.records import SCHEMA_VERSION, CellResult, RunResult, load_run
from harness.results.agreement import agreement


class OutputError(UserError):
    """The results folder cannot be written (full, read-only, ...): said in one line; what was written is kept."""


class ResumeRefused(UserError):
    """--resume into results measured under another scenario, without --force."""


def scenario_fingerprint(scenario: dict[str, Any]) -> str:
    """What --resume compares: the scenario as results.json stores it (secrets masked), less where results go."""
    data = {k: v for k, v in scenario.items() if k != "output"}
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class ResultsStore:
    """`redact` masks secrets in everything written to results.json (harness/core/redact.py); `force` lets --resume
    continue results measured under another scenario, and records that it did."""

    def __init__(self, out: Path, scenario: dict[str, Any], scenario_file: str, resume: bool,
                 redact: Redactor | None = None, force: bool = False):
        self.out, self.redact = out, redact or Redactor()
        self.path = out / "results.json"
        scenario = self.redact(scenario)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create the results folder {str(out)[:200]}: {e.strerror or e}") from None
        previous = load_run(self.path) if resume and self.path.exists() else None
        fingerprint = scenario_fingerprint(scenario)
        forced = previous.forced_resumes if previous else []
        if previous is not None:
            before = previous.scenario_fingerprint or scenario_fingerprint(previous.scenario)
            if before != fingerprint:
                changed = sorted(k for k in set(previous.scenario) | set(scenario)
                                 if k != "output" and previous.scenario.get(k) != scenario.get(k))
                if not force:
                    raise ResumeRefused(
                        f"{self.path}: --resume: the scenario changed since these results were measured (changed: "
                        f"{', '.join(changed)}); resuming would mix cells measured under different definitions. "
                        f"Run into another --out, or add --force to resume anyway (recorded in results.json)")
                forced = [*forced, {"at": _now(), "changed": changed, "previous_fingerprint": before}]
        self.cells: dict[str, CellResult] = {c.id: c for c in previous.cells} if previous else {}
        # The cells kept from before are the run's until others replace them: a resume with nothing left to run
        # still summarizes them.
        self.run = RunResult(schema_version=SCHEMA_VERSION, created=previous.created if previous else _now(),
                             scenario_file=scenario_file, scenario=scenario, scenario_fingerprint=fingerprint,
                             forced_resumes=forced, environment=environment.collect(), cells=list(self.cells.values()))

    def fresh_cell_dir(self, cell_id: str) -> Path:
        """The cell's folder, emptied: files of an earlier try must not mix with this one's. Whatever process groups
        that try recorded (a worker and servers orphaned by a killed runner) are killed first, so none of them can
        write into the new try's files."""
        d = self.out / "cells" / cell_id
        if is_ours(d, also_ours_if="cell.json"):  # a record in a folder of someone else's names nothing to kill
            kill_leftover_groups(d)
        try:
            remove_folder(d, also_ours_if="cell.json")  # never a folder of the user's that --out happened to hold
            make_folder(d)
        except OSError as e:
            raise OutputError(f"cannot create {d}: {e.strerror or e}") from None
        return d

    def done(self, cell_id: str) -> bool:
        return cell_id in self.cells and self.cells[cell_id].ok

    def put(self, cell: CellResult, order: list[str]) -> None:
        """Record one cell and rewrite results.json; `order` is the scenario's cell order."""
        self.cells[cell.id] = cell
        rank = {cid: i for i, cid in enumerate(order)}
        self.run.cells = sorted(self.cells.values(), key=lambda c: rank.get(c.id, len(rank)))
        self.save()

    def save(self) -> None:
        self.run.updated = _now()
        self._write(self.path, json.dumps(self.redact(self.run.model_dump(mode="json")), indent=1, ensure_ascii=False))

    def _write(self, path: Path, text: str) -> None:
        try:
            atomic_write(path, text)
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e.strerror or e}; the copy written before, if any, is kept "
                              f"whole") from None

    def compare_outputs(self) -> None:
        """Whether the backends answered alike (harness/results/agreement.py), once every cell is in."""
        self.run.agreement = agreement(self.run, self.out)
        self.save()

    def write_requests(self) -> None:
        """The run-level requests.jsonl: every cell's records, each line tagged with its cell. Once, at the end."""
        lines = []
        for c in self.run.cells:
            f = self.out / (c.requests_file or f"cells/{c.id}/requests.jsonl")
            if f.is_file():
                prefix = json.dumps({"cell": c.id})[:-1] + ", "
                lines += [prefix + line[1:] for line in f.read_text().splitlines() if line.strip()]
        self._write(self.out / "requests.jsonl", "\n".join(lines) + ("\n" if lines else ""))
