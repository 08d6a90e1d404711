"""The records that cross every boundary of `bench run`, and the one way results are read back.

    runner ──CellPlan (cell.json)──▶ worker ──RequestRecord (requests.jsonl), WorkerReport (worker.json)──▶ runner
    runner: reducer ──CellResult──▶ ResultsStore ──RunResult (results.json)──▶ report, guide, gate, baselines, summary

Each is written and read through these types only: `load_run` and `read_requests` are the loaders everybody uses,
so an old results file (fewer fields) degrades to defaults in one place.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import numpy as np
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, SerializerFunctionWrapHandler, TypeAdapter,
                      ValidationError, field_serializer, model_serializer)

from harness.config.scenario import SLO, Cell, Workload
from harness.core.errors import UserError
from harness.core.events import Capabilities, PrefixReuse
from harness.core.redact import MASK
from harness.core.spec import BackendSpec, Resources

# results.json's schema: 2 names a capacity step's latencies as the catalogue does (`metrics`: {"ttft_ms": {...}}),
# where 1 had ttft_p50_ms, ttft_p99_ms, tpot_p50_ms and tpot_p99_ms. load_run reads both.
SCHEMA_VERSION = 2


class ResultsError(UserError):
    """A results file that cannot be read: printed without a traceback, exit code 2."""


# ---- runner -> worker ---------------------------------------------------------------------------------------------

class CellPlan(BaseModel):
    """Everything a worker needs to run one cell, written by the runner as CELL_DIR/cell.json."""
    model_config = ConfigDict(extra="forbid")
    cell: Cell
    backend: BackendSpec
    model_name: str
    model_path: Path
    workload: Workload
    prompts_file: Path
    repetitions: int
    seed: int
    record_outputs: bool
    resources: Resources
    vram_budget: int | None = None
    slo: SLO = Field(default_factory=SLO)  # a capacity search judges each step by it
    # A fresh token per run of the cell: a worker whose cell.json names another (a resumed run reuses the folder)
    # is orphaned, and writes nothing there.
    attempt: str = ""


class PromptEntry(BaseModel):
    """One request of a cell in its prompts file (a JSON list, one per request in order: the warm-ups, then each
    repetition's num_requests), written by harness/inputs/prompts.py and read by the worker."""
    model_config = ConfigDict(extra="forbid")
    text: str
    token_ids: list[int]
    max_tokens: int | None = None  # None: the workload's output_tokens
    messages: list[dict[str, Any]] | None = None  # the chat the text was rendered from, where there was one
    group: int | None = None  # the shared document or prefix this request starts with
    arrival_s: float | None = None  # when it leaves, from its repetition's start (a replayed trace)
    session: int | None = None  # a multi-turn conversation
    turn: int | None = None
    think_s: float | None = None  # the user's pause before this turn


PROMPT_FILE = TypeAdapter(list[PromptEntry])


# ---- worker -> runner ---------------------------------------------------------------------------------------------

@dataclass
class RequestRecord:
    """One measured request. Times are seconds on the cell's monotonic clock (a request sent by another client
    process is brought onto it with that client's measured clock offset)."""
    id: int
    repetition: int
    t_send: float
    t_scheduled: float | None = None  # when the load pattern meant it to leave: t_send - t_scheduled is dispatch lag
    t_queued: float | None = None  # its arrival or offer, when it then waited for the backend's max_concurrency
    client: int = 0  # which client process sent it (load.clients)
    chunk_times: list[float] = field(default_factory=list)
    chunk_tokens: list[int] = field(default_factory=list)
    input_tokens: int | None = None
    output_tokens: int | None = None
    input_source: str | None = None
    output_source: str | None = None
    exact_length: bool | None = None
    finish_reason: str | None = None
    error: str | None = None
    output_token_ids: list[int] | None = None
    output_text: str | None = None  # record_outputs: what the engine answered
    session: int | None = None  # prompts: conversation: which session, and which turn of it (from 0)
    turn: int | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and bool(self.chunk_times)

    @property
    def t_offered(self) -> float:
        """When the request was offered: its send, or the start of its wait for a backend that serves fewer at once
        than the load asks (t_queued). Latencies count from here, so every backend is timed under the same load."""
        return self.t_queued if self.t_queued is not None else self.t_send

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.t_offered

    @property
    def served_ttft(self) -> float:
        """From the send itself: the engine's own time to first token, without a wait for its max_concurrency."""
        return self.chunk_times[0] - self.t_send

    @property
    def e2el(self) -> float:
        return self.chunk_times[-1] - self.t_offered

    @property
    def t_due(self) -> float:
        """When the load meant it to leave: its scheduled time (or its offer, if earlier). Latencies from here
        include the client's own lateness, which those from the send leave out (coordinated omission)."""
        return self.t_offered if self.t_scheduled is None else min(self.t_scheduled, self.t_offered)

    @property
    def ttft_including_client_queue(self) -> float:
        return self.chunk_times[0] - self.t_due

    @property
    def e2el_including_client_queue(self) -> float:
        """vLLM's e2el_including_client_queue: end-to-end latency from the scheduled send time."""
        return self.chunk_times[-1] - self.t_due

    @property
    def n_out(self) -> int:
        return self.output_tokens if self.output_tokens is not None else sum(self.chunk_tokens)

    @property
    def tpot(self) -> float | None:
        return (self.e2el - self.ttft) / (self.n_out - 1) if self.n_out > 1 else None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        return cls(**{k: v for k, v in d.items() if k in _RECORD_FIELDS})


_RECORD_FIELDS = {f.name for f in fields(RequestRecord)}


class Span(BaseModel):
    start: float
    end: float


class ConcurrencyCap(BaseModel):
    """The load asked for more requests in flight than the backend serves at once; the harness queued the rest."""
    requested: int
    max_concurrency: int
    # The wait in that queue is in the cell's latencies (TTFT, E2E latency from the offer): so it is since closed loops
    # queue too; results from before left it out, and their latencies are not those of the load asked for.
    queue_in_latency: bool = False

    def describe(self) -> str:
        return f"served {self.max_concurrency} at a time (asked {self.requested})"


class CpuIsolation(BaseModel):
    """How the worker shared the machine's CPUs between its load generator and the engine (resources.isolate_client):
    each pinned to its own (os.sched_setaffinity), or not, and why."""
    isolated: bool
    why: str
    client_cpus: list[int] = Field(default_factory=list)  # the event loop, its writer threads, the client processes
    engine_cpus: list[int] = Field(default_factory=list)  # the engine's server processes and in-process threads

    def describe(self) -> str:
        if not self.isolated:
            return f"load generator and engine on the same CPUs: {self.why}"
        return (f"load generator on CPU {_cpus(self.client_cpus)}, engine on CPU {_cpus(self.engine_cpus)} "
                f"({self.why})")


def _cpus(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


class ClientClock(BaseModel):
    """A client process of the cell (load.clients) and its clock: its stamps minus offset_s are on the cell's clock,
    within offset_error_s (half the round trip of the best of the start-up pings)."""
    index: int
    pid: int
    offset_s: float
    offset_error_s: float
    node: str | None = None  # a load.generators actor's Ray node id


class CapacityStep(BaseModel):
    """One step of a capacity search, as the worker ran it: its requests are the records whose repetition is
    `step`; `met` of `sent` met the slo."""
    step: int
    value: float  # the rate (req/s) or concurrency offered
    start: float
    end: float
    sent: int
    not_sent: int = 0  # kept from arriving by max_duration_s: not counted in `met` of `sent`
    met: int
    passed: bool


# ---- the typed blocks of a WorkerReport and a CellResult ----------------------------------------------------------

PERCENTILE_METHOD: Final = "linear"  # numpy.percentile's method; stored in results so numbers can be reproduced
PERCENTILES = (50, 90, 95, 99)
STATISTICS = ("mean", "std", "min", "p50", "p90", "p95", "p99", "max")


class Distribution(BaseModel):
    """One metric's statistics over one repetition's samples (or, in a cell's `metrics`, each statistic's median
    over the repetitions). Percentiles are numpy's, PERCENTILE_METHOD."""
    model_config = ConfigDict(extra="forbid")
    # A median over repetitions may fall between two counts; None: not recorded (a capacity step of schema 1).
    count: int | float | None = 0
    mean: float | None = None
    std: float | None = None
    min: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    @classmethod
    def of(cls, values: Sequence[float]) -> Distribution:
        if not values:
            return cls()
        a = np.asarray(values, dtype=float)
        pct = np.percentile(a, PERCENTILES, method=PERCENTILE_METHOD)
        return cls(count=int(a.size), mean=float(a.mean()), std=float(a.std()), min=float(a.min()),
                   **{f"p{p}": float(v) for p, v in zip(PERCENTILES, pct)}, max=float(a.max()))

    def stat(self, name: str) -> float | None:
        """A statistic by name: count or one of STATISTICS."""
        if name != "count" and name not in STATISTICS:
            raise KeyError(f"no statistic {name!r}; expected count or one of {', '.join(STATISTICS)}")
        v = getattr(self, name)
        return None if v is None else float(v)


MetricValue = Distribution | int | float | None


class MetricValues(BaseModel):
    """Every metric of one repetition, or a cell's medians over its repetitions: a Distribution or a number under
    each catalogue key (harness/results/catalogue.py, which says which is which), stored flat as results.json has
    always stored them."""
    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, MetricValue] = Field(init=False)

    def keys(self) -> list[str]:
        return list(self.model_extra or {})

    def raw(self, key: str) -> MetricValue:
        return (self.model_extra or {}).get(key)

    def distribution(self, key: str) -> Distribution | None:
        v = self.raw(key)
        return v if isinstance(v, Distribution) else None

    def value(self, name: str) -> float | None:
        """A statistic by its one name: "ttft_ms.p50" (a distribution's), "goodput_rps" (a scalar)."""
        key, _, stat = name.partition(".")
        v = self.raw(key)
        if isinstance(v, Distribution):
            return v.stat(stat) if stat else None
        return None if v is None or stat else float(v)


class Repetition(MetricValues):
    """One repetition's metrics, with the 95% CIs of its headline statistics (a bootstrap over its requests)."""
    ci: dict[str, list[float]] = Field(default_factory=dict)


class AsGiven(BaseModel):
    """A block whose producer owns its keys (the resource monitor, an engine, a scraper): the keys readers use are
    typed fields, any other is kept as an extra, and it is written back with exactly the keys it was given, so a
    results file round-trips whole (a resumed run rewrites the cells it keeps)."""
    model_config = ConfigDict(extra="allow")

    @model_serializer(mode="wrap")
    def _as_given(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        given = self.model_fields_set | set(self.model_extra or {})
        return {k: v for k, v in data.items() if k in given}


class Background(AsGiven):
    """What else ran on the machine over a span: other processes' CPU, hypervisor steal (% of one core), load."""
    other_cpu_percent: float | None = None
    steal_percent: float | None = None
    load_avg_max: float | None = None


class ResourceBlock(Background):
    """The resource monitor's numbers over a span: the whole cell, or one phase (docs/resources.md). NVML peaks are
    above the idle baseline."""
    max_rss_bytes: int | None = None
    cpu_percent_mean: float | None = None
    disk_read_bytes: int | None = None
    disk_write_bytes: int | None = None
    device_read_bytes: int | None = None
    device_write_bytes: int | None = None
    max_offload_dir_bytes: int | None = None
    max_global_vram_bytes: int | None = None
    max_process_vram_bytes: int | None = None
    max_allocated_bytes: int | None = None
    max_reserved_bytes: int | None = None
    gpu_util_mean: float | None = None
    power_w_mean: float | None = None
    energy_j: float | None = None
    duration_s: float | None = None


class IdleBaseline(AsGiven):
    """The machine before the engine started (medians of a few samples): what NVML peaks are stored above."""
    samples: int | None = None
    rss_bytes: int | None = None
    global_vram_bytes: int | None = None
    process_vram_bytes: int | None = None
    gpu_util: float | None = None
    power_w: float | None = None


# VRAM measures in order of preference: the backend's own processes, then the whole GPU, then torch's allocator, each
# with the baseline field it is stored above. Adding the baseline back gives what the card had to hold, which is what
# `over_budget` compares with the budget (docs/resources.md).
VRAM_MEASURES = (("max_process_vram_bytes", "process_vram_bytes"), ("max_global_vram_bytes", "global_vram_bytes"),
                 ("max_reserved_bytes", None), ("max_allocated_bytes", None))


class ResourceUsage(AsGiven):
    """A cell's resources (harness/measure/monitor.py, docs/resources.md)."""
    repetitions: list[Background] = Field(default_factory=list)  # per repetition: what else ran meanwhile
    sample_interval_ms: float | None = None
    samples: int | None = None
    sampler_cpu_percent: float | None = None
    baseline: IdleBaseline | None = None
    unavailable: dict[str, str] = Field(default_factory=dict)  # measure -> why it was not measured
    page_cache: str | None = None
    page_cache_resident: float | None = None
    whole: ResourceBlock | None = None
    phases: dict[str, ResourceBlock] = Field(default_factory=dict)
    vram_budget_bytes: int | None = None
    over_budget: bool | None = None

    def peak_vram(self) -> tuple[int | None, str | None]:
        """(absolute bytes, measure name) of the first VRAM measure present (VRAM_MEASURES)."""
        whole = self.whole or ResourceBlock()
        for measure, base in VRAM_MEASURES:
            v = getattr(whole, measure)
            if v is not None:
                b = getattr(self.baseline, base, None) if base and self.baseline else None
                return v + (b or 0), measure
        return None, None

    def why_unavailable(self, *words: str) -> str:
        """Why the measures named like `words` were not measured, from `unavailable`."""
        reasons = {why for k, why in self.unavailable.items() if any(w in k.lower() for w in words)}
        return "; ".join(sorted(reasons)) or "not measured"


class EngineInfo(AsGiven):
    """What a backend says of its engine (Backend.environment()). The keys readers use are typed; the rest is the
    engine's own settings (versions, launch arguments, a plan's text), open-ended by nature and different for every
    engine: kept as extras, shown as they are and compared key by key by the gate's environment guard."""
    engine: str | None = None
    device: str | None = None  # where it computed: "cpu", "cuda:0", ...
    dtype: str | None = None
    compute_dtype: str | None = None
    gguf_file_type: str | None = None
    block_size: int | None = None  # the KV block an engine with a prefix cache reuses whole
    url: str | None = None  # a launched or given server


class TokenCounts(BaseModel):
    """Where a cell's token counts came from (server_usage, engine, client_tokenizer), and whether every output
    length was forced exact (None: no request completed)."""
    input: list[str] = Field(default_factory=list)
    output: list[str] = Field(default_factory=list)
    exact_output_length: bool | None = None


class Transfer(AsGiven):
    """Bytes the own engine moved over one link in one phase ("decode/disk->host"), as it counts them."""
    bytes: int = 0
    seconds: float | None = None
    in_place_bytes: int | None = None
    bytes_per_s: float | None = None


def _unmasked(v: object) -> object:
    return None if v == MASK else v


# A rate per token: results written before such names were told apart from secrets hold the mask there (not recorded).
PerToken = Annotated[float | None, BeforeValidator(_unmasked)]


class DecodeBound(AsGiven):
    """Decode seconds per token against the bound of the slowest link: bytes streamed per token over the bandwidth a
    probe measured after the cell (or why the probe could not run: `probe_error`)."""
    link: str | None = None
    bytes_per_token: PerToken = None
    measured_s_per_token: PerToken = None
    probe_bytes: int | None = None
    probe_bytes_per_s: float | None = None
    bound_s_per_token: PerToken = None
    ratio_to_bound: float | None = None
    probe_error: str | None = None


class LogicalIO(AsGiven):
    """The own engine's own byte counts per phase and link (own_engine/stats.py), and its decode time against the
    bound of its slowest link (`decode_bound`, the probe's numbers, or why it could not run)."""
    transfers: dict[str, Transfer] = Field(default_factory=dict)
    phase_seconds: dict[str, float] = Field(default_factory=dict)
    tokens: dict[str, int] = Field(default_factory=dict)
    prefix_cache: dict[str, int] = Field(default_factory=dict)
    preemptions: int | None = None
    decode_bound: DecodeBound | None = None

    def streamed_from_disk(self) -> int:
        """Bytes streamed from the disk tier while serving; reading the model at load is not offloading."""
        return sum(t.bytes for k, t in self.transfers.items()
                   if k.endswith("/disk->host") and not k.startswith("load/"))


class Gauge(BaseModel):
    max: float
    mean: float
    last: float


class ServerMetrics(AsGiven):
    """A server's own Prometheus metrics over the cell (backends/prometheus.py): counters' growth, gauges' max, mean
    and last value, and the scrapes' timeline."""
    source: str | None = None
    interval_s: float | None = None
    window: str | None = None
    scrapes: int | None = None
    counters: dict[str, float] = Field(default_factory=dict)
    gauges: dict[str, Gauge] = Field(default_factory=dict)
    timeline: dict[str, list[float | None]] = Field(default_factory=dict)
    missing: list[str] = Field(default_factory=list)
    failed_scrapes: int | None = None
    errors: list[str] = Field(default_factory=list)


class NodeInfo(AsGiven):
    """The machine a cell ran on (harness/measure/environment.py node()); with --executor ray also its Ray node."""
    hostname: str | None = None
    gpus: list[str] = Field(default_factory=list)
    driver: str | None = None
    ray_node_id: str | None = None
    ip: str | None = None


class NodeAttempt(NodeInfo):
    """One try of a cell under --executor ray: the node, and how it ended."""
    status: str | None = None
    error: str | None = None


# ---- worker -> runner: the report ---------------------------------------------------------------------------------

class WorkerReport(BaseModel):
    """What a worker says about its cell beside the request records: CELL_DIR/worker.json."""
    status: Literal["ok", "failed"] = "failed"
    error: str | None = None
    t_start: float
    prepare_time_s: float | None = None  # Backend.prepare(): one-off work (a GGUF conversion), not load time
    load: Span | None = None
    load_time_s: float | None = None
    # The same blocks, in the same shapes, as the CellResult the runner makes of it: written here as the worker's
    # backend and monitor gave them (AsGiven), so a cell's worker.json and its results.json entry say the same.
    environment: EngineInfo = Field(default_factory=EngineInfo)
    capabilities: Capabilities | None = None  # the backend's, as the harness applied them
    repetitions: list[Span] = Field(default_factory=list)
    resources: ResourceUsage | None = None
    logical_io: LogicalIO | None = None
    server_metrics: ServerMetrics | None = None
    concurrency_cap: ConcurrencyCap | None = None
    stop_error: str | None = None
    # Per repetition, the event loops' scheduling delays (ms) sampled while it ran, every client's pooled.
    loop_lag_ms: list[list[float]] = Field(default_factory=list)
    clients: list[ClientClock] = Field(default_factory=list)  # the client processes beyond the worker itself
    not_sent: list[int] = Field(default_factory=list)  # per repetition (capacity step): cut by max_duration_s
    # Per repetition: why load.oversaturation_stop ended it early (its unsent requests are in not_sent), or None.
    oversaturation: list[str | None] = Field(default_factory=list)
    cpu_isolation: CpuIsolation | None = None
    capacity_steps: list[CapacityStep] = Field(default_factory=list)
    prefix_reuse: PrefixReuse | None = None  # what the engine says it reused (Backend.prefix_reuse)


# ---- runner -> results.json -> every reader -----------------------------------------------------------------------

class CapacityStepResult(BaseModel):
    """One step of a capacity search in results.json."""
    step: int
    value: float  # offered: req/s (search: rate) or requests in flight (search: concurrency)
    achieved_rate_rps: float | None = None
    sent: int
    not_sent: int = 0  # cut by max_duration_s
    attainment: float  # share of the step's requests that met the slo
    attainment_ci: list[float] | None = None  # its 95% CI (Wilson)
    # The latencies the slo judges (catalogue.SLO_METRICS: ttft_ms, tpot_ms, e2el_ms) over the step's requests, each a
    # Distribution under its catalogue key, named as a cell's metrics are ("ttft_ms.p99").
    metrics: MetricValues = Field(default_factory=MetricValues)
    passed: bool


class CapacityResult(BaseModel):
    """What a capacity search found: the highest value that passed and the lowest that failed above it (the
    bracket, its uncertainty), and every step."""
    search: Literal["rate", "concurrency"]
    attainment_target: float
    slo: SLO  # stored with only the limits it sets, as the scenario wrote them

    @field_serializer("slo")
    def _set_limits(self, slo: SLO) -> dict[str, float]:
        return slo.model_dump(exclude_none=True)
    capacity: float | None = None  # the highest passing value; None when no step passed
    # The requests per second it holds: the capacity itself for search: rate; for search: concurrency, the request
    # throughput its capacity step achieved. The number guides rank by (catalogue: capacity_rps).
    capacity_rps: float | None = None
    fails_at: float | None = None  # the lowest failing value above it; None when none failed
    verdict: str
    steps: list[CapacityStepResult] = Field(default_factory=list)


class CellResult(BaseModel):
    """One cell in results.json (docs/results.md). Fields an older file lacks read as their defaults."""
    model_config = ConfigDict(extra="ignore")
    id: str
    model: str
    backend: str
    workload: str
    backend_kind: str | None = None
    base_workload: str | None = None
    # The swept settings that made this cell and their values ({"input_tokens": 1024, "load.concurrency": 4}): a
    # mapping by nature, its keys the scenario's sweep axes.
    sweep: dict[str, int | float] = Field(default_factory=dict)
    # The concrete workload it ran, read through the scenario's own schema (its defaults are the only ones); a stored
    # workload this version's schema refuses (results of another llmbench) is kept as it was written.
    workload_spec: Workload | dict[str, Any] | None = Field(None, union_mode="left_to_right")
    status: Literal["ok", "failed", "skipped"]  # skipped: an optional backend whose engine is not installed (error: why)
    error: str | None = None
    metrics: MetricValues | None = None  # each statistic's median over the repetitions
    repetitions: list[Repetition] = Field(default_factory=list)
    # 95% confidence intervals [low, high] of the headline statistics (catalogue.HEADLINE: "ttft_ms.p50", ...)
    ci: dict[str, list[float]] = Field(default_factory=dict)
    ci_method: str | None = None  # "bootstrap over repetitions" (>= 3) or "bootstrap over requests"
    cv: dict[str, float] = Field(default_factory=dict)  # coefficient of variation across repetitions
    unstable: str | None = None  # why the repetitions disagree beyond the scenario's max_repetition_cv
    percentile_method: str | None = None
    token_counts: TokenCounts | None = None
    load_time_s: float | None = None
    prepare_time_s: float | None = None
    engine: EngineInfo = Field(default_factory=EngineInfo)
    capabilities: Capabilities | None = None  # the backend's, as the harness applied them
    concurrency_cap: ConcurrencyCap | None = None
    requests_file: str | None = None
    timeline_file: str | None = None
    logical_io: LogicalIO | None = None
    server_metrics: ServerMetrics | None = None
    resources: ResourceUsage | None = None
    over_budget: bool | None = None
    # The load generator could not keep the schedule (achieved rate, dispatch lag, loop lag): why, in words.
    client_limited: bool | None = None
    client_limited_reasons: list[str] = Field(default_factory=list)
    # Where latency from the scheduled send differs beyond noise from latency from the actual send (the client's own
    # queue, coordinated omission): why, in words; verdicts then read the former (catalogue.INCLUDING_CLIENT_QUEUE).
    client_queue_shift: list[str] = Field(default_factory=list)
    clients: list[ClientClock] = Field(default_factory=list)
    # The machine it ran on (environment.node(): hostname, GPUs, driver; with --executor ray also the Ray node id),
    # and with --executor ray every attempt: the node tried and why it failed.
    node: NodeInfo | None = None
    attempts: list[NodeAttempt] = Field(default_factory=list)
    not_sent: list[int] = Field(default_factory=list)  # per repetition: requests max_duration_s kept from leaving
    # load.oversaturation_stop: "repetition i: why", for each repetition it ended early (GuideLLM's stop)
    oversaturation: list[str] = Field(default_factory=list)
    cpu_isolation: CpuIsolation | None = None  # the CPUs of the load generator and of the engine; None: not recorded
    capacity: CapacityResult | None = None  # load: capacity
    # Prompt tokens the engine reused from its prefix cache over the cell, as it counts them; None: it keeps none
    prefix_reuse: PrefixReuse | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def requests_path(self, run_dir: Path) -> Path:
        return run_dir / (self.requests_file or f"cells/{self.id}/requests.jsonl")

    def interval(self, name: str) -> tuple[float, float] | None:
        """The 95% CI of a headline statistic ("ttft_ms.p50", "output_throughput_tok_s"), when there is one."""
        v = self.ci.get(name)
        return (v[0], v[1]) if v and len(v) == 2 else None

    @property
    def error_line(self) -> str | None:
        """The first line of the error, for tables and summaries."""
        return self.error.strip().splitlines()[0] if self.error and self.error.strip() else None


class Agreement(BaseModel):
    """How often a backend answered like the reference backend (harness/results/agreement.py): greedy decoding on
    one model and workload, the first `first_n` tokens (or words, when either side has no token ids) compared."""
    model: str
    workload: str
    reference: str
    backend: str
    unit: Literal["tokens", "words"]
    first_n: int
    compared: int  # requests answered by both
    matching: int
    share: float
    ci: list[float]  # 95% Clopper-Pearson interval of the share
    mean_common_prefix: float  # in `unit`s: how far the two agree before they first differ
    precision: str  # "float32", "float32 vs float16", or "unknown": mismatches between precisions are expected


class RunResult(BaseModel):
    """A whole results.json."""
    model_config = ConfigDict(extra="ignore")
    schema_version: int
    created: str | None = None
    updated: str | None = None
    scenario_file: str | None = None
    scenario: dict[str, Any] = Field(default_factory=dict)
    # What --resume compares (results/store.py scenario_fingerprint); each resume under a changed scenario that
    # --force allowed is listed in forced_resumes: when, and the top-level keys that changed.
    scenario_fingerprint: str | None = None
    forced_resumes: list[dict[str, Any]] = Field(default_factory=list)
    environment: dict[str, Any] = Field(default_factory=dict)
    cells: list[CellResult]
    agreement: list[Agreement] = Field(default_factory=list)  # with record_outputs and two or more greedy backends

    def to_json(self) -> str:
        return self.model_dump_json(indent=1)


def load_run(path: Path | str) -> RunResult:
    """A results.json, or the one inside a results folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ResultsError(f"{path}: cannot read it: {e}") from None
    except json.JSONDecodeError as e:
        raise ResultsError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict) or "schema_version" not in data or "cells" not in data:
        raise ResultsError(f"{path}: not an llmbench results file (expected schema_version and cells)")
    if not isinstance(data["schema_version"], int) or data["schema_version"] > SCHEMA_VERSION:
        raise ResultsError(f"{path}: schema_version {data['schema_version']!r} is newer than this llmbench reads "
                           f"({SCHEMA_VERSION}); upgrade llmbench")
    try:
        return RunResult.model_validate(_upgraded(data))
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ResultsError(f"{path}: {where}: {first['msg']}") from None


# Schema 1's capacity step latencies, by their catalogue names (schema 2).
_V1_STEP_LATENCIES = {"ttft_p50_ms": ("ttft_ms", "p50"), "ttft_p99_ms": ("ttft_ms", "p99"),
                      "tpot_p50_ms": ("tpot_ms", "p50"), "tpot_p99_ms": ("tpot_ms", "p99")}


def _upgraded(data: dict[str, Any]) -> dict[str, Any]:
    """A results file of an older schema in this one's shape (the parsed JSON, changed in place); what is not the
    shape either schema expects is left for validation to name."""
    if data["schema_version"] < 2:
        for cell in data["cells"] if isinstance(data["cells"], list) else []:
            capacity = cell.get("capacity") if isinstance(cell, dict) else None
            steps = capacity.get("steps") if isinstance(capacity, dict) else None
            for step in steps if isinstance(steps, list) else []:
                if isinstance(step, dict):
                    _v1_step(step)
    data["schema_version"] = SCHEMA_VERSION
    return data


def _v1_step(step: dict[str, Any]) -> None:
    """Schema 1's four latency numbers of a capacity step as the Distributions they came from; their count and the
    other statistics were not stored (count None: not recorded)."""
    metrics: dict[str, dict[str, Any]] = {}
    for old, (key, stat) in _V1_STEP_LATENCIES.items():
        if (v := step.pop(old, None)) is not None:
            metrics.setdefault(key, {"count": None})[stat] = v
    step["metrics"] = metrics


def read_requests(path: Path) -> list[RequestRecord]:
    """The records of a requests.jsonl; a line cut by a crash is skipped, as the reducer skipped it.
    Raises FileNotFoundError when the file is gone."""
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(d, dict) and "t_send" in d:
            out.append(RequestRecord.from_dict(d))
    return out
