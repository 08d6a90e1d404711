"""Hugging Face TGI through its own `text-generation` client: attach to `url:`, or launch `text-generation-launcher`
(or its docker image) through the shared launcher.

TGI cannot be told to ignore EOS, so an output length is exact only when a request ends by length; each request
records which. Token counts come from the stream's `details.generated_tokens`; `/info` goes into the environment
and TGI's Prometheus `/metrics` (queue and batch sizes, token counters) into `server_metrics`.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.base import Backend, BackendError, Capabilities, Request, TokenEvent, Usage, now, vram_share
from backends.prometheus import MetricsWatch, Watched
from harness.core.processes import Server, container_name, launch, refuse_listen_flags

TGI_METRICS = {
    "queue_size": Watched("tgi_queue_size", "gauge"),
    "batch_size": Watched("tgi_batch_current_size", "gauge"),
    "batch_max_tokens": Watched("tgi_batch_current_max_tokens", "gauge"),
    "requests": Watched("tgi_request_count", "counter"),
    "requests_succeeded": Watched("tgi_request_success", "counter"),
    "generated_tokens": Watched("tgi_request_generated_tokens_sum", "counter"),
    "input_tokens": Watched("tgi_request_input_length_sum", "counter"),
}


class TGILaunch(BaseModel):
    model_config = ConfigDict(extra="forbid")
    via: Literal["launcher", "docker"] = Field("launcher", description="text-generation-launcher on PATH, or docker")
    image: str = "ghcr.io/huggingface/text-generation-inference:latest"
    model_id: str | None = Field(None, description="default: the scenario model's folder")
    max_input_tokens: int | None = Field(None, gt=0)
    max_total_tokens: int | None = Field(None, gt=0)
    max_batch_prefill_tokens: int | None = Field(None, gt=0)
    quantize: str | None = Field(None, description="e.g. bitsandbytes, awq, gptq, eetq, fp8")
    dtype: Literal["float16", "bfloat16"] | None = None
    num_shard: int | None = Field(None, gt=0)
    gpus: str = Field("all", description="docker --gpus")
    shm_size: str = "1g"
    extra_args: list[str] = Field(default_factory=list, description="more launcher flags, passed as they are (not "
                                                                    "--hostname or --port: the harness picks them)")
    startup_timeout_s: float = Field(900, gt=0)

    _listen = field_validator("extra_args")(lambda v: refuse_listen_flags(v, ("--hostname", "--port", "-p")))


class TGIOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    launch: TGILaunch | None = None
    timeout_s: int = Field(600, gt=0)
    metrics_interval_s: float | None = Field(1.0, gt=0, description="scrape /metrics this often; null: start and end only")


def launch_command(o: TGILaunch, model_path: Path, port: int, fraction: float | None,
                   container: str | None = None) -> list[str]:
    """The argv that starts TGI on 127.0.0.1:port. In docker the server listens on 80 inside, published on loopback,
    in a container named `container`: killing the docker client leaves its container running, so the harness removes
    it by that name (harness.core.processes.remove_container)."""
    inside = "/data/model" if o.via == "docker" else (o.model_id or str(model_path))
    flags = ["--model-id", o.model_id or inside]
    for flag, value in (("--max-input-tokens", o.max_input_tokens), ("--max-total-tokens", o.max_total_tokens),
                        ("--max-batch-prefill-tokens", o.max_batch_prefill_tokens), ("--quantize", o.quantize),
                        ("--dtype", o.dtype), ("--num-shard", o.num_shard), ("--cuda-memory-fraction", fraction)):
        if value is not None:
            flags += [flag, str(value)]
    if o.via == "docker":
        mount = [] if o.model_id else ["-v", f"{model_path}:/data/model:ro"]
        return ["docker", "run", "--rm", "--name", container or container_name("tgi"), "--label", "llmbench=tgi",
                "--gpus", o.gpus, "--shm-size", o.shm_size, "-p", f"127.0.0.1:{port}:80", *mount, o.image, *flags,
                "--port", "80", *o.extra_args]
    return ["text-generation-launcher", *flags, "--hostname", "127.0.0.1", "--port", str(port), *o.extra_args]


class TGIBackend(Backend):
    kind = "tgi"
    Options = TGIOptions
    capabilities = Capabilities(exact_output_length=False)

    @classmethod
    def check_spec(cls, spec) -> str | None:
        if (spec.url is None) == (spec.options.get("launch") is None):
            return "give exactly one of url (attach to a running TGI) or options.launch (start one)"
        return None

    async def start(self) -> None:
        from text_generation import AsyncClient

        self.server: Server | None = None
        if self.options.launch is not None:
            from harness.core.gpu import gpu_memory_bytes

            o = self.options.launch
            total = gpu_memory_bytes()
            fraction = vram_share(self.ctx.vram_budget, total) if self.ctx.vram_budget and total else None
            container = container_name("tgi") if o.via == "docker" else None
            self.server = await launch("tgi", lambda port: launch_command(o, self.model.path, port, fraction, container),
                                       self.ctx.dir, "/health", o.startup_timeout_s, container=container)
            base = self.server.url
        else:
            base = self.spec.url.rstrip("/")
        self.client = AsyncClient(base, timeout=self.options.timeout_s)
        self.info = await self._info(base)
        self.watch = MetricsWatch(lambda: self._get_text(base + "/metrics"), TGI_METRICS, base + "/metrics",
                                  self.options.metrics_interval_s)
        await self.watch.start()

    async def _get_text(self, url: str) -> str:
        import httpx

        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(url)
        r.raise_for_status()
        return r.text

    async def server_metrics(self) -> dict[str, Any]:
        return await self.watch.finish()

    async def _info(self, base: str) -> dict[str, Any]:
        import httpx

        async with httpx.AsyncClient(timeout=10) as client:
            r = await client.get(base + "/info")
        if r.status_code != 200:
            raise BackendError(f"GET {base}/info answered HTTP {r.status_code}: {r.text[:300]}")
        return r.json()

    async def stop(self) -> None:
        if getattr(self, "watch", None) is not None:
            await self.watch.close()
        if getattr(self, "server", None) is not None:
            self.server.stop()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        from text_generation.errors import ValidationError as TGIError

        sampling = request.temperature > 0
        details, n = None, 0
        try:
            async for r in self.client.generate_stream(
                    request.prompt, max_new_tokens=request.max_tokens, do_sample=sampling,
                    temperature=request.temperature if sampling else None, seed=request.seed if sampling else None):
                n += 1
                yield TokenEvent(t=now(), n_tokens=1, token_ids=[r.token.id],
                                 text=None if r.token.special else r.token.text)
                details = r.details or details
        except TGIError as e:
            raise BackendError(f"TGI rejected the request: {e}") from None
        except Exception as e:
            if type(e).__module__.startswith("text_generation"):
                raise BackendError(f"TGI: {type(e).__name__}: {e}") from None
            raise
        finish = details.finish_reason.value if details else None
        yield Usage(len(request.prompt_token_ids), details.generated_tokens if details else n, "client_tokenizer",
                    "server_usage" if details else "stream_chunks", finish, exact_length=finish == "length")

    def environment(self) -> dict[str, Any]:
        return {"engine": "tgi", "text_generation_client": importlib.metadata.version("text-generation"),
                "info": getattr(self, "info", None), "launched": self.options.launch is not None}
