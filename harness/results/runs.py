"""Reading results for reports, guides and plots: runs, and a view of each cell in its run.

Reports and guides are pure functions of results files, read through `harness.records.load_run`; what they derive
from a cell in its run (its workload, device, resources, raw requests) is in `CellView`, in one place. Its numbers
are read by their catalogue names (harness/results/catalogue.py).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, Literal, TypeVar, cast

from pydantic import ValidationError

from harness.config.scenario import Workload
from harness.records import (CellResult, RequestRecord, ResourceBlock, ResourceUsage, ResultsError, RunResult,
                             load_run, read_requests)
from harness.results.catalogue import statistic

T = TypeVar("T")


def workload_of(data: Any) -> Workload | None:
    """A stored workload read through the scenario's own schema, or None where this version's schema refuses it (a
    results file of another llmbench keeps it as it was written)."""
    if isinstance(data, Workload):
        return data
    try:
        return Workload.model_validate(data)
    except ValidationError:
        return None


@dataclass
class Run:
    label: str
    path: Path  # the results.json
    result: RunResult

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def scenario(self) -> dict[str, Any]:
        return self.result.scenario

    @property
    def environment(self) -> dict[str, Any]:
        return self.result.environment

    @cached_property
    def workloads(self) -> dict[str, Workload | dict[str, Any]]:
        """The scenario's own workloads by name, before sweeps expanded them: read through its schema where it
        reads them, as stored otherwise."""
        out: dict[str, Workload | dict[str, Any]] = {}
        for w in self.scenario.get("workloads") or []:
            if isinstance(w, dict):
                out[str(w.get("name"))] = workload_of(w) or w
        return out

    @cached_property
    def cells(self) -> list[CellView]:
        return [CellView(self, c) for c in self.result.cells]


def run_folder(results: Path) -> Path:
    """The folder of a run named by its folder or its results.json: where its report, guide and baseline files are."""
    return results if results.is_dir() else results.parent


def load_runs(paths: list[Path | str]) -> list[Run]:
    """Each path a results folder or results.json; labels are the folder names, numbered where they repeat."""
    if not paths:
        raise ResultsError("no results given: expected one or more results folders or results.json files")
    runs = []
    for p in paths:
        p = Path(p)
        runs.append(Run("", p / "results.json" if p.is_dir() else p, load_run(p)))
    names = [r.dir.resolve().name or str(r.dir) for r in runs]
    counts = Counter(names)
    seen: Counter[str] = Counter()
    for run, name in zip(runs, names):
        seen[name] += 1
        run.label = f"{name}#{seen[name]}" if counts[name] > 1 else name
    return runs


class FromCell(Generic[T]):
    """A CellView attribute that is its cell's attribute of the same name, as stored."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, view: CellView, owner: type | None = None) -> T:
        return cast(T, getattr(view.cell, self.name))


@dataclass
class CellView:
    run: Run
    cell: CellResult

    # ---- identity -------------------------------------------------------------------------------------------
    id = FromCell[str]()
    model = FromCell[str]()
    backend = FromCell[str]()
    workload = FromCell[str]()
    status = FromCell[str]()
    ok = FromCell[bool]()
    error_line = FromCell[str | None]()

    @property
    def unstable(self) -> str | None:
        """Why the cell's repetitions disagree, when they do."""
        return self.cell.unstable if self.ok else None

    @property
    def served_at_once(self) -> str | None:
        """"served 1 at a time (asked 4)" for a backend that serves fewer requests at once than the load asks."""
        cap = self.cell.concurrency_cap
        return cap.describe() if cap is not None and self.ok else None

    @property
    def base_workload(self) -> str:
        return self.cell.base_workload or self.workload

    @property
    def sweep(self) -> dict[str, int | float]:
        return dict(self.cell.sweep)

    @property
    def workload_spec(self) -> Workload | dict[str, Any] | None:
        """The concrete workload: stored with the cell, else (older results) the scenario's workload of that name."""
        if self.cell.workload_spec is not None:
            return self.cell.workload_spec
        return self.run.workloads.get(self.workload) or self.run.workloads.get(self.base_workload)

    @property
    def spec(self) -> Workload | None:
        """The concrete workload, where its settings can be read (None: not recorded, or not in a form this reads)."""
        spec = self.workload_spec
        return spec if isinstance(spec, Workload) else None

    # ---- metrics and resources ------------------------------------------------------------------------------
    def metric(self, name: str) -> float | None:
        """A number of the cell by its catalogue name: "ttft_ms.p50", "errors", "peak_vram_bytes"."""
        return statistic(name).value(self.cell)

    @property
    def resources(self) -> ResourceUsage | None:
        return self.cell.resources

    @property
    def whole(self) -> ResourceBlock:
        """The resource monitor's numbers over the whole cell (every one None when it has none)."""
        return self.resources.whole if self.resources and self.resources.whole else ResourceBlock()

    @property
    def peak_vram(self) -> tuple[int | None, str | None]:
        """(absolute bytes, measure name) of the first VRAM measure present."""
        return self.resources.peak_vram() if self.resources else (None, None)

    def unavailable(self, *words: str) -> str:
        """Why a resource was not measured, from resources.unavailable, for the measures named like `words`."""
        if self.resources is None:
            return "no resources block in these results"
        return self.resources.why_unavailable(*words)

    @property
    def vram_budget(self) -> int | None:
        return self.resources.vram_budget_bytes if self.resources else None

    @property
    def over_budget(self) -> bool:
        measured = self.resources.over_budget if self.resources else None
        return bool(self.cell.over_budget if measured is None else measured)

    @property
    def device(self) -> Literal["gpu", "cpu"] | None:
        """Where the engine ran: its own report first, then whether it used VRAM, then whether the host had a GPU."""
        d = self.cell.engine.device
        if d:
            return "cpu" if d.lower().startswith("cpu") else "gpu"
        if self.whole.max_process_vram_bytes:
            return "gpu"
        if (self.run.environment.get("gpu") or {}).get("available") is False:
            return "cpu"
        return None

    # ---- raw samples ----------------------------------------------------------------------------------------
    @cached_property
    def records(self) -> list[RequestRecord]:
        """The measured requests of this cell (empty when the file is gone)."""
        try:
            return read_requests(self.cell.requests_path(self.run.dir))
        except OSError:
            return []

    @cached_property
    def timeline(self) -> dict[str, Any] | None:
        path = self.run.dir / (self.cell.timeline_file or f"cells/{self.id}/timeline.json")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("t") else None

    def request_errors(self) -> Counter[str]:
        return Counter(r.error.strip().splitlines()[0] for r in self.records if r.error and r.error.strip())
