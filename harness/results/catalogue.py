"""Every metric, declared once: its key in results.json, label, unit, which way is better, how it prints, where its
samples come from and whether the gate may judge it. The summary, report, plots, guide and gate iterate this.

Scopes: `distribution` metrics have statistics per repetition (mean, p50, ...); `scalar` ones one number per
repetition; `cell` ones one number per cell, read from the cell's resources or load (not from the reducer).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

STATISTICS = ("mean", "std", "min", "p50", "p90", "p95", "p99", "max")
RANKED_STATISTICS = ("mean", "p50", "p90", "p95", "p99")  # the ones guides and reports name, e.g. ttft_p99_ms


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    unit: Literal["ms", "tok/s", "req/s", "bytes", "s", "ratio", "count", "tokens"]
    better: Literal["lower", "higher"] | None  # None: context, not a figure of merit
    scope: Literal["distribution", "scalar", "cell"]
    fmt: str = "{:.2f}"
    per_request: str | None = None  # the RequestRecord property (seconds) giving one sample per request
    gates: bool = True  # the gate may judge it (a policy names which it does)
    floor: float = 0.0  # its resolution: smaller values count as equal when ranking
    short: str | None = None  # the label in narrow tables, when shorter than `label`

    def format(self, v: float | None) -> str:
        return "–" if v is None else self.fmt.format(v)


CATALOGUE: dict[str, Metric] = {m.key: m for m in [
    Metric("ttft_ms", "TTFT", "ms", "lower", "distribution", "{:.1f}", per_request="ttft"),
    Metric("tpot_ms", "TPOT", "ms", "lower", "distribution", "{:.2f}", per_request="tpot"),
    # No per-request samples for ITL: its samples are the gaps inside a request, strongly correlated, and a rank test
    # that took them as independent would call noise significant; it is gated per repetition (itl_ms.p50) instead.
    Metric("itl_ms", "ITL", "ms", "lower", "distribution", "{:.2f}"),
    Metric("e2el_ms", "E2E latency", "ms", "lower", "distribution", "{:.1f}", per_request="e2el", short="E2E"),
    # From the scheduled send time (vLLM's e2el_including_client_queue): the client's own lateness included. Where they
    # differ from the two above beyond noise (CellResult.client_queue_shift), verdicts read these (verdict_name).
    Metric("ttft_including_client_queue_ms", "TTFT from the schedule", "ms", "lower", "distribution", "{:.1f}",
           per_request="ttft_including_client_queue", short="TTFT (sched.)"),
    Metric("e2el_including_client_queue_ms", "E2E latency from the schedule", "ms", "lower", "distribution",
           "{:.1f}", per_request="e2el_including_client_queue", short="E2E (sched.)"),
    Metric("prefill_tps", "prefill tok/s", "tok/s", "higher", "distribution", "{:.1f}"),
    Metric("decode_tps", "decode tok/s", "tok/s", "higher", "distribution", "{:.1f}"),
    # What was sent and answered, per request: a workload's lengths are often caps or draws (a file's prompts cut at
    # input_tokens, replies as long as the data's), so reports state the lengths measured beside the settings.
    Metric("input_len", "input tokens per request", "tokens", None, "distribution", "{:.0f}", gates=False,
           short="input tokens"),
    Metric("output_len", "output tokens per request", "tokens", None, "distribution", "{:.0f}", gates=False,
           short="output tokens"),
    Metric("duration_s", "duration", "s", None, "scalar", "{:.2f}", gates=False),
    Metric("completed", "completed", "count", None, "scalar", "{:.0f}", gates=False),
    # A workload's steady_state window leaves its ramp-up and drain out of every metric: how many requests it left.
    Metric("outside_steady_state", "requests outside the steady state", "count", None, "scalar", "{:.0f}",
           gates=False),
    Metric("errors", "errors", "count", "lower", "scalar", "{:.0f}"),
    Metric("error_rate", "error rate", "ratio", "lower", "scalar", "{:.3g}", floor=1e-3),
    Metric("total_input_tokens", "input tokens", "tokens", None, "scalar", "{:.0f}", gates=False),
    Metric("total_output_tokens", "output tokens", "tokens", None, "scalar", "{:.0f}", gates=False),
    Metric("request_throughput_rps", "req/s", "req/s", "higher", "scalar", "{:.2f}"),
    Metric("output_throughput_tok_s", "output tok/s", "tok/s", "higher", "scalar", "{:.1f}", short="out tok/s"),
    Metric("total_token_throughput_tok_s", "total tok/s", "tok/s", "higher", "scalar", "{:.1f}"),
    Metric("goodput_rps", "goodput req/s", "req/s", "higher", "scalar", "{:.2f}"),
    # The load generator's own numbers: they say whether the client kept its schedule, not how good an engine is.
    Metric("nominal_rate_rps", "nominal rate", "req/s", None, "scalar", "{:.2f}", gates=False),
    Metric("offered_rate_rps", "offered rate", "req/s", None, "scalar", "{:.2f}", gates=False),
    Metric("achieved_rate_rps", "achieved send rate", "req/s", None, "scalar", "{:.2f}", gates=False),
    Metric("dispatch_lag_ms", "dispatch lag (schedule → send)", "ms", None, "distribution", "{:.2f}", gates=False),
    Metric("loop_lag_ms", "event-loop lag", "ms", None, "distribution", "{:.2f}", gates=False),
    Metric("ttft_p99_cv", "TTFT p99 spread (CV over repetitions)", "ratio", "lower", "cell", "{:.3g}", floor=0.01,
           gates=False),
    # A capacity search's answer (load: capacity): the highest load at which the slo held; one number per cell, its
    # uncertainty the bracket (the failing step above it), not a CI over repetitions, so the gate does not judge it.
    Metric("capacity_rps", "capacity at the SLO", "req/s", "higher", "cell", "{:.2f}", gates=False,
           short="capacity"),
    Metric("load_time_s", "load time", "s", "lower", "cell", "{:.2f}", gates=False),
    # One-off work before loading whose result later runs reuse (a GGUF conversion): context, not a merit.
    Metric("prepare_time_s", "one-off preparation (e.g. GGUF conversion)", "s", None, "cell", "{:.2f}", gates=False,
           short="preparation"),
    Metric("peak_vram_bytes", "peak VRAM", "bytes", "lower", "cell", gates=False),
    Metric("max_rss_bytes", "peak host RAM", "bytes", "lower", "cell", gates=False),
    Metric("disk_read_bytes", "disk read", "bytes", "lower", "cell", gates=False),
]}

DISTRIBUTIONS = tuple(k for k, m in CATALOGUE.items() if m.scope == "distribution")
PER_REPETITION_SCALARS = tuple(k for k, m in CATALOGUE.items() if m.scope == "scalar")

# The statistics every cell gives a 95% confidence interval and a coefficient of variation across repetitions for,
# named as in results.json's `ci` and `cv` (DISTRIBUTION.STAT, or the scalar's key).
# A latency from the send, and the same from the scheduled send.
INCLUDING_CLIENT_QUEUE = {"ttft_ms": "ttft_including_client_queue_ms", "e2el_ms": "e2el_including_client_queue_ms"}
HEADLINE = tuple([f"{k}.{s}" for k in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms", *INCLUDING_CLIENT_QUEUE.values())
                  for s in ("p50", "p90", "p99")]
                 + ["request_throughput_rps", "output_throughput_tok_s", "total_token_throughput_tok_s", "goodput_rps"])
# The ones whose disagreement across repetitions makes a cell `unstable`: the typical values, not the tails
# (a p99 of a few requests is itself noisy) and not goodput (a count of requests meeting an SLO can be 0).
STABILITY = ("ttft_ms.p50", "tpot_ms.p50", "itl_ms.p50", "e2el_ms.p50", "request_throughput_rps",
             "output_throughput_tok_s")


def split_name(name: str) -> tuple[str, str | None]:
    """'ttft_ms.p50' -> ('ttft_ms', 'p50'); 'goodput_rps' -> ('goodput_rps', None)."""
    key, _, stat = name.partition(".")
    return key, stat or None


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
    return f"{m.short or m.label} {stat}" if stat else (m.short or m.label)


# The terminal table and summary.md: (metric, statistic or None for a scalar).
SUMMARY_COLUMNS = (("ttft_ms", "p50"), ("ttft_ms", "p99"), ("tpot_ms", "p50"), ("itl_ms", "p50"), ("e2el_ms", "p50"),
                   ("output_throughput_tok_s", None), ("request_throughput_rps", None), ("goodput_rps", None),
                   ("errors", None))


def column_header(key: str, stat: str | None) -> str:
    m = CATALOGUE[key]
    label = m.short or m.label
    return f"{label} {stat}{' ms' if m.unit == 'ms' else ''}" if stat else label


def gate_metric_names() -> list[str]:
    """The names a gate policy may use per repetition: DISTRIBUTION.STAT and scalars."""
    return [f"{k}.{s}" for k in DISTRIBUTIONS if CATALOGUE[k].gates for s in ("count", *STATISTICS)] + \
           [k for k in PER_REPETITION_SCALARS if CATALOGUE[k].gates]
