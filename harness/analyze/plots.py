"""The report's figures, drawn with matplotlib's Agg backend into PNG bytes.

Every function returns a Plot: either the image, or a note saying why there is none (a plot with no data
is never drawn empty). Strings from results go through `text()` so that a `$` in a backend name is drawn
as a dollar sign, not parsed as mathtext.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ParamSpec

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402  (after choosing the backend)

from harness.results.catalogue import Statistic, statistic  # noqa: E402
from harness.results.runs import CellView  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType

STYLE: dict[RcKeyType, Any] = {"font.size": 9, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                               "axes.spines.right": False}
PHASE_COLORS = {"load": "#f2c14e", "prefill": "#f78154", "decode": "#4d9078", "idle": "#b4b8ab"}
GiB = 2**30
P = ParamSpec("P")


@dataclass
class Plot:
    slug: str  # file name stem: letters, digits, '-', '_' only
    title: str
    png: bytes | None = None
    note: str | None = None  # why the plot was left out

    @property
    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png or b"").decode()


def text(s: str) -> str:
    return str(s).replace("$", r"\$")


def _render(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def draw(fn: Callable[P, Plot]) -> Callable[P, Plot]:
    """Run a drawing function under the report's style."""
    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> Plot:
        with matplotlib.rc_context(STYLE):
            return fn(*args, **kwargs)
    return wrapper


@draw
def box_plot(slug: str, title: str, cells: list[CellView], label: Callable[[CellView], str],
             samples: Callable[[CellView], list[float]], unit: str) -> Plot:
    """One box per cell from its per-request samples (whiskers 1.5 IQR, outliers shown)."""
    data = [(text(label(c)), s) for c in cells if (s := samples(c))]
    if not data:
        return Plot(slug, title, note="no per-request samples: no ok cell has a requests.jsonl with completed requests")
    fig = _figure(8, 1.2 + 0.45 * len(data))
    ax = fig.subplots()
    ax.boxplot([s for _, s in data], orientation="horizontal", tick_labels=[n for n, _ in data], showmeans=True,
               meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black"})
    ax.invert_yaxis()
    lo = min(min(s) for _, s in data)
    if lo > 0 and max(max(s) for _, s in data) / lo > 50:
        ax.set_xscale("log")
    ax.set_xlabel(unit)
    ax.set_title(text(title))
    return Plot(slug, title, _render(fig))


def _errors(values: list[float], intervals: list[tuple[float, float] | None]) -> list[list[float]]:
    """matplotlib's [below, above] error lengths; 0 where a point has no CI."""
    below = [v - ci[0] if ci else 0.0 for v, ci in zip(values, intervals)]
    above = [ci[1] - v if ci else 0.0 for v, ci in zip(values, intervals)]
    return [[max(b, 0.0) for b in below], [max(a, 0.0) for a in above]]


def _named(c: CellView, name: str) -> str:
    return text(name) + (" (unstable)" if c.unstable else "")


@draw
def interval_plot(slug: str, title: str, cells: list[CellView], label: Callable[[CellView], str],
                  metrics: list[Statistic]) -> Plot:
    """One panel per metric: each cell's median as a bar, its 95% CI as the error bar; unstable cells hatched."""
    metrics = [m for m in metrics if any(m.value(c.cell) is not None for c in cells)]
    shown = [c for c in cells if any(m.value(c.cell) is not None for m in metrics)]
    if not shown:
        return Plot(slug, title, note="no completed cell has these metrics")
    fig = _figure(3.2 * len(metrics) + 1.5, 1.0 + 0.38 * len(shown))
    axes = fig.subplots(1, len(metrics), sharey=True, squeeze=False).ravel()
    y = list(range(len(shown)))
    for ax, m in zip(axes, metrics):
        values = [m.value(c.cell) for c in shown]
        xerr = _errors([v or 0.0 for v in values], [m.interval(c.cell) if v is not None else None
                                                    for c, v in zip(shown, values)])
        bars = ax.barh(y, [math.nan if v is None else v for v in values], xerr=xerr, capsize=3, color="tab:blue",
                       alpha=0.8, error_kw={"elinewidth": 1.2})
        for bar, c in zip(bars, shown):
            if c.unstable:
                bar.set_hatch("//")
                bar.set_color("tab:orange")
        ax.set_title(f"{m.label} ({m.unit}), {m.better} is better", fontsize=9)
    axes[0].set_yticks(y, [_named(c, label(c)) for c in shown])
    axes[0].invert_yaxis()
    fig.suptitle(text(title))
    return Plot(slug, title, _render(fig))


@draw
def sweep_plot(slug: str, title: str, axis: str, cells: list[CellView], series: Callable[[CellView], str]) -> Plot:
    """Throughput and latency against one swept setting, one line per series."""
    points = [(series(c), float(c.sweep[axis]), c) for c in cells
              if c.ok and isinstance(c.sweep.get(axis), (int, float))]
    if len({x for _, x, _ in points}) < 2:
        return Plot(slug, title, note=f"fewer than two completed cells at distinct values of {axis}")
    panels = ("output_throughput_tok_s", "ttft_ms.p50", "ttft_ms.p99", "tpot_ms.p50")
    fig = _figure(9, 6)
    axes = fig.subplots(2, 2).ravel()
    xs_all = sorted({x for _, x, _ in points})
    for ax, key in zip(axes, panels):
        m = statistic(key)
        for name in dict.fromkeys(s for s, _, _ in points):
            line = sorted(((x, v, m.interval(c.cell)) for s, x, c in points
                           if s == name and (v := m.value(c.cell)) is not None), key=lambda p: p[0])
            if not line:
                continue
            xs, ys, cis = [p[0] for p in line], [p[1] for p in line], [p[2] for p in line]
            drawn = ax.errorbar(xs, ys, yerr=_errors(ys, cis), marker="o", capsize=3, label=text(name))
            band = [ci for ci in cis if ci is not None]
            if len(band) == len(cis):  # the 95% CI as a band along the line
                ax.fill_between(xs, [ci[0] for ci in band], [ci[1] for ci in band], alpha=0.15,
                                color=drawn[0].get_color(), lw=0)
        over = [(x, v) for _, x, c in points if c.over_budget and (v := m.value(c.cell)) is not None]
        if over:
            ax.scatter([x for x, _ in over], [y for _, y in over], marker="x", s=90, color="red", zorder=4,
                       label="over VRAM budget")
        ax.set_title(f"{m.label} ({m.unit})")
        ax.set_xlabel(text(axis))
        if xs_all[0] > 0 and xs_all[-1] / xs_all[0] >= 8:
            ax.set_xscale("log", base=2)
            ax.minorticks_off()
        ax.set_xticks(xs_all, [f"{x:g}" for x in xs_all])
    axes[0].legend(fontsize=8)
    fig.suptitle(text(title))
    return Plot(slug, title, _render(fig))


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Points (latency, throughput) that no other point beats on both, sorted by latency."""
    front, best = [], float("-inf")
    for lat, thr in sorted(points, key=lambda p: (p[0], -p[1])):
        if thr > best:
            front.append((lat, thr))
            best = thr
    return front


@draw
def pareto_plot(slug: str, title: str, cells: list[CellView], label: Callable[[CellView], str],
                group: Callable[[CellView], str]) -> Plot:
    """Output throughput against median end-to-end latency, one colour per group; the front joins the cells
    nothing beats on both."""
    lat, thr = statistic("e2el_ms.p50"), statistic("output_throughput_tok_s")
    pts = [(x, y, text(label(c)), text(group(c))) for c in cells
           if c.ok and (x := lat.value(c.cell)) is not None and (y := thr.value(c.cell)) is not None]
    if len(pts) < 2:
        return Plot(slug, title, note="a Pareto front needs at least two completed cells with latency and throughput")
    fig = _figure(8, 4.5)
    ax = fig.subplots()
    by_cell = {text(label(c)): c for c in cells if c.ok}
    for g in dict.fromkeys(p[3] for p in pts):
        mine = [p for p in pts if p[3] == g]
        xs, ys = [p[0] for p in mine], [p[1] for p in mine]
        ax.errorbar(xs, ys, xerr=_errors(xs, [lat.interval(by_cell[p[2]].cell) for p in mine]),
                    yerr=_errors(ys, [thr.interval(by_cell[p[2]].cell) for p in mine]), fmt="o", capsize=3, zorder=3,
                    label=g)
    for x, y, name, _ in pts:
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    front = pareto_front([(x, y) for x, y, _, _ in pts])
    ax.plot([p[0] for p in front], [p[1] for p in front], drawstyle="steps-post", color="tab:red", marker="o",
            mfc="none", ms=11, label="Pareto front")
    ax.set_xlabel(f"{lat.label} ({lat.unit}), lower is better")
    ax.set_ylabel(f"{thr.label} ({thr.unit}), higher is better")
    ax.legend()
    ax.set_title(text(title))
    return Plot(slug, title, _render(fig))


@draw
def vram_plot(slug: str, title: str, cells: list[CellView], label: Callable[[CellView], str]) -> Plot:
    """Peak VRAM per cell, red when over its budget, with each cell's budget marked."""
    rows = [(text(label(c)), c.peak_vram[0], c.vram_budget, c.over_budget) for c in cells if c.peak_vram[0] is not None]
    if not rows:
        reasons = sorted({statistic("peak_vram_bytes").why_missing(c.cell) for c in cells}) or ["there are no cells"]
        return Plot(slug, title, note="VRAM was not measured in any cell: " + "; ".join(reasons))
    fig = _figure(8, 1.2 + 0.4 * len(rows))
    ax = fig.subplots()
    y = range(len(rows))
    ax.barh(list(y), [r[1] / GiB for r in rows], color=["tab:red" if r[3] else "tab:blue" for r in rows])
    budgets = [(i, r[2]) for i, r in zip(y, rows) if r[2] is not None]
    if budgets:
        ax.scatter([b / GiB for _, b in budgets], [i for i, _ in budgets], marker="|", s=400, color="black",
                   zorder=3, label="VRAM budget")
        ax.legend()
    ax.set_yticks(list(y), [r[0] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("peak VRAM (GiB)")
    ax.set_title(text(title))
    return Plot(slug, title, _render(fig))


@draw
def timeline_plot(slug: str, title: str, cell: CellView) -> Plot:
    """Host RAM, disk bandwidth and VRAM over the cell's life (times from its start), phases as coloured bands."""
    tl = cell.timeline
    if not tl:
        return Plot(slug, title, note="no timeline.json for this cell")
    t = tl["t"]
    series: list[tuple[str, list[tuple[str, Any, float]]]] = [  # (panel, [(line, values, scale)])
        ("CPU (% of a core)", [("this cell", tl.get("cpu_percent"), 1),
                               ("other processes", tl.get("other_cpu_percent"), 1)]),
        ("host RAM (GiB)", [("RSS", tl.get("rss_bytes"), GiB)]),
        ("disk (MB/s)", [("read", tl.get("disk_read_bps"), 1e6), ("write", tl.get("disk_write_bps"), 1e6)]),
        ("VRAM (GiB)", [("process", tl.get("process_vram_bytes"), GiB), ("GPU", tl.get("global_vram_bytes"), GiB)])]
    series = [(name, [(n, v, s) for n, v, s in lines if v and len(v) == len(t)]) for name, lines in series]
    series = [(name, lines) for name, lines in series if lines]
    if not series:
        return Plot(slug, title, note="timeline.json has no series matching its time axis")
    fig = _figure(9, 1.0 + 1.6 * len(series))
    axes = fig.subplots(len(series), 1, sharex=True, squeeze=False).ravel()
    phases = [(str(p[0]), float(p[1]), float(p[2])) for p in tl.get("phases") or [] if len(p) == 3]
    for ax, (name, lines) in zip(axes, series):
        named: set[str] = set()
        for phase, start, end in phases:
            ax.axvspan(start, end, color=PHASE_COLORS.get(phase, "#dddddd"), alpha=0.25, lw=0,
                       label=text(phase) if ax is axes[0] and phase not in named else None)
            named.add(phase)
        for n, values, scale in lines:
            ax.plot(t, [v / scale if v is not None else None for v in values], label=n if len(lines) > 1 else None,
                    lw=1)
        if name.startswith("VRAM") and cell.vram_budget:
            ax.axhline(cell.vram_budget / GiB, color="black", ls="--", lw=1, label="budget")
        ax.set_ylabel(name)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="upper right", ncols=4)
    axes[-1].set_xlabel("seconds since the cell started")
    fig.suptitle(text(title))
    return Plot(slug, title, _render(fig))


@draw
def capacity_plot(slug: str, title: str, cells: list[CellView], label: Callable[[CellView], str]) -> Plot:
    """A capacity search's steps per cell: the share of requests that met the slo (95% CI) against the load each
    step offered, filled where the step passed, with the target; and the steps' TTFT p99 beside it."""
    searched = [(c, cap) for c in cells if (cap := c.cell.capacity) is not None and cap.steps]
    if not searched:
        return Plot(slug, title, note="no cell ran a capacity search")
    fig = _figure(10, 4)
    share, ttft = fig.subplots(1, 2)
    for c, cap in searched:
        steps = sorted(cap.steps, key=lambda s: s.value)
        xs, ys = [s.value for s in steps], [s.attainment for s in steps]
        cis = [(ci[0], ci[1]) if (ci := s.attainment_ci) else None for s in steps]
        line = share.errorbar(xs, ys, yerr=_errors(ys, cis), capsize=3, label=text(label(c)), alpha=0.8)
        color = line[0].get_color()
        share.scatter(xs, ys, s=40, zorder=3, edgecolors=color,
                      facecolors=[color if s.passed else "white" for s in steps])
        p99 = [s.metrics.value("ttft_ms.p99") for s in steps]
        ttft.plot(xs, [math.nan if v is None else v for v in p99], marker="o", color=color, label=text(label(c)))
        if cap.capacity is not None:
            share.axvline(cap.capacity, color=color, ls=":", lw=1)
    target = searched[0][1]
    share.axhline(target.attainment_target, color="black", ls="--", lw=1, label=f"target {target.attainment_target:g}")
    if target.slo.ttft_ms is not None:
        ttft.axhline(target.slo.ttft_ms, color="black", ls="--", lw=1, label="slo TTFT")
    unit = "req/s offered" if target.search == "rate" else "requests in flight"
    share.set(xlabel=unit, ylabel="share meeting the slo", title="attainment per step (filled: passed)")
    ttft.set(xlabel=unit, ylabel="ms", title="TTFT p99 per step")
    share.legend(fontsize=8)
    ttft.legend(fontsize=8)
    fig.suptitle(text(title))
    return Plot(slug, title, _render(fig))
