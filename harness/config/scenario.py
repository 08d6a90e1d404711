"""The scenario schema (pydantic v2, unknown keys are errors) and its expansion into cells.

Key names here are the user interface; `bench schema` prints them as JSON Schema. Loading and the checks that
need the file system or the network are in `harness.config.load`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from harness.core.spec import BackendSpec, Resources, Strict


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

class SequentialLoad(Strict):
    type: Literal["sequential"] = "sequential"


Positive = Annotated[int, Field(gt=0)]
PositiveRate = Annotated[float, Field(gt=0)]


class ConcurrencyLoad(Strict):
    """Closed loop: `concurrency` requests in flight, a new one as soon as one completes."""
    type: Literal["concurrency"]
    concurrency: Positive | list[Positive] = Field(description="a list sweeps: one cell per value")


class PoissonLoad(Strict):
    """Open loop: requests arrive at exponential intervals with mean 1/rate, whatever completes."""
    type: Literal["poisson"]
    rate: PositiveRate | list[PositiveRate] = Field(description="requests per second; a list sweeps")


Load = Annotated[SequentialLoad | ConcurrencyLoad | PoissonLoad, Field(discriminator="type")]


class SyntheticPrompts(Strict):
    """Seeded prompts of common words, each exactly `input_tokens` long in the model's tokenizer.

    Other prompt sources (files, datasets) become further members of `PromptSource`, told apart by `type`.
    """
    type: Literal["synthetic"] = "synthetic"


PromptSource = Annotated[SyntheticPrompts, Field(discriminator="type")]


class Workload(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.,=\[\]-]*$")  # brackets: the names sweeps give
    input_tokens: Positive | list[Positive] = Field(
        description="exact prompt length in the model's tokenizer, special tokens included; a list sweeps")
    output_tokens: Positive | list[Positive] = Field(
        description="exact where the engine allows (ignore_eos / min_tokens); a list sweeps")
    num_requests: Positive | list[Positive]
    load: Load = Field(default_factory=SequentialLoad)
    warmup_requests: int = Field(1, ge=0, description="sent before measuring, excluded from every metric")
    temperature: float = Field(0.0, ge=0, description="0: greedy; above 0 each request samples with seed "
                                                       "scenario seed + request index")
    prompts: PromptSource = Field(default_factory=SyntheticPrompts)

    @field_validator("input_tokens", "output_tokens", "num_requests")
    @classmethod
    def _nonempty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("a sweep needs at least one value")
        return v

    def expand(self) -> list[ConcreteWorkload]:
        """One concrete workload per combination of swept values (lists), named e.g. `short[input_tokens=1024]`."""
        axes = {k: getattr(self, k) for k in SWEEPABLE if isinstance(getattr(self, k), list)}
        for key in ("concurrency", "rate"):
            if isinstance(getattr(self.load, key, None), list):
                axes[f"load.{key}"] = getattr(self.load, key)
        out = []
        for values in itertools.product(*axes.values()):
            sweep = dict(zip(axes, values))
            data = self.model_dump()
            for key, value in sweep.items():
                if key.startswith("load."):
                    data["load"][key[5:]] = value
                else:
                    data[key] = value
            if sweep:
                data["name"] = f"{self.name}[{','.join(f'{k}={v:g}' for k, v in sweep.items())}]"
            out.append(ConcreteWorkload(spec=Workload.model_validate(data), base=self.name, sweep=sweep))
        return out


SWEEPABLE = ("input_tokens", "output_tokens", "num_requests")


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
    models: dict[str, ModelSpec] = Field(min_length=1)
    backends: list[BackendSpec] = Field(min_length=1)
    workloads: list[Workload] = Field(min_length=1)
    repetitions: int = Field(1, gt=0)
    seed: int = 0
    slo: SLO = Field(default_factory=SLO)
    record_outputs: bool = Field(False, description="keep every request's output token ids in requests.jsonl")
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

    def cells(self, only_backends: list[str] | None = None) -> list[Cell]:
        """The matrix: every model × backend × workload, less what a backend restricts itself from."""
        return [
            Cell(model=m, backend=b.name, workload=w.spec.name)
            for m in self.models
            for b in self.backends
            if (not only_backends or b.name in only_backends) and (b.models is None or m in b.models)
            for w in self.concrete_workloads()
        ]

    def concrete_workloads(self) -> list[ConcreteWorkload]:
        return [c for w in self.workloads for c in w.expand()]

    def backend(self, name: str) -> BackendSpec:
        return next(b for b in self.backends if b.name == name)

    def workload(self, name: str) -> ConcreteWorkload:
        return next(w for w in self.concrete_workloads() if w.spec.name == name)


class Cell(Strict):
    model: str
    backend: str
    workload: str

    @property
    def id(self) -> str:
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"{self.model}__{self.backend}__{self.workload}")
