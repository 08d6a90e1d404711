"""`bench report`: one or several results files → a Markdown report and one self-contained HTML file.

The report decides first and explains after: the verdict per workload (the best backend on each headline metric,
its margin, and whether that margin is beyond noise), then the results with their 95% CIs and the plots, then
resources and failures, and the setup and environment last. Its numbers come from the results' DataFrame
(harness/results/frame.py), the one `bench export` writes.

Both formats render the same `ReportData` through Jinja2 templates. Every string that comes from a results
file (names, errors, model output) is escaped: by Jinja2's autoescape in HTML, by `md_escape` in Markdown.
Every number shown carries the cell id and run it came from.
"""

from __future__ import annotations

import functools
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import jinja2
import numpy as np
import pandas as pd
from markupsafe import Markup

from harness.analyze import plots
from harness.analyze.capacity import capacity_notes
from harness.analyze.plots import Plot
from harness.analyze.verdicts import MeasuredValue, Verdict
from harness.config.prompts import FilePrompts, LengthDist, SharedPrefixPrompts
from harness.config.scenario import CapacityLoad, ConcurrencyLoad, Load, PoissonLoad, TraceLoad, Workload
from harness.config.shapes import OversaturationStop, SteadyState
from harness.core.files import atomic_write, replace_written
from harness.results.catalogue import (REQUEST_METRICS, RequestMetric, fmt_interval, fmt_value, headline_label,
                                       split_name, statistic, verdict_name)
from harness.results.frame import frame_of
from harness.results.markdown import md_escape
from harness.results.runs import CellView, Run, load_runs, workload_of
from harness.results.summary import numbers_basis, queued
from llmbench.units import fmt_bytes

FORMATS = ("md", "html")
TEMPLATES = Path(__file__).parent / "templates"


# ---- the data model both templates render --------------------------------------------------------------------

@dataclass
class Num:
    """A number with its 95% CI, shown under it in HTML and beside it in Markdown; or the mark of an unstable cell."""
    text: str
    ci: str | None = None
    flag: str | None = None

    def __str__(self) -> str:
        return " ".join(filter(None, [self.text, self.ci, f"({self.flag})" if self.flag else None]))

    def __len__(self) -> int:
        return len(str(self))


@dataclass
class TableRow:
    values: list[str | Num]
    mark: str | None = None  # "failed", "over budget", "request errors", "unstable": the row is highlighted
    cell: str | None = None  # the cell the row's numbers come from, when it has no column of its own


@dataclass
class Table:
    headers: list[str]
    rows: list[TableRow]

    @classmethod
    def of(cls, headers: list[str], rows: Iterable[Iterable[str]]) -> Table:
        return cls(headers, [TableRow(list(r)) for r in rows])


@dataclass
class Section:
    name: str
    description: str
    table: Table
    plots: list[Plot] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a reader must know to read the table right


@dataclass
class VerdictTable:
    headers: list[str]  # workload (and model, run), then one per headline metric
    rows: list[tuple[list[str], list[Verdict | None]]]
    notes: list[str]


@dataclass
class ReportData:
    title: str
    generated: str
    notes: list[str]
    verdict: VerdictTable
    runs: Table
    scenarios: list[tuple[str, Table]]  # (the runs that share it, settings)
    environment: Table  # keys equal in every run
    environment_diff: Table | None  # keys whose values differ between runs; None for a single run
    sections: list[Section]
    resource_plots: list[Plot]
    failures: Table
    cells: Table
    agreement: Table | None = None  # whether greedy backends answered alike (record_outputs)
    prefix_reuse: Table | None = None  # what each engine says it reused from its prefix cache


# ---- building it ---------------------------------------------------------------------------------------------

def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """{'cpu': {'model': 'x'}} → {'cpu.model': 'x'}; lists are indexed."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(d, list) and d and any(isinstance(v, (dict, list)) for v in d):
        out = {}
        for i, v in enumerate(d):
            out.update(flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: d}


def show(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key.endswith("_bytes") and isinstance(v, (int, float)):
        return fmt_bytes(v)
    return json.dumps(v) if isinstance(v, (list, dict)) else str(v)


def environment_tables(runs: list[Run]) -> tuple[Table, Table | None]:
    """The settings every run shares, and (when comparing runs) those that differ, one column per run."""
    flat = [flatten(r.environment) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    same, diff = [], []
    for k in keys:
        values = [f.get(k) for f in flat]
        if all(k in f for f in flat) and all(v == values[0] for v in values):
            same.append([k, show(k, values[0])])
        else:
            diff.append([k] + [show(k, v) if k in f else "(absent)" for f, v in zip(flat, values)])
    return (Table.of(["setting", "value"], same),
            Table.of(["setting"] + [r.label for r in runs], diff) if len(runs) > 1 else None)


def setting(v: object) -> str:
    """A setting's value as its user wrote it: 5 for 5.0, 0.25 as 0.25."""
    return f"{v:g}" if isinstance(v, float) else str(v)


def describe_load(load: Load) -> str:
    if isinstance(load, ConcurrencyLoad):
        return f"concurrency {load.concurrency}"
    if isinstance(load, PoissonLoad):
        text = (f"Poisson arrivals at {setting(load.rate)} req/s" if load.burstiness == 1 else
                f"gamma arrivals (burstiness {load.burstiness:g}) at {setting(load.rate)} req/s")
        if ramp := load.ramp_up:
            text += f", ramped up {ramp.strategy}ly from {ramp.start_rate:g} req/s over {ramp.duration_s:g} s"
        return text + stop_text(load.oversaturation_stop)
    if isinstance(load, TraceLoad):
        return f"trace replay of {load.path.name} at speed ×{load.speedup:g}" + stop_text(load.oversaturation_stop)
    if isinstance(load, CapacityLoad):
        return f"capacity search over the {load.search}, attainment {load.attainment}"
    return load.type


def stop_text(stop: OversaturationStop | None) -> str:
    return "" if stop is None else f", stopped once over-saturated (after {stop.min_s:g} s at the earliest)"


def steady_state_text(window: SteadyState | None) -> str | None:
    if window is None:
        return None
    return (f"metrics over the steady state: requests scheduled in the first {window.skip_start_s:g} s "
            f"and the last {window.skip_end_s:g} s of each repetition left out")


WORKLOAD_KEYS = ("name", "input_tokens", "output_tokens", "num_requests", "load", "warmup_requests", "steady_state")


def describe_length(v: int | LengthDist | list[int] | None) -> str:
    """A length setting: a number, or a distribution in words ("lognormal, mean 64, std 32, 8–512")."""
    if not isinstance(v, LengthDist):
        return str(v)
    if v.dist == "fixed":
        return f"{v.mean:g}"
    parts = [f"{k} {x:g}" for k, x in (("mean", v.mean), ("std", v.std)) if x is not None]
    return ", ".join([v.dist, *parts, f"{v.min}–{v.max}"])


def describe_workload(stored: Workload | dict[str, Any] | None) -> str:
    """A workload's settings in words, read through the scenario's schema (its defaults, not the report's)."""
    w = workload_of(stored) if stored is not None else None
    if w is None:
        return (f"workload settings as stored, not read by this version: {json.dumps(stored)}" if stored
                else "workload settings not recorded")
    prompts = w.prompts
    if w.load.type == "trace":  # its rows give the lengths; the workload's are not used
        lengths = ["the trace’s own input and output tokens"]
    else:
        # A file's prompts are cut at input_tokens (truncate) and its replies' lengths come first: the settings are
        # caps and defaults there, not the lengths sent (the measured ones are stated beside them).
        file = prompts if isinstance(prompts, FilePrompts) else None
        lengths = [f"input tokens cut at {describe_length(w.input_tokens)}" if file and file.truncate
                   else "the prompts’ own input tokens" if w.input_tokens is None or file
                   else f"{describe_length(w.input_tokens)} input tokens",
                   f"output tokens from the data, else {describe_length(w.output_tokens)}"
                   if file and file.output_from == "data" else f"{describe_length(w.output_tokens)} output tokens"]
    parts = [*lengths, f"{w.num_requests} requests", describe_load(w.load), f"{w.warmup_requests} warm-up"]
    if window := steady_state_text(w.steady_state):
        parts.append(window)
    # The other settings the stored workload gives (sampling, prompt sources, ...) show as they are.
    parts += [f"{k}: {json.dumps(v)}" for k, v in w.model_dump(mode="json", exclude_unset=True).items()
              if k not in WORKLOAD_KEYS and v not in (None, {}, []) and v != {"type": "synthetic"}]
    return ", ".join(parts)


def length_range(values: list[float]) -> str:
    """"p50 25 (18–44)", or "exactly 128" when every request had it."""
    if min(values) == max(values):
        return f"exactly {values[0]}"
    return f"p50 {np.percentile(values, 50):g} ({min(values)}–{max(values)})"


def measured_lengths(cells: list[CellView]) -> str | None:
    """The input and output lengths the cells' requests really had (pooled over the cells that completed)."""
    done = [r for c in cells if c.ok for r in c.records if r.ok]
    if not done:
        return None
    inputs, outputs = (REQUEST_METRICS[k].samples(done) for k in ("input_len", "output_len"))
    return ", ".join(([f"input tokens {length_range(inputs)}"] if inputs else [])
                     + [f"output tokens {length_range(outputs)}"])


def scenario_rows(run: Run) -> list[tuple[str, str]]:
    s = dict(run.scenario)
    rows = [("name", str(s.pop("name", "?"))), ("scenario file", str(run.result.scenario_file or "?"))]
    for name, m in (s.pop("models", None) or {}).items():
        syn = (m or {}).get("synthetic")
        rows.append((f"model {name}", f"synthetic {syn.get('preset')} (seed {syn.get('seed')})" if syn
                     else str((m or {}).get("path"))))
    for b in s.pop("backends", None) or []:
        extra = {k: v for k, v in b.items() if k not in ("name", "kind") and v not in (None, {}, [])}
        rows.append((f"backend {b.get('name')}", f"{b.get('kind')} {json.dumps(extra)}" if extra
                     else str(b.get("kind"))))
    for w in s.pop("workloads", None) or []:
        rows.append((f"workload {w.get('name')}", describe_workload(w)))
    for k, v in s.items():
        if v not in (None, {}, []):
            rows.append((k, json.dumps(v) if isinstance(v, (dict, list)) else str(v)))
    return rows


def scenario_blocks(runs: list[Run]) -> list[tuple[str, Table]]:
    groups: dict[str, list[Run]] = defaultdict(list)
    for r in runs:
        groups[json.dumps(r.scenario, sort_keys=True)].append(r)
    return [(", ".join(r.label for r in rs), Table.of(["setting", "value"], scenario_rows(rs[0])))
            for rs in groups.values()]


class Labels:
    """Short names for cells in tables and plots: only the parts that tell cells apart are shown."""

    def __init__(self, cells: list[CellView]):
        self.models = len({c.model for c in cells}) > 1
        self.runs = len({c.run.label for c in cells}) > 1

    def backend(self, c: CellView) -> str:
        return " ".join([c.backend] + ([c.model] if self.models else []) + ([f"@{c.run.label}"] if self.runs else []))

    def served(self, c: CellView) -> str:
        """The backend, and how many it served at once where that is fewer than the load asked: a reader must see
        which cells held requests in a queue (their latencies count the wait, so all compare under one load)."""
        return self.backend(c) + (f" ({c.served_at_once})" if c.served_at_once else "")

    def series(self, c: CellView, *, without: str | None = None) -> str:
        """The backend and the cell's sweep point, less the swept setting `without`."""
        return " ".join([self.backend(c)] + [f"{k}={v}" for k, v in c.sweep.items() if k != without])


class Numbers:
    """The report's metric values and their CIs, read from the results' DataFrame (harness/results/frame.py): the
    report, `bench export` and a notebook show the same numbers."""

    def __init__(self, runs: list[Run]):
        frame = frame_of(runs)
        self._index: dict[tuple[str, str, str, str | None], tuple[float | None, tuple[float, float] | None]] = {}
        for r in frame.itertuples(index=False):
            stat = None if pd.isna(r.statistic) else r.statistic
            value = None if pd.isna(r.value) else float(r.value)
            ci = None if pd.isna(r.ci_low) or pd.isna(r.ci_high) else (float(r.ci_low), float(r.ci_high))
            self._index[(r.run, r.cell, r.metric, stat)] = (value, ci)

    def get(self, c: CellView, name: str) -> tuple[float | None, tuple[float, float] | None]:
        """(value, 95% CI) of a headline statistic ("ttft_ms.p50") or a scalar of the cell."""
        key, stat = split_name(name)
        return self._index.get((c.run.label, c.id, key, stat), (None, None))

    def num(self, c: CellView, name: str) -> Num | str:
        if not c.ok:
            return "–"
        v, ci = self.get(c, name)
        unit = statistic(name).unit
        if v is None:
            return fmt_value(None, unit)
        return Num(fmt_value(v, unit), fmt_interval(ci, unit, v) if ci and not c.unstable else None,
                   "unstable" if c.unstable else None)


def failures_text(c: CellView) -> str:
    if not c.ok:
        return c.error_line or c.status
    errors = c.metric("errors")
    if not errors:
        return "0"
    total = int(errors + (c.metric("completed") or 0))
    first = next(iter(c.request_errors()), None)
    return f"{int(errors)} of {total} requests" + (f": {first}" if first else "")


def streamed_from_disk(c: CellView) -> int:
    """Bytes the engine itself counted as streamed from its disk tier while serving (own engine's logical I/O), 0
    when none."""
    return c.cell.logical_io.streamed_from_disk() if c.cell.logical_io else 0


def page_cache_note(c: CellView, label: str) -> str | None:
    """A disk-offload cell whose offloaded bytes came from the page cache measured RAM, not the disk."""
    streamed, read = streamed_from_disk(c), c.whole.disk_read_bytes
    if not streamed or read is None or read >= 0.1 * streamed:
        return None
    device = c.whole.device_read_bytes
    return (f"{label}: the engine streamed {fmt_bytes(streamed)} from its disk tier, but its processes read "
            f"{fmt_bytes(read)} from storage (all devices, every process: "
            f"{'n/a' if device is None else fmt_bytes(device)}): the offloaded files were in the page cache, so its "
            f"\"disk\" numbers are RAM speed. For disk speed, set resources.drop_page_cache and leave the engine too "
            f"little RAM to cache them.")


def vram_text(c: CellView) -> str:
    v, _ = c.peak_vram
    if v is None:
        return "n/a"
    text = fmt_bytes(v)
    if c.vram_budget is not None:
        text += f" / {fmt_bytes(c.vram_budget)}" + (" OVER BUDGET" if c.over_budget else "")
    return text


def disk_text(c: CellView) -> str:
    r, w = c.whole.disk_read_bytes, c.whole.disk_write_bytes
    if r is None and w is None:
        return "n/a"
    streamed = streamed_from_disk(c)
    cached = f" ({fmt_bytes(streamed)} streamed, from the page cache)" if page_cache_note(c, "") else ""
    return f"read {fmt_bytes(r)}{cached}, written {fmt_bytes(w)}"


def ram_text(c: CellView) -> str:
    v = c.metric("max_rss_bytes")
    return fmt_bytes(v) if v is not None else "n/a"


# The results table: headline statistics with their CIs, then resources (a column nobody measured becomes one note).
METRIC_COLUMNS = ("ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50", "output_throughput_tok_s", "goodput_rps")
RESOURCE_COLUMNS: list[tuple[str, str, Callable[[CellView], str], tuple[str, ...]]] = [
    # (header, the measure's group name in notes, text, words naming it in resources.unavailable)
    ("peak VRAM / budget", "GPU measures (peak VRAM, utilisation, power, energy)", vram_text, ("vram", "gpu")),
    ("disk", "disk I/O", disk_text, ("disk",)),
    ("host RAM peak", "host RAM", ram_text, ("rss", "ram", "memory")),
]


def metric_header(name: str) -> str:
    unit = statistic(name).unit
    return f"{headline_label(name)}" + (f" ({unit})" if unit in ("ms",) else "")


SUMMARY_COLUMNS: list[tuple[str, Callable[..., Any]]] = [
    *((metric_header(n), lambda c, numbers, n=n: numbers.num(c, n)) for n in METRIC_COLUMNS),
    *((h, lambda c, numbers, f=f: f(c)) for h, _, f, _ in RESOURCE_COLUMNS),
    ("failures", lambda c, numbers: failures_text(c)),
]


def unmeasured(cells: list[CellView]) -> tuple[set[str], list[str]]:
    """Resource columns no cell has (left out, said once) and, for columns some cells lack, why they do."""
    dropped: set[str] = set()
    notes: list[str] = []
    for header, group, text, words in RESOURCE_COLUMNS:
        missing = [c for c in cells if c.ok and text(c) == "n/a"]
        if not missing:
            continue
        reasons = sorted({no_gpu_reason(c) if "gpu" in words else c.unavailable(*words) for c in missing})
        if len(missing) == len([c for c in cells if c.ok]):
            dropped.add(header)
            notes.append(f"{group}: not measured here: {'; '.join(reasons)}.")
        else:
            notes.append(f"{header} n/a for {', '.join(c.id for c in missing)}: {'; '.join(reasons)}.")
    return dropped, notes


def no_gpu_reason(c: CellView) -> str:
    gpu = c.run.environment.get("gpu") or {}
    if gpu.get("available") is False:
        return f"no NVIDIA GPU ({gpu.get('reason') or 'NVML found none'})"
    return c.unavailable("vram", "gpu")


def row_mark(c: CellView) -> str | None:
    if not c.ok:
        return c.status
    if c.over_budget:
        return "over budget"
    if c.metric("errors"):
        return "request errors"
    if c.ok and c.cell.client_limited:
        return "client limited"
    if c.unstable:
        return "unstable"
    return None


def client_text(c: CellView) -> str:
    """What the load generator says about itself: the rate it offered and achieved, how late it sent and ran."""
    m = c.cell.metrics
    if m is None or not m.keys():
        return "–"
    rates = fmt_value(m.value("achieved_rate_rps"), "req/s") + " sent"
    if (offered := m.value("offered_rate_rps")) is not None:
        rates = f"{fmt_value(offered, 'req/s')} offered, " + rates
    lags = [f"{label} p99 {fmt_value(m.value(f'{key}.p99'), 'ms')}"
            for key, label in (("dispatch_lag_ms", "dispatch lag"), ("loop_lag_ms", "loop lag"))]
    if (scheduled := m.value("e2el_including_client_queue_ms.p99")) is not None:
        lags.append(f"E2E latency p99 {fmt_value(scheduled, 'ms')} from the schedule, "
                    f"{fmt_value(m.value('e2el_ms.p99'), 'ms')} from the send")
    if c.cell.cpu_isolation is not None:
        lags.append(c.cell.cpu_isolation.describe())
    return ", ".join([rates, *lags]) + (" — client limited" if c.cell.client_limited else "")


def slugify(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:60] or "plot"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def request_samples(m: RequestMetric) -> Callable[[CellView], list[float]]:
    """A cell's per-request samples of `m`, from its requests.jsonl."""
    return lambda c: m.samples(c.records)


def workload_section(name: str, cells: list[CellView], labels: Labels, slugs: set[str], numbers: Numbers) -> Section:
    sweep_keys = list(dict.fromkeys(k for c in cells for k in c.sweep))
    dropped, notes = unmeasured(cells)
    columns = [(h, f) for h, f in SUMMARY_COLUMNS if h not in dropped]
    headers = ["backend"] + (["model"] if labels.models else []) + sweep_keys + (["run"] if labels.runs else [])
    headers += ["status"] + [h for h, _ in columns]
    rows = []
    for c in cells:
        values: list[str | Num] = [c.backend + (f" ({c.served_at_once})" if c.served_at_once else "")]
        values += ([c.model] if labels.models else []) + [show(k, c.sweep.get(k)) for k in sweep_keys]
        values += ([c.run.label] if labels.runs else []) + [c.status] + [f(c, numbers) for _, f in columns]
        rows.append(TableRow(values, row_mark(c), c.id))
    notes += capped_notes(cells, labels)
    notes += [f"{labels.series(c)} is unstable: {c.unstable}" for c in cells if c.unstable]
    notes += [f"{labels.series(c)} is client limited (its numbers describe the load generator more than the "
              f"engine; bench calibrate measures this machine's): {'; '.join(c.cell.client_limited_reasons)}"
              for c in cells if c.ok and c.cell.client_limited]
    notes += [f"{labels.series(c)}: the client's own queue moved its latencies beyond noise (coordinated omission), "
              f"so verdicts read them from the scheduled send: {'; '.join(c.cell.client_queue_shift)}"
              for c in cells if c.ok and c.cell.client_queue_shift]
    notes += [f"{labels.series(c)} stopped early, {why}" for c in cells if c.ok for why in c.cell.oversaturation]
    notes += [f"{labels.series(c)}: {outside:.0f} requests per repetition (median) outside the steady state, left "
              f"out of its metrics" for c in cells if c.ok and (outside := c.metric("outside_steady_state"))]
    notes += [n for c in cells if c.ok and (n := page_cache_note(c, labels.series(c)))]
    notes += capacity_notes(cells, labels.series)
    # The scenario's own definition of the workload, before any sweep expanded it.
    spec = next((w for c in cells if (w := c.run.workloads.get(name)) is not None),
                next((c.workload_spec for c in cells if c.workload_spec is not None), None))
    description = describe_workload(spec)
    if measured := measured_lengths(cells):
        description += f"; measured per request: {measured}"
    if sweep_keys:
        swept = ", ".join(f"{k} ∈ {{{', '.join(dict.fromkeys(show(k, c.sweep[k]) for c in cells if k in c.sweep))}}}"
                          for k in sweep_keys)
        description = f"swept over {swept}; as defined in the scenario: {description}"
    ok = [c for c in cells if c.ok]
    section_plots = [
        plots.interval_plot(slugify(f"medians-{name}", slugs), f"Medians with 95% CIs: {name}", ok, labels.series,
                            [statistic(k) for k in ("ttft_ms.p50", "tpot_ms.p50", "output_throughput_tok_s")]),
        *(plots.box_plot(slugify(f"{m.key.removesuffix('_ms')}-{name}", slugs), f"{m.label} per request: {name}",
                         ok, labels.series, request_samples(m), f"{m.label} ({m.unit})")
          for m in (REQUEST_METRICS["ttft_ms"], REQUEST_METRICS["tpot_ms"])),
    ]
    for axis in sweep_keys:
        what = "Throughput and latency" if axis.startswith("load.") else "Latency and throughput"
        against = "context length (input_tokens)" if axis == "input_tokens" else axis
        section_plots.append(plots.sweep_plot(slugify(f"sweep-{name}-{axis}", slugs), f"{what} vs {against}: {name}",
                                              axis, cells, functools.partial(labels.series, without=axis)))
    section_plots.append(plots.pareto_plot(slugify(f"pareto-{name}", slugs), f"Throughput vs latency: {name}",
                                           cells, labels.series, labels.backend))
    if any(c.cell.capacity for c in ok):
        section_plots.append(plots.capacity_plot(slugify(f"capacity-{name}", slugs),
                                                 f"Capacity search steps: {name}", ok, labels.series))
    return Section(name, description, Table(headers, rows), section_plots, notes)


# ---- the verdict -----------------------------------------------------------------------------------------------

VERDICT_METRICS = ("ttft_ms.p50", "tpot_ms.p50", "e2el_ms.p50", "output_throughput_tok_s", "goodput_rps")


def verdict(cells: list[CellView], name: str, numbers: Numbers, label: Callable[[CellView], str]) -> Verdict | None:
    """The ok cells' numbers on one headline statistic, best first (harness/analyze/verdicts.py decides). A cell
    whose client's own queue moved its latencies beyond noise is read from the scheduled send."""
    better = statistic(name).better
    measured = []
    for c in cells:
        v, ci = numbers.get(c, verdict_name(name, bool(c.cell.client_queue_shift))) if c.ok else (None, None)
        if v is not None:
            measured.append(MeasuredValue(backend=label(c), value=v, ci=ci, unstable=bool(c.unstable)))
    if not measured:
        return None
    measured.sort(key=lambda x: x.value if better == "lower" else -x.value)
    return Verdict(metric=name, measured=measured)


def capped_notes(cells: list[CellView], labels: Labels) -> list[str]:
    """What the cells whose backend serves fewer at once than the load asks measured."""
    return [f"{labels.series(c)}: {queued(cap)}" for c in cells if c.ok and (cap := c.cell.concurrency_cap)]


def verdict_table(cells: list[CellView], labels: Labels, numbers: Numbers) -> VerdictTable:
    """One row per workload (each sweep point is one; per model and run too when there are several)."""
    groups: dict[tuple[str | None, str], list[CellView]] = defaultdict(list)
    for c in cells:
        groups[(c.model if labels.models else None, c.workload)].append(c)
    names = [n for n in VERDICT_METRICS if any(c.ok and numbers.get(c, n)[0] is not None for c in cells)]
    rows = []
    for (model, workload), cs in groups.items():
        rows.append(([workload] + ([model] if model is not None else []),
                     [verdict(cs, n, numbers, labels.served) for n in names]))
    notes = [f"{labels.series(c)} {c.status}: {c.error_line or c.status}" for c in cells if not c.ok]
    notes += capped_notes(cells, labels)
    notes += [f"{labels.series(c)}: its TTFT and E2E latency are read from the scheduled send time, the client's "
              f"own queue included ({'; '.join(c.cell.client_queue_shift)})"
              for c in cells if c.ok and c.cell.client_queue_shift]
    notes += [f"{labels.series(c)} is unstable (its repetitions disagree): its medians are not typical values"
              for c in cells if c.unstable]
    headers = ["workload"] + (["model"] if labels.models else []) + [metric_header(n) for n in names]
    return VerdictTable(headers, rows, notes)


def resource_plots(cells: list[CellView], labels: Labels, slugs: set[str]) -> tuple[list[Plot], list[str]]:
    several = len({c.base_workload for c in cells}) > 1
    out = []
    if any(c.peak_vram[0] is not None for c in cells):
        out.append(plots.vram_plot(slugify("vram", slugs), "Peak VRAM per cell", cells,
                                   lambda c: labels.series(c) + (f" · {c.base_workload}" if several else "")))
    with_tl = [c for c in cells if c.timeline]
    for c in with_tl:
        out.append(plots.timeline_plot(slugify(f"timeline-{c.run.label}-{c.id}", slugs),
                                       f"Resources over time: {c.id} ({c.run.label})", c))
    missing = [c for c in cells if not c.timeline and c.status != "skipped"]
    notes = []
    if missing:
        notes.append(f"No resource timeline (cells/<id>/timeline.json) for {len(missing)} cell(s): "
                     + ", ".join(f"{c.id} ({c.run.label})" for c in missing))
    return out, notes


def failures_table(cells: list[CellView]) -> Table:
    """Failed cells with their error's first line, and the commonest request errors of cells that completed."""
    rows = []
    for c in cells:
        if not c.ok:
            rows.append(TableRow([c.id, c.run.label, f"cell {c.status}", (c.error_line or "(no error recorded)")[:500]],
                            c.status))
        elif c.metric("errors"):
            for msg, n in c.request_errors().most_common(5):
                rows.append(TableRow([c.id, c.run.label, f"{n} request(s) failed", msg[:500]], "request errors"))
    return Table(["cell", "run", "what", "error (first line)"], rows)


def cells_table(cells: list[CellView]) -> Table:
    """Where every number comes from: each cell's results file, engine, token count sources, raw requests."""
    rows = []
    for c in cells:
        tc = c.cell.token_counts
        tokens = "–"
        if tc is not None:
            tokens = f"input: {', '.join(tc.input or ['?'])}; output: {', '.join(tc.output or ['?'])}"
            exact = tc.exact_output_length
            tokens += "; exact output length" if exact else "; output length not forced" if exact is False else ""
        engine = ", ".join(f"{k}={v}" for k, v in c.cell.engine.model_dump().items()) or "–"
        rows.append([c.id, c.run.label, f"{c.backend} ({c.cell.backend_kind or '?'})", c.status,
                     fmt_value(c.cell.load_time_s, "s"), fmt_value(c.cell.prepare_time_s, "s"),
                     c.cell.ci_method or "–", tokens, client_text(c), engine,
                     f"{c.run.path} → {c.cell.requests_file or '–'}"])
    return Table.of(["cell", "run", "backend (kind)", "status", "load time", "one-off preparation", "CIs by",
                     "token counts from", "client", "engine", "results file → per-request samples"], rows)


def agreement_table(runs: list[Run]) -> Table | None:
    """results.json's agreement rows (harness/results/agreement.py), each share with its 95% interval."""
    rows = [[r.label, a.model, a.workload, a.backend, a.reference,
             f"{a.share:.0%} [{a.ci[0]:.0%}, {a.ci[1]:.0%}]", f"{a.matching}/{a.compared}",
             f"first {a.first_n} {a.unit}", f"{a.mean_common_prefix:.1f} {a.unit}",
             a.precision if a.precision != "unknown" else "unknown: differences may be precision, not bugs"]
            for r in runs for a in r.result.agreement]
    if not rows:
        return None
    return Table.of(["run", "model", "workload", "backend", "reference", "share matching (95% CI)", "requests",
                     "compared", "mean common prefix", "precision"], rows)


def prefix_reuse_table(runs: list[Run]) -> Table | None:
    """Each cell's prefix_reuse: prompt tokens its engine says it took from its cache, of those the cell sent."""
    rows = []
    for r in runs:
        for c in r.result.cells:
            reuse = c.prefix_reuse
            if reuse is None:
                continue
            sent, reused = reuse.prompt_tokens, reuse.reused_tokens
            rows.append([r.label, c.model, c.workload, c.backend,
                         f"{reused:,}" if reused is not None else "not reported",
                         f"{sent:,}" if sent is not None else "–",
                         f"{reused / sent:.0%}" if reused is not None and sent else "–",
                         reuse.source + (f"; {why}" if (why := why_no_reuse(CellView(r, c))) else "")])
    if not rows:
        return None
    return Table.of(["run", "model", "workload", "backend", "prompt tokens reused", "prompt tokens sent", "share",
                     "counted by"], rows)


def why_no_reuse(c: CellView) -> str | None:
    """Why an engine that reuses whole KV blocks reused nothing of a shared prefix shorter than one block."""
    prompts = c.spec.prompts if c.spec else None
    prefix = prompts.prefix_tokens if isinstance(prompts, SharedPrefixPrompts) else None
    block, reuse = c.cell.engine.block_size, c.cell.prefix_reuse
    if not (reuse and reuse.reused_tokens == 0 and prefix is not None and block is not None and prefix < block):
        return None
    return (f"0 reused: the shared prefix ({prefix} tokens) is shorter than the engine's KV block ({block} tokens), "
            f"and it reuses whole blocks only (a smaller options.block_size would let it)")


def build_report(runs: list[Run]) -> ReportData:
    cells = [c for r in runs for c in r.cells]
    labels = Labels(cells)
    numbers = Numbers(runs)
    slugs: set[str] = set()
    by_workload: dict[str, list[CellView]] = defaultdict(list)
    for c in cells:
        by_workload[c.base_workload].append(c)
    sections = [workload_section(name, cs, labels, slugs, numbers) for name, cs in by_workload.items()]
    res_plots, notes = resource_plots(cells, labels, slugs)
    same, diff = environment_tables(runs)
    names = list(dict.fromkeys(str(r.scenario.get("name", "?")) for r in runs))
    reps = sorted({str(r.scenario.get("repetitions", "?")) for r in runs})
    methods = sorted({c.cell.ci_method for c in cells if c.cell.ci_method})
    notes.insert(0, f"Numbers are {numbers_basis(' / '.join(reps), [c.cell for c in cells])}"
                    + (f", with their 95% confidence intervals in brackets ({', '.join(methods)})" if methods else "")
                    + "; metric definitions follow vLLM's serving benchmark (docs/metrics.md). '–' means not "
                      "applicable (failed cell), 'n/a' means not measured, with the reason beside the table.")
    if not cells:
        notes.append("These results have no cells.")
    runs_table = Table.of(["run", "results file", "scenario", "created", "updated", "host", "cells"],
                          [[r.label, str(r.path), str(r.scenario.get("name", "?")), str(r.result.created or "?"),
                            str(r.result.updated or "?"), str(r.environment.get("hostname") or "?"),
                            str(len(r.cells))] for r in runs])
    return ReportData(
        title="llmbench report: " + ", ".join(names),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes, verdict=verdict_table(cells, labels, numbers), runs=runs_table,
        scenarios=scenario_blocks(runs), environment=same, environment_diff=diff,
        sections=sections, resource_plots=res_plots, failures=failures_table(cells), cells=cells_table(cells),
        agreement=agreement_table(runs), prefix_reuse=prefix_reuse_table(runs),
    )


# ---- rendering -----------------------------------------------------------------------------------------------

def _md_finalize(v: Any) -> str:
    if v is None:
        return ""
    return str(v) if isinstance(v, Markup) else md_escape(str(v))


def environment(fmt: str) -> jinja2.Environment:
    if fmt == "html":
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    else:
        # Markdown has no autoescape: every {{ }} goes through md_escape unless it is our own Markup.
        env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=False, finalize=_md_finalize,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    return env


def render(data: Any, template: str, fmt: str, **extra: Any) -> str:
    return environment(fmt).get_template(template).render(r=data, **extra)


def parse_formats(text: str | Iterable[str]) -> tuple[str, ...]:
    items = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    bad = [t for t in items if t not in FORMATS]
    if bad or not items:
        raise ValueError(f"expected formats from {', '.join(FORMATS)} separated by commas, got {text!r}")
    return tuple(dict.fromkeys(items))


def write_report(results: list[Path | str], out_dir: Path | str, formats: Iterable[str] = FORMATS) -> list[Path]:
    """Write report.md (plots under plots/) and/or report.html (plots inlined) into out_dir; return the paths.

    `results`: results folders or results.json files, one per run. Raises ResultsError for unreadable results.
    """
    formats = parse_formats(formats)
    data = build_report(load_runs(list(results)))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if "md" in formats:
        # Plots of an earlier report that this one does not draw go; nothing else in plots/ is ever touched.
        replace_written(out_dir / "plots", {f"{p.slug}.png": p.png for p in all_plots(data) if p.png}, "bench report")
        path = out_dir / "report.md"
        atomic_write(path, render(data, "report.md.j2", "md", image=lambda p: Markup(f"plots/{p.slug}.png")))
        written.append(path)
    if "html" in formats:
        path = out_dir / "report.html"
        atomic_write(path, render(data, "report.html.j2", "html"))
        written.append(path)
    return written


def all_plots(data: ReportData) -> list[Plot]:
    return [p for s in data.sections for p in s.plots] + data.resource_plots
