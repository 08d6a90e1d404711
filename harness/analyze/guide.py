"""`bench guide`: which backend to pick for which use case, from measured cells only.

Use cases are data (guide_rules.yaml, validated here). For each one: keep the relevant cells, drop those that
break a constraint, score the rest per workload (SCORING), rank backends by their mean score, and look along
swept settings for where the answer changes. What was not measured is listed, never guessed.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from harness.analyze.report import TableRow, Table, describe_workload, measured_lengths, render, setting
from harness.analyze.verdicts import Comparison, MeasuredValue, overlap
from harness.config.load import load_yaml_file
from harness.config.scenario import ConcurrencyLoad
from harness.core.files import atomic_write
from harness.core.spec import Strict
from harness.records import ResultsError
from harness.results.catalogue import RANKED, fmt_value
from harness.results.runs import CellView, Run, load_runs
from llmbench.units import parse_size

RULES_FILE = Path(__file__).parent / "guide_rules.yaml"
SCORING = (  # shown in every guide, one line each
    "Each workload (model × workload; each sweep point is a workload of its own) is scored separately.",
    "Each weighted metric is normalized among the backends that fit there: value / best when higher is better, "
    "best / value when lower is better, so the best gets 1.",
    "Values below a metric's resolution count as equal to it (error rate 0.1 %, TTFT p99 spread 0.01).",
    "A tie within noise is decided by the tighter interval, never by the wider one: among the values whose 95% "
    "confidence intervals overlap the best's, the one whose worse bound is best is normalized 1, and each other by "
    "its worse bound against that one's, so a wide interval that merely overlaps the best never ranks level with it.",
    "score = Σ weight × normalized / Σ weight, over the metrics measured for every fitting backend there.",
    "A cell that failed or breaks a constraint (or whose constraint cannot be checked) scores 0 there; so does an "
    "unstable one (its repetitions disagree), left out as the report's verdict leaves it out.",
    "A backend that serves fewer requests at once than the load asks is compared under the same load: the harness "
    "queues the rest, and its latencies count the wait.",
    "A backend's rank is its mean score over the workloads it was measured on.",
)


class RulesError(ResultsError):
    """A mistake in a guide rules file: printed without a traceback, exit code 2."""


# ---- the rules ---------------------------------------------------------------------------------------------

# How rules named a distribution's statistic before there was one name per number ("ttft_p50_ms", "decode_tps_p50"):
# still read, as the catalogue's name ("ttft_ms.p50", "decode_tps.p50"), so users' rule files keep working.
LEGACY_NAMES = {(f"{s.metric.key.removesuffix('_ms')}_{s.stat}_ms" if s.unit == "ms" else f"{s.metric.key}_{s.stat}"):
                name for name, s in RANKED.items() if s.stat}


def _known_metric(name: str) -> str:
    """The catalogue's name of a statistic a rule names."""
    name = LEGACY_NAMES.get(name, name)
    if name not in RANKED:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(RANKED)}")
    return name


class Select(Strict):
    device: Literal["any", "gpu", "cpu"] = "any"
    min_input_tokens: int | None = Field(None, gt=0)
    max_input_tokens: int | None = Field(None, gt=0)
    loads: list[Literal["sequential", "concurrency", "poisson", "trace", "capacity"]] | None = None
    min_concurrency: int | None = Field(None, gt=0, description="for closed-loop (concurrency) loads")


def _size(v: object) -> object:
    """A bound in bytes may be written as a size (8GiB)."""
    return parse_size(v) if isinstance(v, str) else v


Bound = Annotated[float | None, BeforeValidator(_size)]


class Constraint(Strict):
    metric: str
    max: Bound = None
    min: Bound = None

    @field_validator("metric")
    @classmethod
    def _metric(cls, v: str) -> str:
        return _known_metric(v)

    @model_validator(mode="after")
    def _bound(self) -> Constraint:
        if self.max is None and self.min is None:
            raise ValueError("give max or min")
        return self

    def describe(self) -> str:
        m = RANKED[self.metric]
        bounds = [f"≤ {fmt_value(self.max, m.unit)}" if self.max is not None else "",
                  f"≥ {fmt_value(self.min, m.unit)}" if self.min is not None else ""]
        return f"{m.label} {' and '.join(b for b in bounds if b)}"

    def check(self, c: CellView) -> str | None:
        """Why the cell breaks this constraint, or None when it meets it."""
        m = RANKED[self.metric]
        v = m.value(c.cell)
        if v is None:
            return f"cannot check {self.describe()}: {m.label} not measured ({m.why_missing(c.cell)})"
        if self.max is not None and v > self.max:
            return f"{m.label} {fmt_value(v, m.unit)} > {fmt_value(self.max, m.unit)}"
        if self.min is not None and v < self.min:
            return f"{m.label} {fmt_value(v, m.unit)} < {fmt_value(self.min, m.unit)}"
        return None


class UseCase(Strict):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
    title: str
    question: str = Field("", description="the user's question this use case answers, shown first")
    description: str = ""
    select: Select = Field(default_factory=Select)
    constraints: list[Constraint] = Field(default_factory=list)
    weights: dict[str, float] = Field(min_length=1)
    flip_axes: list[str] = Field(default_factory=list)

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        for name, w in v.items():
            _known_metric(name)
            if w <= 0:
                raise ValueError(f"weight of {name} must be > 0, got {w}")
        return {_known_metric(name): w for name, w in v.items()}


class Rules(Strict):
    use_cases: list[UseCase] = Field(min_length=1)


def load_rules(extra: list[Path] | None = None) -> list[UseCase]:
    """The packaged use cases, then each extra file's: a use case with an id already known replaces it."""
    merged: dict[str, UseCase] = {}
    for path in [RULES_FILE, *(extra or [])]:
        path = Path(path)
        data = load_yaml_file(path, "rules", RulesError)  # the scenario's limits: size, aliases, depth, UTF-8
        try:
            rules = Rules.model_validate(data)
        except ValidationError as e:
            lines = [f"{path}: invalid guide rules"]
            for err in e.errors():
                where = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".")
                where = where or "(top level)"
                lines.append(f"  {where}: {err['msg'].removeprefix('Value error, ')}")
            raise RulesError("\n".join(lines)) from None
        merged.update({u.id: u for u in rules.use_cases})
    return list(merged.values())


# ---- evaluating one use case ---------------------------------------------------------------------------------

@dataclass
class UseCaseResult:
    id: str
    title: str
    description: str
    criteria: list[str]
    ranking: Table
    recommendation: str
    evidence: list[str]
    flips: list[str]
    not_measured: list[str]
    excluded: list[str]
    details: Table
    question: str = ""
    recommended: bool = False  # a backend (or a tie of several) is named; else "No recommendation"
    cautions: list[str] = field(default_factory=list)  # unstable cells, load time without one-off preparation


@dataclass
class Entry:
    candidate: str
    condition: tuple[str, str]  # (model, workload)
    cell: CellView
    misfit: str | None  # why it does not fit, or None
    score: float | None = None
    used: list[str] = field(default_factory=list)  # metrics that went into the score

    @property
    def ref(self) -> str:
        return f"cell {self.cell.id}, run {self.cell.run.label}"

    def value(self, name: str) -> float | None:
        return RANKED[name].value(self.cell.cell)

    def measured(self, name: str) -> MeasuredValue | None:
        """Its number on a statistic, with the 95% CI, where it has one."""
        v = self.value(name)
        if v is None:
            return None
        return MeasuredValue(backend=self.candidate, value=v, ci=RANKED[name].interval(self.cell.cell),
                        unstable=bool(self.cell.unstable))

    def shown(self, name: str) -> str:
        """The number with its 95% CI where the results have one: the reader sees which differences are noise."""
        m = self.measured(name)
        return m.text(RANKED[name].unit) if m else fmt_value(None, RANKED[name].unit)


def input_tokens(c: CellView) -> int | None:
    """The cell's prompt length, where its workload sets one (not a distribution, nor a file's own)."""
    n = c.spec.input_tokens if c.spec else None
    return n if isinstance(n, int) else None


def load_of(c: CellView) -> tuple[str, int | None]:
    """The cell's load type, and its concurrency where it is a closed loop."""
    load = c.spec.load if c.spec else None
    conc = load.concurrency if isinstance(load, ConcurrencyLoad) else None
    return (load.type if load else "sequential"), (conc if isinstance(conc, int) else None)


def selected(c: CellView, s: Select) -> str | None:
    """Why the cell is outside the use case, or None."""
    if s.device != "any" and c.device != s.device:
        return "device"
    n_in = input_tokens(c)
    if s.min_input_tokens and not (n_in is not None and n_in >= s.min_input_tokens):
        return "min_input_tokens"
    if s.max_input_tokens and not (n_in is not None and n_in <= s.max_input_tokens):
        return "max_input_tokens"
    load, conc = load_of(c)
    if s.loads and load not in s.loads:
        return "loads"
    if s.min_concurrency and load == "concurrency" and not (conc is not None and conc >= s.min_concurrency):
        return "min_concurrency"
    return None


def why_nothing_selected(cells: list[CellView], s: Select) -> list[str]:
    """For an empty selection: what was measured instead, criterion by criterion."""
    if not cells:
        return ["these results have no completed or failed cell"]
    out = []
    if s.device != "any":
        seen = Counter(c.device or "unknown" for c in cells)
        out.append(f"no cell ran on a {s.device.upper()} (cells by device: "
                   + ", ".join(f"{k} ×{n}" for k, n in seen.items()) + ")")
    sizes = sorted({v for c in cells if (v := input_tokens(c)) is not None})
    measured = ", ".join(map(str, sizes)) or "none"
    if s.min_input_tokens and not any(v >= s.min_input_tokens for v in sizes):
        out.append(f"no workload has input_tokens ≥ {s.min_input_tokens} (measured: {measured})")
    if s.max_input_tokens and not any(v <= s.max_input_tokens for v in sizes):
        out.append(f"no workload has input_tokens ≤ {s.max_input_tokens} (measured: {measured})")
    if s.loads or s.min_concurrency:
        seen_loads = Counter(load + (f" {conc}" if conc else "") for load, conc in map(load_of, cells))
        out.append(f"wanted loads {', '.join(s.loads or ['any'])}"
                   + (f" with concurrency ≥ {s.min_concurrency}" if s.min_concurrency else "")
                   + f"; measured: {', '.join(seen_loads) or 'none'}")
    return out or ["no cell matches the use case's selection"]


def normalized(values: dict[str, float], better: str | None, floor: float = 0.0,
               intervals: dict[str, tuple[float, float] | None] | None = None) -> dict[str, float]:
    """1 for the best value, the ratio to it for the others; values under `floor` count as `floor`. Values whose CIs
    overlap the best one's are a tie within noise, decided by the tighter interval: the one whose worse bound is best
    leads (1), and each other is normalized by its worse bound against the leader's."""
    lower = better == "lower"

    def ratio(ref: float, v: float) -> float:  # how close v comes to ref, at most 1
        if lower:
            return min(1.0, ref / v) if v > 0 else 1.0
        return min(1.0, v / ref) if ref > 0 else 1.0

    values = {k: max(v, floor) for k, v in values.items()}
    intervals = intervals or {}
    best = (min if lower else max)(values, key=lambda k: values[k])
    top = intervals.get(best)
    if top is None:
        return {k: ratio(values[best], v) for k, v in values.items()}
    tied = {k: max(ci[1] if lower else ci[0], floor) for k in values
            if (ci := intervals.get(k)) is not None and overlap(ci, top)}
    leader = (min if lower else max)(tied, key=lambda k: tied[k])
    return {k: ratio(tied[leader], tied[k]) if k in tied else ratio(values[leader], v) for k, v in values.items()}


def score_condition(entries: list[Entry], weights: dict[str, float]) -> list[str]:
    """Fill in each entry's score; return the weighted metrics left out because some fitting cell lacks them."""
    fitting = [e for e in entries if e.misfit is None]
    for e in entries:
        if e.misfit is not None:
            e.score = 0.0
    if not fitting:
        return []
    used = [m for m in weights if all(e.value(m) is not None for e in fitting)]
    left_out = [m for m in weights if m not in used]
    if not used:
        return left_out
    total = {e.candidate: 0.0 for e in fitting}
    for m in used:
        s = RANKED[m]
        measured = [x for e in fitting if (x := e.measured(m)) is not None]
        norm = normalized({x.backend: x.value for x in measured}, s.better, s.metric.floor,
                          {x.backend: x.ci for x in measured})
        for k, v in norm.items():
            total[k] += weights[m] * v
    wsum = sum(weights[m] for m in used)
    for e in fitting:
        e.score, e.used = total[e.candidate] / wsum, used
    return left_out


def spread(entries: list[Entry]) -> float:
    """The mean relative width of the 95% CIs behind a backend's scores: the tighter, the surer its numbers."""
    widths = [(x.ci[1] - x.ci[0]) / abs(x.value) for e in entries if e.misfit is None for m in e.used
              if (x := e.measured(m)) and x.ci and x.value]
    return sum(widths) / len(widths) if widths else float("inf")


def margin_metrics(u: UseCase, entries: list[Entry]) -> list[str]:
    """What a recommendation states its margins on: the use case's metrics, then the tails it has not weighted
    (the p99 of each weighted latency, and TTFT p99), where both entries have them."""
    tails = [f"{RANKED[name].metric.key}.p99" for name in u.weights
             if RANKED[name].stat == "p50" and RANKED[name].unit == "ms"] + ["ttft_ms.p99"]
    names = list(dict.fromkeys([*u.weights, *(c.metric for c in u.constraints), *tails]))
    return [m for m in names if m in RANKED and all(e.value(m) is not None for e in entries)]


def comparison(name: str, a: Entry, b: Entry) -> Comparison:
    """a against b on a statistic both have."""
    ma, mb = a.measured(name), b.measured(name)
    assert ma is not None and mb is not None, "compared on a statistic one of them lacks"
    return Comparison(metric=name, a=ma, b=mb)


def metric_summary(e: Entry, names: list[str]) -> str:
    return ", ".join(f"{RANKED[m].label} {fmt_value(e.value(m), RANKED[m].unit)}" for m in names)


def find_flips(entries: list[Entry], names: Names) -> tuple[list[str], set[str]]:
    """Changes of winner or of who fits along each swept setting; also returns the axes that were swept."""
    flips, swept = [], set()
    sweep_axes = list(dict.fromkeys(a for e in entries for a in e.cell.sweep))
    for axis in sweep_axes:
        groups: dict[tuple[str, str, tuple[tuple[str, str], ...]], dict[Any, list[Entry]]] = \
            defaultdict(lambda: defaultdict(list))
        for e in entries:
            v = e.cell.sweep.get(axis)
            if v is None:
                continue
            others = tuple(sorted((k, str(x)) for k, x in e.cell.sweep.items() if k != axis))
            groups[(e.cell.model, e.cell.base_workload, others)][v].append(e)
        for (model, base, others), points in groups.items():
            if len(points) < 2:
                continue
            swept.add(axis)
            where = " ".join([base] + [f"{k}={x}" for k, x in others]) + (f" ({model})" if names.models else "")
            flips += flips_along(axis, where, sorted(points.items(), key=lambda kv: kv[0]))
    return flips, swept


def flips_along(axis: str, where: str, points: list[tuple[Any, list[Entry]]]) -> list[str]:
    """Statements for each value of `axis` where the backends that fit, or the best of them, change."""
    def fits(es: list[Entry]) -> set[str]:
        return {e.candidate for e in es if e.misfit is None}

    def winner(es: list[Entry]) -> Entry | None:
        scored = [e for e in es if e.misfit is None and e.score is not None]
        return max(scored, key=lambda e: e.score or 0.0) if scored else None

    states = [(frozenset(fits(es)), w.candidate if (w := winner(es)) else None) for _, es in points]
    out = []
    for i in range(1, len(points)):
        (v, now), (_, before) = points[i], points[i - 1]
        # "≥ v" only when nothing changes again at larger values measured.
        at = f"{axis} ≥ {setting(v)}" if all(st == states[i] for st in states[i:]) else f"{axis} = {setting(v)}"
        fit_now = fits(now)
        lost = [e for e in now if e.candidate in fits(before) and e.misfit is not None]
        if lost:
            head = ("no backend fits" if not fit_now else f"only {next(iter(fit_now))} fits" if len(fit_now) == 1
                    else f"{', '.join(e.candidate for e in lost)} no longer fit(s)")
            out.append(f"{where}: at {at}, {head} ("
                       + "; ".join(f"{e.candidate}: {e.misfit} ({e.ref})" for e in lost) + ")")
        gained = sorted((fit_now & {e.candidate for e in before}) - fits(before))
        if gained:
            out.append(f"{where}: at {at}, {', '.join(gained)} fit(s) again")
        w0, w1 = winner(before), winner(now)
        prev = next((e for e in now if w0 and e.candidate == w0.candidate and e.misfit is None), None)
        if (w0 and w1 and prev and prev.score is not None and w1.candidate != prev.candidate
                and (w1.score or 0.0) > prev.score + 1e-9):
            out.append(f"{where}: at {at}, {w1.candidate} overtakes {w0.candidate} "
                       f"(score {w1.score:.2f} vs {prev.score:.2f}; {w1.ref} vs {prev.ref})")
    winners = {w for _, w in states if w}
    if not out and len(winners) == 1:
        out.append(f"{where}: {next(iter(winners))} leads at every {axis} measured "
                   f"({', '.join(setting(v) for v, _ in points)}); no flip")
    return out


class Names:
    """Backend names, with the run added where the same backend name comes from several runs."""

    def __init__(self, cells: list[CellView]):
        runs_of = defaultdict(set)
        for c in cells:
            runs_of[c.backend].add(c.run.label)
        self.ambiguous = {b for b, rs in runs_of.items() if len(rs) > 1}
        self.models = len({c.model for c in cells}) > 1

    def candidate(self, c: CellView) -> str:
        return f"{c.backend} @{c.run.label}" if c.backend in self.ambiguous else c.backend

    def condition(self, key: tuple[str, str]) -> str:
        return f"{key[1]} ({key[0]})" if self.models else key[1]


def evaluate(u: UseCase, cells: list[CellView]) -> UseCaseResult:
    names = Names(cells)
    criteria = [f"{RANKED[m].label} ({RANKED[m].better} is better) × {w:g}" for m, w in u.weights.items()]
    criteria += [f"constraint: {c.describe()}" for c in u.constraints]
    sel = {k: v for k, v in u.select.model_dump().items() if v not in (None, "any")}
    if sel:
        criteria.append("cells: " + ", ".join(f"{k} {'/'.join(v) if isinstance(v, list) else v}"
                                              for k, v in sel.items()))
    relevant = [c for c in cells if c.status != "skipped" and selected(c, u.select) is None]
    empty = Table([], [])
    if not relevant:
        return UseCaseResult(u.id, u.title, u.description, criteria, empty,
                             "No recommendation: no measured cell is relevant to this use case.", [], [],
                             why_nothing_selected([c for c in cells if c.status != "skipped"], u.select), [], empty,
                             u.question)

    entries = []
    for c in relevant:
        misfit = (f"failed: {c.error_line or c.status}" if not c.ok
                  else f"left out, unstable: {c.unstable}" if c.unstable
                  else next((why for con in u.constraints if (why := con.check(c))), None))
        entries.append(Entry(names.candidate(c), (c.model, c.workload), c, misfit))
    by_cond: dict[tuple[str, str], list[Entry]] = defaultdict(list)
    for e in entries:
        by_cond[e.condition].append(e)
    not_measured: list[str] = []
    for key, es in by_cond.items():
        for m in score_condition(es, u.weights):
            lacking = [e for e in es if e.misfit is None and e.value(m) is None]
            why = "; ".join(sorted({RANKED[m].why_missing(e.cell.cell) for e in lacking}))
            not_measured.append(f"{RANKED[m].label} at {names.condition(key)}: not measured for "
                                + ", ".join(f"{e.candidate} ({e.ref})" for e in lacking)
                                + f" ({why}); left out of the score there")

    # Rank: mean score over the workloads each backend was measured on.
    per_cand: dict[str, list[Entry]] = defaultdict(list)
    for e in entries:
        per_cand[e.candidate].append(e)
    wins: Counter[str] = Counter()
    for es in by_cond.values():
        scored = [(e.candidate, e.score) for e in es if e.misfit is None and e.score is not None]
        top = max((score for _, score in scored), default=0.0)
        wins.update(k for k, score in scored if score >= top - 1e-9)  # a tie is a win for each
    mean = {k: sum(e.score or 0.0 for e in es) / len(es) for k, es in per_cand.items()}
    # Level on score and wins: the tighter intervals rank first, never the wider ones.
    order = sorted(per_cand, key=lambda k: (-mean[k], -wins[k], spread(per_cand[k]), k))
    ranking = Table(["rank", "backend", "mean score", "workloads measured", "workloads won", "fits"],
                    [TableRow([str(i + 1), k, f"{mean[k]:.3f}", str(len(per_cand[k])), str(wins[k]),
                          f"{sum(e.misfit is None for e in per_cand[k])} of {len(per_cand[k])}"],
                         None if any(e.misfit is None for e in per_cand[k]) else "does not fit")
                     for i, k in enumerate(order)])

    evidence: list[str] = []
    cautions: list[str] = []
    if all(e.misfit is not None for e in entries):
        recommendation = "No recommendation: no measured backend meets this use case's constraints (see below)."
    elif all(e.score is None for e in entries if e.misfit is None):
        recommendation = "No recommendation: none of the metrics this use case ranks by was measured (see below)."
    else:
        best = order[0]
        # The evidence: a workload the winner won, among those with the most fitting backends.
        key = max((k for k, es in by_cond.items() if any(e.candidate == best for e in es)),
                  key=lambda k: (sum(e.misfit is None for e in by_cond[k]),
                                 max(by_cond[k], key=lambda e: e.score or 0).candidate == best))
        shown = list(dict.fromkeys(u.weights))
        for e in sorted(by_cond[key], key=lambda e: -(e.score or 0)):
            evidence.append(f"{e.candidate} at {names.condition(key)}: "
                            + (f"score {e.score:.2f}; {metric_summary(e, shown)}" if e.misfit is None
                               else f"does not fit: {e.misfit}") + f" ({e.ref})"
                            + (f"; {e.cell.served_at_once}, its latencies count the wait" if e.cell.served_at_once
                               else ""))
        if len(per_cand) == 1:
            recommendation = (f"{best}: the only backend measured for this use case (mean score {mean[best]:.2f}); "
                              "there is nothing to compare it against.")
        else:
            runner = order[1]
            tied = [k for k in order[1:] if mean[best] - mean[k] < 0.005]
            recommendation = (f"{best}: mean score {mean[best]:.2f}, first on {wins[best]} of the "
                              f"{len(per_cand[best])} workload(s) it was measured on; "
                              + (f"level with {', '.join(tied)} (ranked first by its tighter intervals)."
                                 if tied else f"next: {runner} at {mean[runner]:.2f}."))
        winner = next((e for e in by_cond[key] if e.candidate == best and e.misfit is None), None)
        rival = max((e for e in by_cond[key] if e.candidate != best and e.misfit is None),
                    key=lambda e: e.score or 0, default=None)
        if winner is not None and rival is not None:
            compared = margin_metrics(u, [winner, rival])
            recommendation += (f" At {names.condition(key)}, against {rival.candidate} (95% CIs): "
                               + "; ".join(comparison(m, winner, rival).text for m in compared) + ".")
            tails = [comparison(m, winner, rival) for m in compared if m not in u.weights]
            cautions += [f"{best}'s {c.statistic.label} is worse than {rival.candidate}'s beyond noise at "
                         f"{names.condition(key)}: {c.text}" for c in tails if c.a_worse_beyond_noise]
        misfits = sum(e.misfit is not None for e in per_cand[best])
        if misfits:
            recommendation += f" It does not fit on {misfits} of them: see when the answer changes."

    flips, swept = find_flips(entries, names)
    for axis in u.flip_axes:
        if axis not in swept:
            not_measured.append(f"no sweep over {axis} among the relevant cells: where the answer changes "
                                f"with {axis} is not known")
    if len(per_cand) == 1:
        not_measured.append("only one backend was measured for this use case")
    excluded = [f"{e.candidate} at {names.condition(e.condition)}: {e.misfit} ({e.ref})"
                for e in entries if e.misfit is not None]

    metric_cols = list(dict.fromkeys([*u.weights, *(c.metric for c in u.constraints)]))
    # Load time leaves out one-off work a later run reuses (a GGUF conversion): shown beside it, not in it.
    prepared = "load_time_s" in metric_cols and any(e.cell.cell.prepare_time_s for e in entries)
    details = Table(["workload", "backend", "score", *(RANKED[m].label for m in metric_cols),
                     *(["one-off preparation (not in load time)"] if prepared else []), "cell", "run"],
                    [TableRow([names.condition(key),
                          e.candidate + (f" ({e.cell.served_at_once})" if e.cell.served_at_once else ""),
                          f"{e.score:.3f}" if e.score is not None else "n/a",
                          *(e.shown(m) for m in metric_cols),
                          *([fmt_value(e.cell.cell.prepare_time_s, "s")] if prepared else []),
                          e.cell.id, e.cell.run.label],
                         "unstable" if e.cell.unstable else "does not fit" if e.misfit else None)
                     for key, es in by_cond.items() for e in sorted(es, key=lambda e: -(e.score or 0))])
    cautions += [f"{e.candidate} at {names.condition(e.condition)} is left out: it is unstable (its repetitions "
                 f"disagree), so its numbers are not typical: {e.cell.unstable} ({e.ref})"
                 for e in entries if e.cell.unstable]
    if prepared:
        cautions.append("Load time excludes one-off preparation that later runs reuse (a GGUF conversion, cached): "
                        "it is shown beside it in the table below.")
    recommended = not recommendation.startswith("No recommendation")
    return UseCaseResult(u.id, u.title, u.description, criteria, ranking, recommendation, evidence, flips,
                         not_measured, excluded, details, u.question, recommended, cautions)


@dataclass
class GuideData:
    title: str
    generated: str
    runs: Table
    use_cases: list[UseCaseResult]
    workloads: Table = field(default_factory=lambda: Table([], []))


def workloads_table(cells: list[CellView]) -> Table:
    """Each workload as set and as sent: a file's prompts are cut at input_tokens and its replies run as long as
    the data's, so the settings are caps; the lengths the requests really had are measured beside them."""
    groups: dict[tuple[str, str], list[CellView]] = defaultdict(list)
    for c in cells:
        groups[(c.run.label, c.workload)].append(c)
    rows = [[workload, run, describe_workload(cs[0].workload_spec), measured_lengths(cs) or "nothing completed"]
            for (run, workload), cs in groups.items()]
    return Table.of(["workload", "run", "settings", "measured per request"], rows)


def build_guide(runs: list[Run], use_cases: list[UseCase]) -> GuideData:
    cells = [c for r in runs for c in r.cells]
    return GuideData(
        title="Which inference engine? A guide from "
              + ", ".join(dict.fromkeys(str(r.scenario.get("name", "?")) for r in runs)),
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        runs=Table.of(["run", "results file", "host", "cells"],
                      [[r.label, str(r.path), str(r.environment.get("hostname") or "?"), str(len(r.cells))]
                       for r in runs]),
        use_cases=[evaluate(u, cells) for u in use_cases],
        workloads=workloads_table(cells),
    )


def write_guide(results: list[Path | str], out: Path | str, rules: list[Path] | None = None) -> Path:
    """Write guide.md or guide.html (by out's suffix) from one or several results."""
    out = Path(out)
    fmt = {".md": "md", ".html": "html"}.get(out.suffix.lower())
    if fmt is None:
        raise ResultsError(f"--out {out}: expected a file name ending in .md or .html")
    data = build_guide(load_runs(list(results)), load_rules(rules))
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, render(data, f"guide.{fmt}.j2", fmt, scoring=SCORING))
    return out
