"""A backend's entry in a scenario: what the worker hands the backend class, beside its model and cell context.

It lives in the core because backends read it and must not import the scenario schema around it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

from pydantic import BaseModel, ConfigDict, Field, field_validator

from llmbench.units import parse_size


NAME_MAX = 64  # model, backend and workload names: each cell's folder is named after all three


class Strict(BaseModel):
    """Every user-written record: an unknown key is an error, never ignored."""
    # inf and nan are no timeout, rate or temperature anyone means, and JSON cannot store them.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class Resources(Strict):
    vram_budget: str | None = Field(None, description="e.g. 8GiB; each backend maps it to its engine's setting")
    sample_interval_ms: float = Field(20.0, gt=0)
    drop_page_cache: bool = False
    isolate_client: bool = Field(True, description="on a machine with 2 CPUs or more, pin the load generator to its "
                                 "own CPU (one per client process, at most half of them) and the engine, its server "
                                 "processes and threads to the rest, thread counts to match; false: both share every "
                                 "CPU")

    @field_validator("vram_budget")
    @classmethod
    def _size(cls, v: str | None) -> str | None:
        if v is not None:
            parse_size(v)
        return v


class Placement(Strict):
    """Where a backend's cells may run under `bench run --executor ray`: what each cell's Ray task asks of a node."""
    num_gpus: float = Field(0, ge=0, description="GPUs each cell of this backend holds (Ray sets CUDA_VISIBLE_DEVICES)")
    num_cpus: float = Field(1, ge=0, description="CPUs each cell holds on its node")
    accelerator_type: str | None = Field(None, description="a Ray accelerator type the node must have, e.g. A10G, H100")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources the node must offer, "
                                        "e.g. {node_a: 1} as declared by `ray start --resources`")


class BackendSpec(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=NAME_MAX)
    kind: str = Field(description="the backend kind; `bench validate` lists the known ones on a typo")
    options: dict[str, Any] = Field(default_factory=dict, description="the kind's own options, validated by it")
    url: str | None = Field(None, description="attach to a running server instead of launching one")
    served_model: str | None = Field(None, description="the model name the server knows (OpenAI `model`)")
    api: Literal["completions", "chat"] = "completions"
    python: Path | None = Field(None, description="run this backend's worker with another interpreter (its own venv)")
    models: list[str] | None = Field(None, description="restrict this backend to these models")
    optional: bool = Field(False, description="run it where its engine is installed; elsewhere its cells are recorded "
                           "as skipped, with why and how to install it, and do not fail the run (false: they fail)")
    resources: Resources | None = None
    placement: Placement = Field(default_factory=Placement, description="with --executor ray: the resources each "
                                 "cell's Ray task needs (docs/scale-out.md); ignored by a local run")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        if v is not None:
            u = urlparse(v)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"expected an http(s) URL, got {v!r:.100}")
            try:
                port = u.port
            except ValueError:  # not a number, or beyond 65535
                port = -1
            if port is not None and not 1 <= port <= 65535:
                raise ValueError(f"expected a port from 1 to 65535, got {u.netloc.rpartition(':')[2]!r:.40}")
            try:
                too_long = len(u.hostname.encode("idna")) > 253
            except UnicodeError:  # a label longer than 63 characters, or an empty one
                too_long = True
            if too_long:
                raise ValueError(f"expected a host name of at most 253 characters in dot-separated labels of 1 to 63, "
                                 f"got {u.hostname!r:.80}")
        return v
