"""Reading results for reports, guides and plots: runs, a view of each cell, and the metrics they rank by.

Reports and guides are pure functions of results files, read through `harness.records.load_run`; what they derive
from a cell (peak VRAM, device, why a measure is missing) is in `CellView`, in one place.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal

from harness.records import CellResult, RequestRecord, ResultsError, RunResult, load_run, read_requests
from harness.results.catalogue import CATALOGUE, HEADLINE, RANKED_STATISTICS
from own_engine.units import fmt_bytes

# VRAM measures in order of preference: the backend's own processes, then the whole GPU, then torch's allocator.
# NVML peaks are stored above the idle baseline; adding the baseline back gives what the card had to hold,
# which is what `over_budget` compares with the budget (docs/resources.md).
VRAM_MEASURES = (("max_process_vram_bytes", "process_vram_bytes"), ("max_global_vram_bytes", "global_vram_bytes"),
                 ("max_reserved_bytes", None), ("max_allocated_bytes", None))


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
    def cells(self) -> list[CellView]:
        return [CellView(self, c) for c in self.result.cells]


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
    seen: Counter = Counter()
    for run, name in zip(runs, names):
        seen[name] += 1
        run.label = f"{name}#{seen[name]}" if counts[name] > 1 else name
    return runs


@dataclass
class CellView:
    run: Run
    cell: CellResult

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return self.cell.id

    @property
    def model(self) -> str:
        return self.cell.model

    @property
    def backend(self) -> str:
        return self.cell.backend

    @property
    def workload(self) -> str:
        return self.cell.workload

    @property
    def status(self) -> str:
        return self.cell.status

    @property
    def ok(self) -> bool:
        return self.cell.ok

    @property
    def error_line(self) -> str | None:
        return self.cell.error_line

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
    def sweep(self) -> dict[str, Any]:
        return dict(self.cell.sweep)

    @property
    def workload_spec(self) -> dict[str, Any]:
        """The concrete workload: stored with the cell by sweeps, else the scenario's workload of that name."""
        if self.cell.workload_spec is not None:
            return self.cell.workload_spec
        for w in self.run.scenario.get("workloads", []):
            if w.get("name") in (self.workload, self.base_workload):
                return w
        return {}

    def spec_value(self, key: str) -> Any:
        """A workload setting by dotted key, e.g. 'input_tokens' or 'load.concurrency'."""
        v: Any = self.workload_spec
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return v

    # ---- metrics --------------------------------------------------------------------------------------------
    @property
    def metrics(self) -> dict[str, Any]:
        return self.cell.metrics or {}

    def metric(self, key: str, stat: str | None = None) -> float | None:
        v = self.metrics.get(key)
        if isinstance(v, dict):
            v = v.get(stat or "p50")
        return v if isinstance(v, (int, float)) else None

    @property
    def resources(self) -> dict[str, Any] | None:
        return self.cell.resources

    def whole(self, key: str) -> float | None:
        v = ((self.resources or {}).get("whole") or {}).get(key)
        return v if isinstance(v, (int, float)) else None

    @property
    def peak_vram(self) -> tuple[float | None, str | None]:
        """(absolute bytes, measure name) of the first VRAM measure present."""
        baseline = (self.resources or {}).get("baseline") or {}
        for measure, base in VRAM_MEASURES:
            v = self.whole(measure)
            if v is not None:
                b = baseline.get(base) if base else None
                return v + (b if isinstance(b, (int, float)) else 0), measure
        return None, None

    def unavailable(self, *words: str) -> str:
        """Why a resource was not measured, from resources.unavailable, for the measures named like `words`."""
        if self.resources is None:
            return "no resources block in these results"
        reasons = {str(v) for k, v in (self.resources.get("unavailable") or {}).items()
                   if any(w in str(k).lower() for w in words)}
        return "; ".join(sorted(reasons)) or "not measured"

    @property
    def vram_budget(self) -> float | None:
        v = (self.resources or {}).get("vram_budget_bytes")
        return v if isinstance(v, (int, float)) else None

    @property
    def over_budget(self) -> bool:
        return bool((self.resources or {}).get("over_budget", self.cell.over_budget))

    @property
    def device(self) -> Literal["gpu", "cpu"] | None:
        """Where the engine ran: its own report first, then whether it used VRAM, then whether the host had a GPU."""
        d = self.cell.engine.get("device")
        if isinstance(d, str) and d:
            return "cpu" if d.lower().startswith("cpu") else "gpu"
        if self.whole("max_process_vram_bytes"):
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

    def request_errors(self) -> Counter:
        return Counter(r.error.strip().splitlines()[0] for r in self.records if r.error and r.error.strip())


# ---- the metrics guides and reports rank by, named as users write them in guide rules ------------------------------

@dataclass(frozen=True)
class Metric:
    label: str
    unit: str  # "ms", "tok/s", "req/s", "bytes", "s", "ratio"
    better: Literal["lower", "higher"]
    get: Callable[[CellView], float | None]
    resource: tuple[str, ...] = ()  # words naming it in resources.unavailable, for saying why it is missing
    floor: float = 0.0  # the metric's resolution: smaller values are equally good when ranking
    headline: str | None = None  # its name in a cell's `ci` and `cv` (catalogue.HEADLINE), when it has a CI

    def why_missing(self, c: CellView) -> str:
        return c.unavailable(*self.resource) if self.resource else "not recorded"

    def interval(self, c: CellView) -> tuple[float, float] | None:
        """The cell's 95% CI of this metric, when the results have one."""
        return c.cell.interval(self.headline) if self.headline else None


# Cell-scope metrics of the catalogue: how each is read from a cell, and the words naming it in `unavailable`.
CELL_READERS: dict[str, tuple[Callable[[CellView], float | None], tuple[str, ...]]] = {
    "ttft_p99_cv": (lambda c: c.metric("ttft_p99_cv"), ()),
    "capacity_rps": (lambda c: c.cell.capacity.capacity_rps if c.cell.capacity else None, ()),
    "load_time_s": (lambda c: c.cell.load_time_s, ()),
    "prepare_time_s": (lambda c: c.cell.prepare_time_s, ()),
    "peak_vram_bytes": (lambda c: c.peak_vram[0], ("vram", "gpu")),
    "max_rss_bytes": (lambda c: c.whole("max_rss_bytes"), ("rss", "ram", "memory")),
    "disk_read_bytes": (lambda c: c.whole("disk_read_bytes"), ("disk",)),
}


def _ranked() -> dict[str, Metric]:
    """From the catalogue: DIST_STAT_UNIT for distributions (ttft_p99_ms, decode_tps_p50), scalars and cell metrics
    by their key. Context-only metrics (no better direction) are not ranked."""
    out: dict[str, Metric] = {}
    for key, m in CATALOGUE.items():
        if m.better is None:
            continue
        if m.scope == "distribution":
            stats = RANKED_STATISTICS if m.unit == "ms" else ("p50",)
            for stat in stats:
                name = f"{key.removesuffix('_ms')}_{stat}_ms" if m.unit == "ms" else f"{key}_{stat}"
                out[name] = Metric(f"{m.label} {stat}", m.unit, m.better, lambda c, k=key, s=stat: c.metric(k, s),
                                   floor=m.floor, headline=f"{key}.{stat}" if f"{key}.{stat}" in HEADLINE else None)
        elif m.scope == "scalar":
            out[key] = Metric(m.label, m.unit, m.better, lambda c, k=key: c.metric(k), floor=m.floor,
                              headline=key if key in HEADLINE else None)
        else:
            get, words = CELL_READERS[key]
            out[key] = Metric(m.label, m.unit, m.better, get, words, m.floor)
    return out


METRICS: dict[str, Metric] = _ranked()


def fmt_number(v: float, unit: str, like: float | None = None) -> str:
    """The number as fmt_value writes it, without the unit (bytes keep theirs); with the precision `like` would
    get, so the bounds of an interval read like its value."""
    if unit == "bytes":
        return fmt_bytes(v)
    if unit == "ratio":
        return f"{v:.3g}"
    return f"{v:.2f}" if abs(v if like is None else like) < (10 if unit == "ms" else 100) else f"{v:.1f}"


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    return fmt_number(v, unit) + ("" if unit in ("bytes", "ratio") else f" {unit}")


def fmt_interval(ci: tuple[float, float], unit: str, value: float) -> str:
    """A 95% CI as [low–high], in the value's format."""
    return f"[{fmt_number(ci[0], unit, value)}–{fmt_number(ci[1], unit, value)}]"
