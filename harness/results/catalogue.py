"""Every metric, declared once (AIPerf's shape): its key in results.json, label, unit, which way is better, where its
samples come from, how a repetition reduces them, how it prints, and whether the gate may judge it. The reducer
(metrics.py), the summary, frame, report, plots, guide and gate iterate this, and name every number one way:
KEY.STAT for a distribution's statistic ("ttft_ms.p50"), KEY for a scalar or a cell metric ("goodput_rps",
"peak_vram_bytes"), as results.json's `ci` and `cv`, guide rules and gate policies do.

The kinds (each a class below, by where its numbers come from):
- RequestMetric: a distribution of one sample per request, from its extractor over RequestRecord (TTFT, TPOT, ...);
- PooledMetric: a distribution of samples that are not one per request (ITL's gaps, the event loop's lags);
- RepetitionMetric: one number per repetition, from all its requests (throughputs, goodput, errors, ...);
- CellMetric: one number per cell, read from the cell's resources or load, not from the reducer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from harness.config.scenario import SLO, Load, PoissonLoad
from harness.records import STATISTICS, CellResult, Distribution, RequestRecord
from llmbench.units import fmt_bytes

Unit = Literal["ms", "tok/s", "req/s", "bytes", "s", "ratio", "count", "tokens"]
Scope = Literal["distribution", "scalar", "cell"]
RANKED_STATISTICS = ("mean", "p50", "p90", "p95", "p99")  # the statistics of a latency that guides rank by


# ---- one repetition's requests: what every metric is computed from ------------------------------------------------

@dataclass
class Requests:
    """One repetition's measured requests (warm-up excluded; `outside_steady_state` more were left out by the
    workload's steady_state window), with what the worker measured beside them."""
    records: list[RequestRecord]
    slo: SLO
    load: Load | None = None
    loop_lag_ms: list[float] = field(default_factory=list)
    outside_steady_state: int = 0
    done: list[RequestRecord] = field(init=False)  # the completed ones
    duration: float = field(init=False)  # from the first dispatch to the last completion

    def __post_init__(self) -> None:
        self.done = [r for r in self.records if r.ok]
        start = min((r.t_send for r in self.records), default=0.0)
        self.duration = max((r.chunk_times[-1] for r in self.done), default=start) - start

    def per_second(self, amount: float) -> float | None:
        return amount / self.duration if self.duration > 0 else None


def rate(times: Sequence[float]) -> float | None:
    """Events per second over the span from the first to the last of `times`."""
    span = max(times) - min(times) if len(times) > 1 else 0.0
    return (len(times) - 1) / span if span > 0 else None


# ---- the kinds of metric ------------------------------------------------------------------------------------------

@dataclass(frozen=True, kw_only=True)
class Metric:
    key: str
    label: str
    unit: Unit
    better: Literal["lower", "higher"] | None  # None: context, not a figure of merit
    gates: bool = True  # the gate may judge it (a policy names which it does)
    floor: float = 0.0  # its resolution: smaller values count as equal when ranking
    short: str | None = None  # the label in narrow tables, when shorter than `label`
    scope: ClassVar[Scope]

    @property
    def name(self) -> str:
        return self.short or self.label

    def format(self, v: float | None) -> str:
        """The number as every table prints it (the unit in the header), "–" for none."""
        return "–" if v is None else fmt_number(v, self.unit)


@dataclass(frozen=True, kw_only=True)
class RequestMetric(Metric):
    """One sample per request, in the metric's unit: `sample` gives it (None where the request has none, e.g. TPOT
    of a one-token answer). Samples come from the completed requests, or with `of_sent` from every request sent."""
    sample: Callable[[RequestRecord], float | None]
    of_sent: bool = False
    scope: ClassVar[Scope] = "distribution"

    def of(self, r: RequestRecord) -> float | None:
        """The request's sample, None when it has none or does not count (it failed)."""
        return self.sample(r) if self.of_sent or r.ok else None

    def samples(self, records: Sequence[RequestRecord]) -> list[float]:
        return [v for r in records if (v := self.of(r)) is not None]

    def reduce(self, reqs: Requests) -> Distribution:
        return Distribution.of(self.samples(reqs.records))


@dataclass(frozen=True, kw_only=True)
class PooledMetric(Metric):
    """A distribution whose samples are not one per request: `pooled` gives them all for a repetition."""
    pooled: Callable[[Requests], list[float]]
    scope: ClassVar[Scope] = "distribution"

    def reduce(self, reqs: Requests) -> Distribution:
        return Distribution.of(self.pooled(reqs))


@dataclass(frozen=True, kw_only=True)
class RepetitionMetric(Metric):
    """One number per repetition, from all its requests."""
    compute: Callable[[Requests], float | int | None]
    scope: ClassVar[Scope] = "scalar"

    def reduce(self, reqs: Requests) -> float | int | None:
        return self.compute(reqs)


@dataclass(frozen=True, kw_only=True)
class CellMetric(Metric):
    """One number per cell, read from the stored cell; `unavailable` are the words naming it in
    resources.unavailable, for saying why it is missing."""
    read: Callable[[CellResult], float | None]
    unavailable: tuple[str, ...] = ()
    scope: ClassVar[Scope] = "cell"


# ---- per-request extractors ---------------------------------------------------------------------------------------

def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def itl_gaps(r: RequestRecord) -> list[float]:
    """Every gap between a request's streamed chunks (ms)."""
    return [(b - a) * 1e3 for a, b in zip(r.chunk_times, r.chunk_times[1:])]


def _prefill_tps(r: RequestRecord) -> float | None:
    # From the send itself: the engine's own prefill, without a wait for its max_concurrency.
    return r.input_tokens / r.served_ttft if r.input_tokens and r.served_ttft > 0 else None


def _decode_tps(r: RequestRecord) -> float | None:
    return (r.n_out - 1) / (r.e2el - r.ttft) if r.n_out > 1 and r.e2el > r.ttft else None


def _dispatch_lag(r: RequestRecord) -> float | None:
    return None if r.t_scheduled is None else (r.t_send - r.t_scheduled) * 1e3


# ---- the SLO ------------------------------------------------------------------------------------------------------

def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    """Whether a completed request met every limit of the slo, judged on the catalogue's own samples of the SLO's
    fields (ttft_ms, tpot_ms, e2el_ms). TTFT and E2E latency count from the offer (RequestRecord.t_offered): a wait
    in the harness's queue for a backend's max_concurrency is in them, as its users would wait, so every backend is
    judged under the load offered; the client's own lateness (latency from the schedule) is not, as it is nothing
    the engine did. A request without a TPOT (one token) meets any TPOT limit. Goodput and a capacity search's
    steps both judge by this."""
    for key, metric in SLO_METRICS.items():  # per request: read the limits, no model_dump
        limit = getattr(slo, key)
        v = metric.of(r) if limit is not None else None
        if v is not None and v > limit:
            return False
    return True


def _goodput(reqs: Requests) -> float | None:
    if all(getattr(reqs.slo, key) is None for key in SLO_METRICS):
        return None
    return reqs.per_second(sum(meets_slo(r, reqs.slo) for r in reqs.done))


def _nominal(reqs: Requests) -> float | None:
    rate = reqs.load.rate if isinstance(reqs.load, PoissonLoad) else None
    return rate if isinstance(rate, float) else None  # a list is a sweep, expanded before any cell runs


def _offered(reqs: Requests) -> float | None:
    if not isinstance(reqs.load, PoissonLoad):
        return None  # a closed loop offers no rate
    return rate([r.t_scheduled for r in reqs.records if r.t_scheduled is not None])


def _input_tokens(reqs: Requests) -> int:
    return sum(r.input_tokens or 0 for r in reqs.done)


def _output_tokens(reqs: Requests) -> int:
    return sum(r.n_out for r in reqs.done)


# ---- the catalogue ------------------------------------------------------------------------------------------------

CATALOGUE: dict[str, Metric] = {m.key: m for m in [
    RequestMetric(key="ttft_ms", label="TTFT", unit="ms", better="lower", sample=lambda r: r.ttft * 1e3),
    RequestMetric(key="tpot_ms", label="TPOT", unit="ms", better="lower", sample=lambda r: _ms(r.tpot)),
    # ITL's samples are the gaps inside a request, strongly correlated: a rank test that took them as independent
    # would call noise significant, so it has no per-request samples and is gated per repetition (itl_ms.p50).
    PooledMetric(key="itl_ms", label="ITL", unit="ms", better="lower",
                 pooled=lambda reqs: [g for r in reqs.done for g in itl_gaps(r)]),
    RequestMetric(key="e2el_ms", label="E2E latency", unit="ms", better="lower", sample=lambda r: r.e2el * 1e3,
                  short="E2E"),
    # From the scheduled send time (vLLM's e2el_including_client_queue): the client's own lateness included. Where they
    # differ from the two above beyond noise (CellResult.client_queue_shift), verdicts read these (verdict_name).
    RequestMetric(key="ttft_including_client_queue_ms", label="TTFT from the schedule", unit="ms", better="lower",
                  sample=lambda r: r.ttft_including_client_queue * 1e3, short="TTFT (sched.)"),
    RequestMetric(key="e2el_including_client_queue_ms", label="E2E latency from the schedule", unit="ms",
                  better="lower", sample=lambda r: r.e2el_including_client_queue * 1e3, short="E2E (sched.)"),
    RequestMetric(key="prefill_tps", label="prefill tok/s", unit="tok/s", better="higher", sample=_prefill_tps),
    RequestMetric(key="decode_tps", label="decode tok/s", unit="tok/s", better="higher", sample=_decode_tps),
    # What was sent and answered, per request: a workload's lengths are often caps or draws (a file's prompts cut at
    # input_tokens, replies as long as the data's), so reports state the lengths measured beside the settings.
    RequestMetric(key="input_len", label="input tokens per request", unit="tokens", better=None, gates=False,
                  sample=lambda r: r.input_tokens, short="input tokens"),
    RequestMetric(key="output_len", label="output tokens per request", unit="tokens", better=None, gates=False,
                  sample=lambda r: r.n_out, short="output tokens"),
    RepetitionMetric(key="duration_s", label="duration", unit="s", better=None, gates=False,
                     compute=lambda reqs: reqs.duration),
    RepetitionMetric(key="completed", label="completed", unit="count", better=None, gates=False,
                     compute=lambda reqs: len(reqs.done)),
    # A workload's steady_state window leaves its ramp-up and drain out of every metric: how many requests it left.
    RepetitionMetric(key="outside_steady_state", label="requests outside the steady state", unit="count",
                     better=None, gates=False, compute=lambda reqs: reqs.outside_steady_state),
    RepetitionMetric(key="errors", label="errors", unit="count", better="lower",
                     compute=lambda reqs: len(reqs.records) - len(reqs.done)),
    RepetitionMetric(key="error_rate", label="error rate", unit="ratio", better="lower", floor=1e-3,
                     compute=lambda reqs: (len(reqs.records) - len(reqs.done)) / len(reqs.records)
                     if reqs.records else 0.0),
    RepetitionMetric(key="total_input_tokens", label="input tokens", unit="tokens", better=None, gates=False,
                     compute=_input_tokens),
    RepetitionMetric(key="total_output_tokens", label="output tokens", unit="tokens", better=None, gates=False,
                     compute=_output_tokens),
    RepetitionMetric(key="request_throughput_rps", label="req/s", unit="req/s", better="higher",
                     compute=lambda reqs: reqs.per_second(len(reqs.done))),
    RepetitionMetric(key="output_throughput_tok_s", label="output tok/s", unit="tok/s", better="higher",
                     compute=lambda reqs: reqs.per_second(_output_tokens(reqs)), short="out tok/s"),
    RepetitionMetric(key="total_token_throughput_tok_s", label="total tok/s", unit="tok/s", better="higher",
                     compute=lambda reqs: reqs.per_second(_input_tokens(reqs) + _output_tokens(reqs))),
    RepetitionMetric(key="goodput_rps", label="goodput req/s", unit="req/s", better="higher", compute=_goodput),
    # The load generator's own numbers: they say whether the client kept its schedule, not how good an engine is.
    RepetitionMetric(key="nominal_rate_rps", label="nominal rate", unit="req/s", better=None, gates=False,
                     compute=_nominal),
    RepetitionMetric(key="offered_rate_rps", label="offered rate", unit="req/s", better=None, gates=False,
                     compute=_offered),
    RepetitionMetric(key="achieved_rate_rps", label="achieved send rate", unit="req/s", better=None, gates=False,
                     compute=lambda reqs: rate([r.t_send for r in reqs.records])),
    RequestMetric(key="dispatch_lag_ms", label="dispatch lag (schedule → send)", unit="ms", better=None,
                  gates=False, sample=_dispatch_lag, of_sent=True),
    PooledMetric(key="loop_lag_ms", label="event-loop lag", unit="ms", better=None, gates=False,
                 pooled=lambda reqs: reqs.loop_lag_ms),
    CellMetric(key="ttft_p99_cv", label="TTFT p99 spread (CV over repetitions)", unit="ratio", better="lower",
               floor=0.01, gates=False, read=lambda c: c.metrics.value("ttft_p99_cv") if c.metrics else None),
    # A capacity search's answer (load: capacity): the highest load at which the slo held; one number per cell, its
    # uncertainty the bracket (the failing step above it), not a CI over repetitions, so the gate does not judge it.
    CellMetric(key="capacity_rps", label="capacity at the SLO", unit="req/s", better="higher", gates=False,
               read=lambda c: c.capacity.capacity_rps if c.capacity else None, short="capacity"),
    CellMetric(key="load_time_s", label="load time", unit="s", better="lower", gates=False,
               read=lambda c: c.load_time_s),
    # One-off work before loading whose result later runs reuse (a GGUF conversion): context, not a merit.
    CellMetric(key="prepare_time_s", label="one-off preparation (e.g. GGUF conversion)", unit="s", better=None,
               gates=False, read=lambda c: c.prepare_time_s, short="preparation"),
    CellMetric(key="peak_vram_bytes", label="peak VRAM", unit="bytes", better="lower", gates=False,
               read=lambda c: c.resources.peak_vram()[0] if c.resources else None, unavailable=("vram", "gpu")),
    CellMetric(key="max_rss_bytes", label="peak host RAM", unit="bytes", better="lower", gates=False,
               read=lambda c: c.resources.whole.max_rss_bytes if c.resources and c.resources.whole else None,
               unavailable=("rss", "ram", "memory")),
    CellMetric(key="disk_read_bytes", label="disk read", unit="bytes", better="lower", gates=False,
               read=lambda c: c.resources.whole.disk_read_bytes if c.resources and c.resources.whole else None,
               unavailable=("disk",)),
]}

# What the reducer computes for every repetition, in order.
REDUCED = [m for m in CATALOGUE.values() if isinstance(m, (RequestMetric, PooledMetric, RepetitionMetric))]
DISTRIBUTIONS = tuple(k for k, m in CATALOGUE.items() if m.scope == "distribution")
PER_REPETITION_SCALARS = tuple(k for k, m in CATALOGUE.items() if m.scope == "scalar")
REQUEST_METRICS = {k: m for k, m in CATALOGUE.items() if isinstance(m, RequestMetric)}
# The metrics with one sample per completed request that the gate may test request by request.
PER_REQUEST = {k: m for k, m in REQUEST_METRICS.items() if m.gates and not m.of_sent}
SLO_METRICS = {k: m for k, m in PER_REQUEST.items() if k in SLO.model_fields}  # an SLO's fields are catalogue keys

# A latency from the send, and the same from the scheduled send.
INCLUDING_CLIENT_QUEUE = {"ttft_ms": "ttft_including_client_queue_ms", "e2el_ms": "e2el_including_client_queue_ms"}
# The statistics every cell gives a 95% confidence interval and a coefficient of variation across repetitions for,
# named as in results.json's `ci` and `cv` (DISTRIBUTION.STAT, or the scalar's key).
HEADLINE = tuple([f"{k}.{s}" for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", *INCLUDING_CLIENT_QUEUE.values())
                  for s in ("p50", "p90", "p99")]
                 + ["request_throughput_rps", "output_throughput_tok_s", "total_token_throughput_tok_s", "goodput_rps"])
# The ones whose disagreement across repetitions makes a cell `unstable`: the typical values, not the tails
# (a p99 of a few requests is itself noisy) and not goodput (a count of requests meeting an SLO can be 0).
STABILITY = ("ttft_ms.p50", "tpot_ms.p50", "itl_ms.p50", "e2el_ms.p50", "request_throughput_rps",
             "output_throughput_tok_s")


# ---- one name per number ------------------------------------------------------------------------------------------

def split_name(name: str) -> tuple[str, str | None]:
    """'ttft_ms.p50' -> ('ttft_ms', 'p50'); 'goodput_rps' -> ('goodput_rps', None)."""
    key, _, stat = name.partition(".")
    return key, stat or None


@dataclass(frozen=True)
class Statistic:
    """One number of a cell by its one name: a distribution's statistic ("ttft_ms.p50") or a scalar or cell metric
    ("goodput_rps"); how it reads from a stored cell, its 95% CI there, and why it is missing."""
    metric: Metric
    stat: str | None = None

    @property
    def name(self) -> str:
        return f"{self.metric.key}.{self.stat}" if self.stat else self.metric.key

    @property
    def label(self) -> str:
        return f"{self.metric.label} {self.stat}" if self.stat else self.metric.label

    @property
    def unit(self) -> Unit:
        return self.metric.unit

    @property
    def better(self) -> Literal["lower", "higher"] | None:
        return self.metric.better

    def value(self, cell: CellResult) -> float | None:
        if isinstance(self.metric, CellMetric):
            return self.metric.read(cell)
        return cell.metrics.value(self.name) if cell.metrics else None

    def interval(self, cell: CellResult) -> tuple[float, float] | None:
        """The cell's 95% CI of this number, when the results have one (catalogue.HEADLINE)."""
        return cell.interval(self.name)

    def why_missing(self, cell: CellResult) -> str:
        if not isinstance(self.metric, CellMetric) or not self.metric.unavailable:
            return "not recorded"
        if cell.resources is None:
            return "no resources block in these results"
        return cell.resources.why_unavailable(*self.metric.unavailable)


def statistic(name: str) -> Statistic:
    """The number named `name`; KeyError, saying what is known, for a name the catalogue does not have."""
    key, stat = split_name(name)
    m = CATALOGUE.get(key)
    if m is None:
        raise KeyError(f"unknown metric {key!r}; known: {', '.join(CATALOGUE)}")
    if m.scope == "distribution" and stat not in ("count", *STATISTICS):
        raise KeyError(f"{key} is a distribution: name a statistic, {key}.STAT with STAT one of "
                       f"{', '.join(STATISTICS)}")
    if m.scope != "distribution" and stat is not None:
        raise KeyError(f"{key} is one number, without a statistic: {key}")
    return Statistic(m, stat)


def _ranked() -> dict[str, Statistic]:
    """The numbers guides rank by: each latency's RANKED_STATISTICS, another distribution's p50, and every scalar and
    cell metric with a better direction (context-only metrics are not ranked)."""
    out: dict[str, Statistic] = {}
    for key, m in CATALOGUE.items():
        if m.better is None:
            continue
        stats = (RANKED_STATISTICS if m.unit == "ms" else ("p50",)) if m.scope == "distribution" else (None,)
        out.update({s.name: s for s in (Statistic(m, stat) for stat in stats)})
    return out


RANKED: dict[str, Statistic] = _ranked()


def verdict_name(name: str, client_queue_shift: bool) -> str:
    """The statistic a verdict reads for `name` ("ttft_ms.p50") of a cell: the same from the scheduled send when the
    client's own queue shifted its latencies beyond noise (a client that fell behind hides the wait otherwise)."""
    key, stat = split_name(name)
    if not client_queue_shift or key not in INCLUDING_CLIENT_QUEUE:
        return name
    return INCLUDING_CLIENT_QUEUE[key] + (f".{stat}" if stat else "")


def headline_label(name: str) -> str:
    key, stat = split_name(name)
    m = CATALOGUE[key]
    return f"{m.name} {stat}" if stat else m.name


# The terminal table and summary.md: (metric, statistic or None for a scalar).
SUMMARY_COLUMNS = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("itl_ms", "p50"), ("e2el_ms", "p50"),
                   ("output_throughput_tok_s", None), ("request_throughput_rps", None), ("goodput_rps", None),
                   ("errors", None))


def column_header(key: str, stat: str | None) -> str:
    m = CATALOGUE[key]
    return f"{m.name} {stat}{' ms' if m.unit == 'ms' else ''}" if stat else m.name


def gate_metric_names() -> list[str]:
    """The names a gate policy may use per repetition: DISTRIBUTION.STAT and scalars."""
    return [f"{k}.{s}" for k in DISTRIBUTIONS if CATALOGUE[k].gates for s in ("count", *STATISTICS)] + \
           [k for k in PER_REPETITION_SCALARS if CATALOGUE[k].gates]


# ---- the one number formatter -------------------------------------------------------------------------------------

def fmt_number(v: float, unit: str, like: float | None = None) -> str:
    """A number of `unit` without the unit (bytes keep theirs): two decimals below 10 ms (100 of other rates and
    times), one above; counts whole; ratios to 3 significant digits. With the precision `like` would get, so the
    bounds of an interval read like its value."""
    if unit == "bytes":
        return fmt_bytes(v)
    if unit == "ratio":
        return f"{v:.3g}"
    if unit in ("count", "tokens"):
        return f"{v:.0f}"
    return f"{v:.2f}" if abs(v if like is None else like) < (10 if unit == "ms" else 100) else f"{v:.1f}"


def fmt_value(v: float | None, unit: str) -> str:
    """The number with its unit, "n/a" for one not measured."""
    if v is None:
        return "n/a"
    return fmt_number(v, unit) + ("" if unit in ("bytes", "ratio") else f" {unit}")


def fmt_interval(ci: tuple[float, float], unit: str, value: float) -> str:
    """A 95% CI as [low–high], in the value's format."""
    return f"[{fmt_number(ci[0], unit, value)}–{fmt_number(ci[1], unit, value)}]"

