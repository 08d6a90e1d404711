"""The scenario file: its schema (pydantic v2, unknown keys are errors), loading, validation and expansion into cells.

Key names here are the user interface; `bench schema` prints them as JSON Schema.
"""

from __future__ import annotations

import itertools
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ScenarioError(Exception):
    """A user mistake in a scenario: printed without a traceback, exit code 2."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- models -------------------------------------------------------------------------------------------------------

class SyntheticModel(Strict):
    preset: str = Field(description="a preset of `bench models list`, e.g. tiny-llama or llama-3.1-8b")
    seed: int = 0

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, v: str) -> str:
        from harness.models import PRESETS

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


# ---- backends -----------------------------------------------------------------------------------------------------

class Resources(Strict):
    vram_budget: str | None = Field(None, description="e.g. 8GiB; each backend maps it to its engine's setting")
    sample_interval_ms: float = Field(20.0, gt=0)
    drop_page_cache: bool = False

    @field_validator("vram_budget")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_bytes(v)
        return v


class BackendSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    kind: str = Field(description="the backend kind; `bench validate` lists the known ones on a typo")
    options: dict[str, Any] = Field(default_factory=dict, description="the kind's own options, validated by it")
    url: str | None = Field(None, description="attach to a running server instead of launching one")
    served_model: str | None = Field(None, description="the model name the server knows (OpenAI `model`)")
    api: Literal["completions", "chat"] = "completions"
    python: Path | None = Field(None, description="run this backend's worker with another interpreter (its own venv)")
    models: list[str] | None = Field(None, description="restrict this backend to these models")
    resources: Resources | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            u = urlparse(v)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"expected an http(s) URL, got {v!r}")
        return v


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


# ---- loading ------------------------------------------------------------------------------------------------------

_UNION_MEMBER = re.compile(r"^(int|float|str|bool|list\[.*\]|constrained-.*|function-.*)$")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _UNION_MEMBER.match(part) or (part in ("sequential", "concurrency", "poisson", "synthetic")
                                           and out.endswith(("load", "prompts"))):
            continue  # pydantic's union tags add noise to the path the user sees
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def format_validation_error(source: str, err: ValidationError, prefix: str = "") -> str:
    """One line per field: 'file: field: what was expected (got ...)'; union alternatives joined with 'or'."""
    problems: dict[str, list[str]] = {}
    for e in err.errors():
        where = _loc(tuple(e["loc"]))
        where = f"{prefix}.{where}" if prefix and where != "(top level)" else (prefix or where)
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
        got = "" if e["type"] in ("missing", "extra_forbidden") else f" (got {e['input']!r:.80})"
        if msg + got not in problems.setdefault(where, []):
            problems[where].append(msg + got)
    return "\n".join([f"{source}: invalid scenario"] + [f"  {w}: {' or '.join(m)}" for w, m in problems.items()])


def load_scenario(path: Path | str) -> Scenario:
    """Parse and fully validate a scenario; every user mistake raises ScenarioError naming file and field."""
    path = Path(path)
    if not path.is_file():
        raise ScenarioError(f"{path}: no such scenario file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ScenarioError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        raise ScenarioError(f"{path}: the file is empty; expected a mapping with name, models, backends, workloads")
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: the top level must be a mapping (name, models, backends, ...), got a {type(data).__name__}")
    try:
        scenario = Scenario.model_validate(data)
    except ValidationError as e:
        raise ScenarioError(format_validation_error(str(path), e)) from None
    _resolve_paths(scenario, path.parent)
    _check_backends(scenario, str(path))
    return scenario


def _resolve_paths(scenario: Scenario, base: Path) -> None:
    for name, m in scenario.models.items():
        if m.path is not None:
            m.path = (base / m.path).expanduser().resolve() if not m.path.is_absolute() else m.path
    for b in scenario.backends:
        if b.python is not None and not b.python.is_absolute():
            # Normalized but not resolved: a venv's python is a symlink to the base interpreter, which lacks the venv.
            b.python = Path(os.path.normpath(base.absolute() / b.python))


def _check_backends(scenario: Scenario, source: str) -> None:
    from backends.registry import get_backend_class, known_kinds

    for name, m in scenario.models.items():
        if m.path is not None and not (m.path / "config.json").is_file():
            raise ScenarioError(f"{source}: models.{name}.path: expected an HF model folder with config.json, "
                                f"but {m.path} {'has none' if m.path.is_dir() else 'does not exist'}")
    for i, b in enumerate(scenario.backends):
        where = f"{source}: backends[{i}]"
        try:
            cls = get_backend_class(b.kind)
        except KeyError:
            raise ScenarioError(f"{where}.kind: unknown backend kind {b.kind!r}; known: {', '.join(known_kinds())}") from None
        try:
            cls.Options.model_validate(b.options)
        except ValidationError as e:
            raise ScenarioError(format_validation_error(source, e, prefix=f"backends[{i}].options")) from None
        problem = cls.check_spec(b)
        if problem:
            raise ScenarioError(f"{where}: {problem}")
        if b.python is not None and not b.python.is_file():
            raise ScenarioError(f"{where}.python: expected a Python interpreter, {b.python} does not exist")


def check_reachable(scenario: Scenario, source: str, timeout: float = 3.0) -> None:
    """Attached servers must answer before anything runs: a typo in a URL should not cost a whole matrix."""
    for i, b in enumerate(scenario.backends):
        if b.url is None:
            continue
        u = urlparse(b.url)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:
            socket.create_connection((u.hostname, port), timeout=timeout).close()
        except OSError as e:
            raise ScenarioError(f"{source}: backends[{i}].url: cannot reach {b.url}: {e.strerror or e}") from None


def parse_bytes(text: str) -> int:
    """'8GiB' -> 8589934592; accepts B, KB/MB/GB (10^3) and KiB/MiB/GiB (2^10)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B)?\s*", text, re.IGNORECASE)
    if not m:
        raise ValueError(f"expected a size like 8GiB or 500MB, got {text!r}")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    return int(float(m.group(1)) * scale)
