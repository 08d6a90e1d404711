"""Reading results for reports and guides: runs, a view of each cell, and the catalog of metrics they rank by.

Reports and guides are pure functions of results files; everything they know about a cell goes through
`CellView`, so old results (no resources, no sweeps) degrade to "not measured" in one place.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal

from harness.metrics import RequestRecord
from harness.results import ResultsError, load_results

# VRAM measures in order of preference: the backend's own processes, then the whole GPU, then torch's allocator.
# NVML peaks are stored above the idle baseline; adding the baseline back gives what the card had to hold,
# which is what `over_budget` compares with the budget (docs/resources.md).
VRAM_MEASURES = (("max_process_vram_bytes", "process_vram_bytes"), ("max_global_vram_bytes", "global_vram_bytes"),
                 ("max_reserved_bytes", None), ("max_allocated_bytes", None))
RECORD_FIELDS = {f.name for f in fields(RequestRecord)}


@dataclass
class Run:
    label: str
    path: Path  # the results.json
    data: dict[str, Any]

    @property
    def dir(self) -> Path:
        return self.path.parent

    @property
    def scenario(self) -> dict[str, Any]:
        return self.data.get("scenario") or {}

    @property
    def environment(self) -> dict[str, Any]:
        return self.data.get("environment") or {}

    @cached_property
    def cells(self) -> list[CellView]:
        return [CellView(self, c) for c in self.data.get("cells", [])]


def load_runs(paths: list[Path | str]) -> list[Run]:
    """Each path a results folder or results.json; labels are the folder names, numbered where they repeat."""
    if not paths:
        raise ResultsError("no results given: expected one or more results folders or results.json files")
    runs = []
    for p in paths:
        p = Path(p)
        data = load_results(p)
        runs.append(Run("", p / "results.json" if p.is_dir() else p, data))
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
    raw: dict[str, Any]

    # ---- identity -------------------------------------------------------------------------------------------
    @property
    def id(self) -> str:
        return str(self.raw.get("id", "?"))

    @property
    def model(self) -> str:
        return str(self.raw.get("model", "?"))

    @property
    def backend(self) -> str:
        return str(self.raw.get("backend", "?"))

    @property
    def workload(self) -> str:
        return str(self.raw.get("workload", "?"))

    @property
    def status(self) -> str:
        return str(self.raw.get("status", "?"))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def error_line(self) -> str | None:
        e = self.raw.get("error")
        return str(e).strip().splitlines()[0] if e and str(e).strip() else None

    @property
    def base_workload(self) -> str:
        return str(self.raw.get("base_workload") or self.workload)

    @property
    def sweep(self) -> dict[str, Any]:
        return dict(self.raw.get("sweep") or {})

    @property
    def workload_spec(self) -> dict[str, Any]:
        """The concrete workload: stored with the cell by sweeps, else the scenario's workload of that name."""
        if isinstance(self.raw.get("workload_spec"), dict):
            return self.raw["workload_spec"]
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
        return self.raw.get("metrics") or {}

    def number(self, key: str) -> float | None:
        """A numeric top-level field of the cell (e.g. load_time_s), None when absent."""
        v = self.raw.get(key)
        return v if isinstance(v, (int, float)) else None

    def metric(self, key: str, stat: str | None = None) -> float | None:
        v = self.metrics.get(key)
        if isinstance(v, dict):
            v = v.get(stat or "p50")
        return v if isinstance(v, (int, float)) else None

    @property
    def resources(self) -> dict[str, Any] | None:
        r = self.raw.get("resources")
        return r if isinstance(r, dict) else None

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
        return bool((self.resources or {}).get("over_budget", self.raw.get("over_budget")))

    @property
    def device(self) -> Literal["gpu", "cpu"] | None:
        """Where the engine ran: its own report first, then whether it used VRAM, then whether the host had a GPU."""
        d = (self.raw.get("engine") or {}).get("device")
        if isinstance(d, str) and d:
            return "cpu" if d.lower().startswith("cpu") else "gpu"
        vram = self.whole("max_process_vram_bytes")
        if vram:
            return "gpu"
        if (self.run.environment.get("gpu") or {}).get("available") is False:
            return "cpu"
        return None

    # ---- raw samples ----------------------------------------------------------------------------------------
    @cached_property
    def records(self) -> list[RequestRecord]:
        """The measured requests of this cell from its requests.jsonl (empty when the files are gone)."""
        candidates = [self.run.dir / self.raw["requests_file"]] if self.raw.get("requests_file") else []
        candidates += [self.run.dir / "cells" / self.id / "requests.jsonl", self.run.dir / "requests.jsonl"]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return []
        out = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash; the reducer skipped it too
            if isinstance(d, dict) and d.get("cell", self.id) == self.id and "t_send" in d:
                out.append(RequestRecord(**{k: v for k, v in d.items() if k in RECORD_FIELDS}))
        return out

    @cached_property
    def timeline(self) -> dict[str, Any] | None:
        path = self.run.dir / (self.raw.get("timeline_file") or f"cells/{self.id}/timeline.json")
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return data if isinstance(data, dict) and data.get("t") else None

    def request_errors(self) -> Counter:
        return Counter(r.error.strip().splitlines()[0] for r in self.records if r.error and r.error.strip())


# ---- the metric catalog: names users write in guide rules --------------------------------------------------

@dataclass(frozen=True)
class Metric:
    label: str
    unit: str  # "ms", "tok/s", "req/s", "bytes", "s", "ratio"
    better: Literal["lower", "higher"]
    get: Callable[[CellView], float | None]
    resource: tuple[str, ...] = ()  # words naming it in resources.unavailable, for saying why it is missing
    floor: float = 0.0  # the metric's resolution: smaller values are equally good when ranking

    def why_missing(self, c: CellView) -> str:
        return c.unavailable(*self.resource) if self.resource else "not recorded"


def _catalog() -> dict[str, Metric]:
    out: dict[str, Metric] = {}
    for dist, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        for stat in ("mean", "p50", "p90", "p95", "p99"):
            out[f"{dist}_{stat}_ms"] = Metric(f"{label} {stat}", "ms", "lower",
                                              lambda c, k=f"{dist}_ms", s=stat: c.metric(k, s))
    for dist, label in (("prefill_tps", "prefill tok/s"), ("decode_tps", "decode tok/s")):
        out[f"{dist}_p50"] = Metric(f"{label} p50", "tok/s", "higher", lambda c, k=dist: c.metric(k, "p50"))
    for key, label, unit in (("output_throughput_tok_s", "output tok/s", "tok/s"),
                             ("total_token_throughput_tok_s", "total tok/s", "tok/s"),
                             ("request_throughput_rps", "req/s", "req/s"),
                             ("goodput_rps", "goodput req/s", "req/s")):
        out[key] = Metric(label, unit, "higher", lambda c, k=key: c.metric(k))
    out["error_rate"] = Metric("error rate", "ratio", "lower", lambda c: c.metric("error_rate"), floor=1e-3)
    out["load_time_s"] = Metric("load time", "s", "lower", lambda c: c.number("load_time_s"))
    out["peak_vram_bytes"] = Metric("peak VRAM", "bytes", "lower", lambda c: c.peak_vram[0], ("vram", "gpu"))
    out["max_rss_bytes"] = Metric("peak host RAM", "bytes", "lower", lambda c: c.whole("max_rss_bytes"),
                                  ("rss", "ram", "memory"))
    out["disk_read_bytes"] = Metric("disk read", "bytes", "lower", lambda c: c.whole("disk_read_bytes"), ("disk",))
    out["ttft_p99_cv"] = Metric("TTFT p99 spread (CV over repetitions)", "ratio", "lower",
                                lambda c: c.metric("ttft_p99_cv"), floor=0.01)
    return out


METRICS: dict[str, Metric] = _catalog()


# ---- formatting shared by reports and guides ----------------------------------------------------------------

def fmt_bytes(v: float | None) -> str:
    if v is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(v) >= scale:
            return f"{v / scale:.2f} {unit}"
    return f"{v:.0f} B"


def fmt_value(v: float | None, unit: str) -> str:
    if v is None:
        return "n/a"
    if unit == "bytes":
        return fmt_bytes(v)
    if unit == "ratio":
        return f"{v:.3g}"
    if unit == "ms":
        return f"{v:.2f} ms" if abs(v) < 10 else f"{v:.1f} ms"
    return f"{v:.2f} {unit}" if abs(v) < 100 else f"{v:.1f} {unit}"
