"""`bench report`: one or several results files → a Markdown report and one self-contained HTML file.

Both formats render the same `ReportData` through Jinja2 templates. Every string that comes from a results
file (names, errors, model output) is escaped: by Jinja2's autoescape in HTML, by `md_escape` in Markdown.
Every number shown carries the cell id and run it came from.
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import jinja2
from markupsafe import Markup

from harness.analyze import plots
from harness.analyze.plots import Plot
from harness.results.markdown import md_escape
from harness.results.runs import METRICS, CellView, Run, fmt_value, load_runs
from own_engine.units import fmt_bytes

FORMATS = ("md", "html")
TEMPLATES = Path(__file__).parent / "templates"


# ---- the data model both templates render --------------------------------------------------------------------

@dataclass
class Row:
    values: list[str]
    mark: str | None = None  # "failed", "over budget", "request errors": the row is highlighted


@dataclass
class Table:
    headers: list[str]
    rows: list[Row]

    @classmethod
    def of(cls, headers: list[str], rows: Iterable[Iterable[str]]) -> Table:
        return cls(headers, [Row(list(r)) for r in rows])


@dataclass
class Section:
    name: str
    description: str
    table: Table
    plots: list[Plot] = field(default_factory=list)


@dataclass
class ReportData:
    title: str
    generated: str
    notes: list[str]
    runs: Table
    scenarios: list[tuple[str, Table]]  # (the runs that share it, settings)
    environment: Table  # keys equal in every run
    environment_diff: Table | None  # keys whose values differ between runs; None for a single run
    sections: list[Section]
    resource_plots: list[Plot]
    failures: Table
    cells: Table


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


def describe_load(load: Any) -> str:
    if not isinstance(load, dict):
        return "sequential"
    kind = load.get("type", "sequential")
    if kind == "concurrency":
        return f"concurrency {load.get('concurrency')}"
    if kind == "poisson":
        return f"Poisson arrivals at {load.get('rate')} req/s"
    return str(kind)


WORKLOAD_KEYS = ("name", "input_tokens", "output_tokens", "num_requests", "load", "warmup_requests")


def describe_workload(w: dict[str, Any]) -> str:
    if not w:
        return "workload settings not recorded"
    parts = [f"{w.get('input_tokens')} input tokens", f"{w.get('output_tokens')} output tokens",
             f"{w.get('num_requests')} requests", describe_load(w.get("load"))]
    if w.get("warmup_requests") is not None:
        parts.append(f"{w['warmup_requests']} warm-up")
    # Settings added after this was written (sweeps, prompt sources) still show, as they are.
    parts += [f"{k}: {json.dumps(v)}" for k, v in w.items()
              if k not in WORKLOAD_KEYS and v not in (None, {}, []) and v != {"type": "synthetic"}]
    return ", ".join(parts)


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

    def series(self, c: CellView, *, without: str | None = None) -> str:
        """The backend and the cell's sweep point, less the swept setting `without`."""
        return " ".join([self.backend(c)] + [f"{k}={v}" for k, v in c.sweep.items() if k != without])


def failures_text(c: CellView) -> str:
    if not c.ok:
        return c.error_line or c.status
    errors = c.metric("errors")
    if not errors:
        return "0"
    total = int(errors + (c.metric("completed") or 0))
    first = next(iter(c.request_errors()), None)
    return f"{int(errors)} of {total} requests" + (f": {first}" if first else "")


def vram_text(c: CellView) -> str:
    v, _ = c.peak_vram
    if v is None:
        return f"n/a ({METRICS['peak_vram_bytes'].why_missing(c)})"
    text = fmt_bytes(v)
    if c.vram_budget is not None:
        text += f" / {fmt_bytes(c.vram_budget)}" + (" OVER BUDGET" if c.over_budget else "")
    return text


def disk_text(c: CellView) -> str:
    r, w = c.whole("disk_read_bytes"), c.whole("disk_write_bytes")
    if r is None and w is None:
        return f"n/a ({METRICS['disk_read_bytes'].why_missing(c)})"
    return f"read {fmt_bytes(r)}, written {fmt_bytes(w)}"


def ram_text(c: CellView) -> str:
    m = METRICS["max_rss_bytes"]
    v = m.get(c)
    return fmt_bytes(v) if v is not None else f"n/a ({m.why_missing(c)})"


def metric_text(key: str) -> Callable[[CellView], str]:
    m = METRICS[key]
    return lambda c: fmt_value(m.get(c), m.unit) if c.ok else "–"


SUMMARY_COLUMNS: list[tuple[str, Callable[[CellView], str]]] = [
    ("TTFT p50", metric_text("ttft_p50_ms")),
    ("TTFT p99", metric_text("ttft_p99_ms")),
    ("TPOT p50", metric_text("tpot_p50_ms")),
    ("output tok/s", metric_text("output_throughput_tok_s")),
    ("goodput req/s", metric_text("goodput_rps")),
    ("peak VRAM / budget", vram_text),
    ("disk", disk_text),
    ("host RAM peak", ram_text),
    ("failures", failures_text),
]


def row_mark(c: CellView) -> str | None:
    if not c.ok:
        return c.status
    if c.over_budget:
        return "over budget"
    if c.metric("errors"):
        return "request errors"
    return None


def slugify(text: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:60] or "plot"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def workload_section(name: str, cells: list[CellView], labels: Labels, slugs: set[str]) -> Section:
    sweep_keys = list(dict.fromkeys(k for c in cells for k in c.sweep))
    headers = ["backend"] + (["model"] if labels.models else []) + sweep_keys + (["run"] if labels.runs else [])
    headers += ["status"] + [h for h, _ in SUMMARY_COLUMNS] + ["cell"]
    rows = []
    for c in cells:
        values = [c.backend] + ([c.model] if labels.models else []) + [show(k, c.sweep.get(k)) for k in sweep_keys]
        values += ([c.run.label] if labels.runs else []) + [c.status] + [f(c) for _, f in SUMMARY_COLUMNS] + [c.id]
        rows.append(Row(values, row_mark(c)))
    # The scenario's own definition of the workload, before any sweep expanded it.
    spec = next((w for c in cells for w in c.run.scenario.get("workloads", []) if w.get("name") == name),
                next((c.workload_spec for c in cells if c.workload_spec), {}))
    description = describe_workload(spec)
    if sweep_keys:
        values = {k: dict.fromkeys(show(k, c.sweep[k]) for c in cells if k in c.sweep) for k in sweep_keys}
        swept = ", ".join(f"{k} ∈ {{{', '.join(vs)}}}" for k, vs in values.items())
        description = f"swept over {swept}; as defined in the scenario: {description}"
    ok = [c for c in cells if c.ok]
    section_plots = [
        plots.box_plot(slugify(f"ttft-{name}", slugs), f"TTFT per request: {name}", ok, labels.series,
                       lambda c: [r.ttft * 1e3 for r in c.records if r.ok], "TTFT (ms)"),
        plots.box_plot(slugify(f"tpot-{name}", slugs), f"TPOT per request: {name}", ok, labels.series,
                       lambda c: [r.tpot * 1e3 for r in c.records if r.ok and r.tpot is not None], "TPOT (ms)"),
    ]
    for axis in sweep_keys:
        what = "Throughput and latency" if axis.startswith("load.") else "Latency and throughput"
        against = "context length (input_tokens)" if axis == "input_tokens" else axis
        section_plots.append(plots.sweep_plot(slugify(f"sweep-{name}-{axis}", slugs), f"{what} vs {against}: {name}",
                                              axis, cells, lambda c, a=axis: labels.series(c, without=a)))
    section_plots.append(plots.pareto_plot(slugify(f"pareto-{name}", slugs), f"Throughput vs latency: {name}",
                                           cells, labels.series, labels.backend))
    return Section(name, description, Table(headers, rows), section_plots)


def resource_plots(cells: list[CellView], labels: Labels, slugs: set[str]) -> tuple[list[Plot], list[str]]:
    several = len({c.base_workload for c in cells}) > 1
    out = [plots.vram_plot(slugify("vram", slugs), "Peak VRAM per cell", cells,
                           lambda c: labels.series(c) + (f" · {c.base_workload}" if several else ""))]
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
            rows.append(Row([c.id, c.run.label, f"cell {c.status}", (c.error_line or "(no error recorded)")[:500]],
                            c.status))
        elif c.metric("errors"):
            for msg, n in c.request_errors().most_common(5):
                rows.append(Row([c.id, c.run.label, f"{n} request(s) failed", msg[:500]], "request errors"))
    return Table(["cell", "run", "what", "error (first line)"], rows)


def cells_table(cells: list[CellView]) -> Table:
    """Where every number comes from: each cell's results file, engine, token count sources, raw requests."""
    rows = []
    for c in cells:
        tc = c.cell.token_counts or {}
        tokens = "–"
        if tc:
            tokens = f"input: {', '.join(tc.get('input') or ['?'])}; output: {', '.join(tc.get('output') or ['?'])}"
            exact = tc.get("exact_output_length")
            tokens += "; exact output length" if exact else "; output length not forced" if exact is False else ""
        engine = ", ".join(f"{k}={v}" for k, v in c.cell.engine.items()) or "–"
        rows.append([c.id, c.run.label, str(c.run.path), f"{c.backend} ({c.cell.backend_kind or '?'})", c.status,
                     fmt_value(c.cell.load_time_s, "s"), tokens, engine, str(c.cell.requests_file or "–")])
    return Table.of(["cell", "run", "results file", "backend (kind)", "status", "load time", "token counts from",
                     "engine", "per-request samples"], rows)


def build_report(runs: list[Run]) -> ReportData:
    cells = [c for r in runs for c in r.cells]
    labels = Labels(cells)
    slugs: set[str] = set()
    by_workload: dict[str, list[CellView]] = defaultdict(list)
    for c in cells:
        by_workload[c.base_workload].append(c)
    sections = [workload_section(name, cs, labels, slugs) for name, cs in by_workload.items()]
    res_plots, notes = resource_plots(cells, labels, slugs)
    same, diff = environment_tables(runs)
    names = list(dict.fromkeys(str(r.scenario.get("name", "?")) for r in runs))
    reps = sorted({str(r.scenario.get("repetitions", "?")) for r in runs})
    notes.insert(0, f"Numbers are medians over {' / '.join(reps)} repetition(s) of each cell; metric definitions "
                    "follow vLLM's serving benchmark (docs/metrics.md). '–' means not applicable (failed cell), "
                    "'n/a' means not measured, with the reason.")
    if not cells:
        notes.append("These results have no cells.")
    runs_table = Table.of(["run", "results file", "scenario", "created", "updated", "host", "cells"],
                          [[r.label, str(r.path), str(r.scenario.get("name", "?")), str(r.result.created or "?"),
                            str(r.result.updated or "?"), str(r.environment.get("hostname") or "?"),
                            str(len(r.cells))] for r in runs])
    return ReportData(
        title="llmbench report: " + ", ".join(names),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        notes=notes, runs=runs_table, scenarios=scenario_blocks(runs), environment=same, environment_diff=diff,
        sections=sections, resource_plots=res_plots, failures=failures_table(cells), cells=cells_table(cells),
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
        plot_dir = out_dir / "plots"
        plot_dir.mkdir(exist_ok=True)
        drawn = [p for p in all_plots(data) if p.png]
        for old in plot_dir.glob("*.png"):
            if old.stem not in {p.slug for p in drawn}:
                old.unlink()
        for p in drawn:
            (plot_dir / f"{p.slug}.png").write_bytes(p.png)
        path = out_dir / "report.md"
        path.write_text(render(data, "report.md.j2", "md", image=lambda p: Markup(f"plots/{p.slug}.png")))
        written.append(path)
    if "html" in formats:
        path = out_dir / "report.html"
        path.write_text(render(data, "report.html.j2", "html"))
        written.append(path)
    return written


def all_plots(data: ReportData) -> list[Plot]:
    return [p for s in data.sections for p in s.plots] + data.resource_plots
