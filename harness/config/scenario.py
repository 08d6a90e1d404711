"""The scenario schema (pydantic v2, unknown keys are errors) and its expansion into cells.

Key names here are the user interface; `bench schema` prints them as JSON Schema. Loading and the checks that
need the file system or the network are in `harness.config.load`.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from harness.config.conversation import ConversationPrompts
from harness.config.generators import Generators, senders
from harness.config.prompts import (DocumentPrompts, FilePrompts, LengthDist, SharedPrefixPrompts,
                                    SyntheticPrompts, length_bounds)
from harness.config.shapes import OversaturationStop, RampUp, SteadyState
from harness.core.spec import NAME_MAX, BackendSpec, Resources, Strict


# ---- models -------------------------------------------------------------------------------------------------------

class SyntheticModel(Strict):
    preset: str = Field(description="a preset of `bench models list`, e.g. tiny-llama or llama-3.1-8b")
    seed: int = 0

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from harness.inputs.models import PRESETS

        if v not in PRESETS:
            raise ValueError(f"unknown preset {v!r}; known: {', '.join(PRESETS)}")
        return v


class ModelSpec(Strict):
    path: Path | None = Field(None, description="an HF model folder (config.json, safetensors, tokenizer)")
    synthetic: SyntheticModel | None = Field(None, description="a random-weight model built locally on first use")

    @model_validator(mode="after")
    def _exactly_one(self) -> ModelSpec:
        if (self.path is None) == (self.synthetic is None):
            raise ValueError("give exactly one of 'path' or 'synthetic'")
        return self


# ---- workloads ----------------------------------------------------------------------------------------------------

Positive = Annotated[int, Field(gt=0)]
PositiveRate = Annotated[float, Field(gt=0)]

MAX_DURATION_DESCRIPTION = ("stop sending new requests this many seconds after a repetition (a capacity step) "
                            "starts; requests in flight finish and are measured, the rest are counted as not sent "
                            "(results: not_sent)")


class SequentialLoad(Strict):
    type: Literal["sequential"] = "sequential"
    max_duration_s: PositiveRate | None = Field(None, description=MAX_DURATION_DESCRIPTION)


def sweep_values(v):
    """A swept list: at least one value, no value twice (two cells would measure the same thing under one name)."""
    if isinstance(v, list):
        if not v:
            raise ValueError("a sweep needs at least one value")
        repeated = sorted(x for x, n in Counter(v).items() if n > 1)
        if repeated:
            raise ValueError(f"a sweep's values must differ; repeated: {', '.join(map(_label, repeated))}")
    return v


def _label(value: float) -> str:
    """A swept value in a workload name: short (2, not 2.0), yet never the same for two different values."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


CLIENTS_DESCRIPTION = ("client processes sharing the load, when one cannot keep up (bench calibrate tells): each "
                       "sends every N-th request of the one schedule on its own connections; backends served over "
                       "HTTP only")


class ConcurrencyLoad(Strict):
    """Closed loop: `concurrency` requests in flight, a new one as soon as one completes."""
    type: Literal["concurrency"]
    concurrency: Positive | list[Positive] = Field(description="a list sweeps: one cell per value")
    _sweep = field_validator("concurrency")(sweep_values)
    clients: Positive = Field(1, description=CLIENTS_DESCRIPTION + "; each keeps its share of the concurrency")
    max_duration_s: PositiveRate | None = Field(None, description=MAX_DURATION_DESCRIPTION)

    @model_validator(mode="after")
    def _a_request_per_client(self) -> ConcurrencyLoad:
        low = min(self.concurrency) if isinstance(self.concurrency, list) else self.concurrency
        if self.clients > low:
            raise ValueError(f"clients ({self.clients}) must not exceed the concurrency ({low}): each client keeps at "
                             f"least one request in flight")
        return self


OVERSATURATION_DESCRIPTION = ("end a repetition once the engine is over-saturated (GuideLLM's stop): the requests in "
                              "flight and their TTFT both keep rising; one load generator only")


class OneGenerator:
    """A check for the open loops: an over-saturation stop is decided by the worker's own load generator."""

    @model_validator(mode="after")
    def _one_generator(self):
        if self.oversaturation_stop is not None and senders(self) > 1:
            raise ValueError("oversaturation_stop is decided by one load generator: it needs clients: 1 and no "
                             "generators")
        return self


class PoissonLoad(OneGenerator, Generators):
    """Open loop: requests arrive at random intervals of mean 1/rate (exponential: a Poisson process; gamma with
    burstiness), whatever completes."""
    type: Literal["poisson"]
    rate: PositiveRate | list[PositiveRate] = Field(description="requests per second; a list sweeps")
    _sweep = field_validator("rate")(sweep_values)
    burstiness: PositiveRate = Field(1.0, description="gaps drawn from a gamma distribution of this shape (vLLM's "
                                     "--burstiness): 1 a Poisson process, below 1 burstier, above 1 more regular")
    ramp_up: RampUp | None = Field(None, description="climb to the rate from ramp_up.start_rate over "
                                   "ramp_up.duration_s, linearly or exponentially")
    oversaturation_stop: OversaturationStop | None = Field(None, description=OVERSATURATION_DESCRIPTION)
    clients: Positive = Field(1, description=CLIENTS_DESCRIPTION)
    max_duration_s: PositiveRate | None = Field(None, description=MAX_DURATION_DESCRIPTION)


class TraceLoad(OneGenerator, Generators):
    """Open loop replaying a recorded trace (mooncake JSONL: timestamp ms, input_length, output_length, hash_ids):
    request j of each repetition leaves at row j's time, with row j's lengths; rows sharing a hash_id share that
    block of prompt. num_requests rows are replayed (the first ones)."""
    type: Literal["trace"]
    path: Path = Field(description="the trace, a JSONL file; relative to the scenario file")
    speedup: PositiveRate = Field(1.0, description="replay this many times faster (2: half the gaps)")
    block_tokens: Positive = Field(512, description="tokens of prompt per hash_id block")
    oversaturation_stop: OversaturationStop | None = Field(None, description=OVERSATURATION_DESCRIPTION)
    max_duration_s: PositiveRate | None = Field(None, description=MAX_DURATION_DESCRIPTION)


class CapacityLoad(Strict):
    """The highest Poisson rate (or concurrency) at which the scenario's `slo` holds for `attainment` of the
    requests: from `start`, doubled until a step fails, then bisected until the bracket is at most `tolerance` wide.
    Each step sends num_requests fresh requests in the one engine start; `repetitions` does not apply."""
    type: Literal["capacity"]
    search: Literal["rate", "concurrency"] = Field("rate", description="what is searched: Poisson rate (req/s) "
                                                                      "or closed-loop concurrency")
    start: PositiveRate = Field(1.0, description="the first step's rate or concurrency")
    attainment: float = Field(0.99, gt=0, le=1, description="share of requests that must meet the slo for a step "
                                                            "to pass (failed requests do not meet it)")
    tolerance: PositiveRate = Field(0.5, description="stop once passing and failing steps are this close (req/s, "
                                                     "or concurrency, where the finest step is 1)")
    max_steps: Positive = Field(12, description="at most this many steps; the bracket found so far is reported")
    max_duration_s: PositiveRate | None = Field(None, description=MAX_DURATION_DESCRIPTION)


Load = Annotated[SequentialLoad | ConcurrencyLoad | PoissonLoad | TraceLoad | CapacityLoad,
                 Field(discriminator="type")]


# The sources' schemas are in harness/config/prompts.py, multi-turn sessions' in harness/config/conversation.py.
PromptSource = Annotated[SyntheticPrompts | FilePrompts | DocumentPrompts | SharedPrefixPrompts | ConversationPrompts,
                         Field(discriminator="type")]
Length = Positive | LengthDist


class Workload(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.,=\[\]-]*$")  # brackets: the names sweeps give
    input_tokens: Length | list[Positive] | None = Field(
        None, description="exact prompt length in the model's tokenizer, special tokens included; a list sweeps; "
                          "{dist: ...} draws one per request; a file source needs it only to truncate, a trace load "
                          "not at all (its rows give each request's)")
    output_tokens: Length | list[Positive] | None = Field(
        None, description="exact where the engine allows (ignore_eos / min_tokens); a list sweeps; {dist: ...} draws "
                          "one per request; required except with a trace load (its rows give each request's)")
    num_requests: Positive | list[Positive]
    load: Load = Field(default_factory=SequentialLoad)
    warmup_requests: int = Field(1, ge=0, description="sent before measuring, excluded from every metric")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above 0 each request samples with seed "
                                                       "scenario seed + request index")
    prompts: PromptSource = Field(default_factory=SyntheticPrompts)
    max_error_rate: float | None = Field(None, ge=0, le=1, description="this workload's cells fail when more of "
                                         "their requests fail; default: the scenario's max_error_rate")
    steady_state: SteadyState | None = Field(None, description="metrics over the middle of each repetition only: "
                                             "requests scheduled in its first skip_start_s or last skip_end_s "
                                             "seconds are left out")

    _sweep = field_validator("input_tokens", "output_tokens", "num_requests")(sweep_values)

    @model_validator(mode="after")
    def _lengths_fit_the_source(self) -> Workload:
        source = self.prompts
        if self.input_tokens is None:
            # A file brings its own prompts, a trace its own lengths: the other sources build to input_tokens.
            needed = source.type == "file" and source.truncate
            if needed or (source.type in ("synthetic", "document", "shared_prefix") and self.load.type != "trace"):
                raise ValueError(f"input_tokens is required with prompts of type {source.type}"
                                 + (" and truncate: true" if needed else ""))
        if self.output_tokens is None and self.load.type != "trace":
            raise ValueError(f"output_tokens is required with a load of type {self.load.type}: only a trace gives "
                             f"each request's output length")
        if source.type == "shared_prefix" and self.input_tokens is not None:
            shortest = min(length_bounds(v)[0] for v in
                           (self.input_tokens if isinstance(self.input_tokens, list) else [self.input_tokens]))
            if source.prefix_tokens >= shortest:
                raise ValueError(f"prompts.prefix_tokens ({source.prefix_tokens}) must be below input_tokens "
                                 f"({shortest}): each request adds its own suffix")
        return self

    def expand(self) -> list[ConcreteWorkload]:
        """One concrete workload per combination of swept values (lists), named e.g. `short[input_tokens=1024]`."""
        axes = {k: getattr(self, k) for k in SWEEPABLE if isinstance(getattr(self, k), list)}
        for key in ("concurrency", "rate"):
            if isinstance(getattr(self.load, key, None), list):
                axes[f"load.{key}"] = getattr(self.load, key)
        out = []
        for values in itertools.product(*axes.values()):
            sweep = dict(zip(axes, values))
            # Copies, not re-validation: every value was validated as a member of its list (linear time).
            update = {k: v for k, v in sweep.items() if not k.startswith("load.")}
            load = {k[5:]: v for k, v in sweep.items() if k.startswith("load.")}
            if load:
                update["load"] = self.load.model_copy(update=load)
            if sweep:
                update["name"] = f"{self.name}[{','.join(f'{k}={_label(v)}' for k, v in sweep.items())}]"
            out.append(ConcreteWorkload(spec=self.model_copy(update=update), base=self.name, sweep=sweep))
        return out


SWEEPABLE = ("input_tokens", "output_tokens", "num_requests")
MIN_REPETITIONS = 3  # below this a cell's CIs cannot include run-to-run drift


@dataclass
class ConcreteWorkload:
    """A workload with every swept field fixed to one value: what a cell runs."""
    spec: Workload
    base: str
    sweep: dict[str, float]


class SLO(Strict):
    ttft_ms: float | None = Field(None, gt=0)
    tpot_ms: float | None = Field(None, gt=0)
    e2el_ms: float | None = Field(None, gt=0)


class Scenario(Strict):
    name: str
    models: dict[Annotated[str, Field(min_length=1, max_length=NAME_MAX)], ModelSpec] = Field(min_length=1)
    backends: list[BackendSpec] = Field(min_length=1)
    workloads: list[Workload] = Field(min_length=1)
    repetitions: int = Field(3, gt=0, description="fewer than 3 gives no confidence interval across repetitions "
                                                  "(a warning says so)")
    max_error_rate: float = Field(0, ge=0, le=1, description="a cell whose share of failed requests exceeds this "
                                                            "fails; a workload's own max_error_rate overrides it")
    max_repetition_cv: float = Field(0.25, gt=0, description="a cell whose repetitions' p50 latencies or "
                                     "throughputs vary more than this (coefficient of variation) is marked unstable")
    seed: int = Field(0, ge=0, le=2**31 - 1, description="request i is sampled with seed + i: engines take 32 bits")
    slo: SLO = Field(default_factory=SLO)
    record_outputs: bool = Field(False, description="keep every request's output text, and its token ids where the "
                                 "engine gives them, in requests.jsonl; with two or more greedy backends on one "
                                 "model, results.json and the report compare their answers (agreement)")
    output: Path | None = Field(None, description="results folder; `--out` overrides; default results/<name>")
    resources: Resources = Field(default_factory=Resources)
    cell_timeout_s: float = Field(3600, gt=0, description="a cell's worker is killed after this long")

    @model_validator(mode="after")
    def _cross_references(self) -> Scenario:
        for kind, names in (("backend", [b.name for b in self.backends]), ("workload", [w.name for w in self.workloads])):
            dupes = {n for n in names if names.count(n) > 1}
            if dupes:
                raise ValueError(f"{kind} names must be unique; repeated: {', '.join(sorted(dupes))}")
        for b in self.backends:
            for m in b.models or []:
                if m not in self.models:
                    raise ValueError(f"backend {b.name!r} names unknown model {m!r}; known: {', '.join(self.models)}")
        return self

    @model_validator(mode="after")
    def _what_loads_need(self) -> Scenario:
        for i, w in enumerate(self.workloads):
            if isinstance(w.load, CapacityLoad) and not any(self.slo.model_dump().values()):
                raise ValueError(f"workloads[{i}].load: a capacity search needs the scenario's slo (ttft_ms, "
                                 f"tpot_ms or e2el_ms): the level it finds the highest load for")
            if w.prompts.type == "conversation" and senders(w.load) > 1:
                raise ValueError(f"workloads[{i}].load: a conversation's sessions run in the worker, which renders "
                                 f"each turn with its tokenizer: one load generator only (no clients or generators)")
            if isinstance(w.load, TraceLoad) and w.prompts.type != "synthetic":
                raise ValueError(f"workloads[{i}].prompts: a trace gives its requests' prompts (their lengths and "
                                 f"shared blocks); expected type synthetic, got {w.prompts.type}")
        return self

    @model_validator(mode="after")
    def _distinct_cells(self) -> Scenario:
        """Each cell is stored in the folder cells/<id>, and prompts in files named after the model: two cells with
        one id would overwrite each other, and an id too long for a folder name would fail mid-matrix."""
        for i, w in enumerate(self.workloads):  # not on the field: the names sweeps give may be longer
            if len(w.name) > NAME_MAX:
                raise ValueError(f"workloads[{i}].name: at most {NAME_MAX} characters, got {len(w.name)}")
        models: dict[str, str] = {}
        for m in self.models:
            other = models.setdefault(safe_name(m), m)
            if other != m:
                raise ValueError(f"models {other!r} and {m!r} would share files named {safe_name(m)!r}: rename one")
        seen: dict[str, Cell] = {}
        for cell in self.cells():
            if len(cell.id.encode()) > CELL_ID_MAX:
                raise ValueError(f"the cell {cell} would be stored in a folder named with {len(cell.id.encode())} "
                                 f"bytes, more than {CELL_ID_MAX}: shorten its names or sweep fewer fields together")
            other = seen.setdefault(cell.id, cell)
            if other is not cell:
                raise ValueError(f"the cells {other} and {cell} would both be stored as cells/{cell.id}: rename one")
        return self

    def warnings(self) -> list[str]:
        """What is valid but weakens the results: said before running, and by `bench validate`."""
        searches_only = all(isinstance(w.load, CapacityLoad) for w in self.workloads)  # they run once, whatever
        if self.repetitions < MIN_REPETITIONS and not searches_only:
            return [f"repetitions: {self.repetitions}: with fewer than {MIN_REPETITIONS} repetitions there is no "
                    f"confidence interval across repetitions (only over requests, which misses run-to-run drift)"
                    + ("" if self.repetitions > 1 else " and no check that repetitions agree")]
        return []

    def max_error_rate_of(self, workload: str) -> float:
        own = self.workload(workload).spec.max_error_rate
        return self.max_error_rate if own is None else own

    def cells(self, only_backends: list[str] | None = None) -> list[Cell]:
        """The matrix: every model × backend × workload, less what a backend restricts itself from."""
        return [
            Cell(model=m, backend=b.name, workload=w.spec.name)
            for m in self.models
            for b in self.backends
            if (not only_backends or b.name in only_backends) and (b.models is None or m in b.models)
            for w in self.concrete_workloads()
        ]

    @cached_property
    def _concrete(self) -> list[ConcreteWorkload]:
        # Expanded once: a lookup per cell must not expand every sweep again (quadratic in cells).
        return [c for w in self.workloads for c in w.expand()]

    @cached_property
    def _concrete_by_name(self) -> dict[str, ConcreteWorkload]:
        # Two with one name would give two cells with one id, which _distinct_cells refuses.
        return {c.spec.name: c for c in self._concrete}

    def concrete_workloads(self) -> list[ConcreteWorkload]:
        return self._concrete

    def backend(self, name: str) -> BackendSpec:
        return next(b for b in self.backends if b.name == name)

    def workload(self, name: str) -> ConcreteWorkload:
        return self._concrete_by_name[name]


CELL_ID_MAX = 200  # bytes of a cell's folder name; file systems allow 255


def safe_name(name: str) -> str:
    """A name as it appears in file names."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class Cell(Strict):
    model: str
    backend: str
    workload: str

    @property
    def id(self) -> str:
        return safe_name(f"{self.model}__{self.backend}__{self.workload}")

    def __str__(self) -> str:
        return f"{self.model} × {self.backend} × {self.workload}"
