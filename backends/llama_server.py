"""llama.cpp's own C++ `llama-server` (kind `llama_cpp`, `options.mode: llama_server`): the llama.cpp users deploy.

Built by `scripts/install-llama-server.sh` from the llama.cpp that the llama-cpp-python sdist vendors (the same
engine, at the same commit, as the in-process mode), or any `llama-server` named by `options.binary` or on PATH. It
serves `--parallel` slots, one per request the load keeps in flight (the workload's concurrency, unless
`options.parallel` says otherwise), decoded together by continuous batching, each slot with `n_ctx` tokens of
context; the harness therefore queues nothing (no max_concurrency). Launched by the shared launcher on 127.0.0.1 at a
port it picks, or attached with `url:`, and spoken to through the shared OpenAI client.

Requests carry the prompt as token ids (llama-server accepts them for /v1/completions), so the input is exactly what
every other backend gets; `ignore_eos` is llama-server's own (EOS and every other end-of-generation token biased
away), so outputs have exactly max_tokens; counts come from its usage. Its sampling defaults are not greedy: every
body sets temperature, top_k/top_p/min_p and repeat_penalty. It reuses the longest cached prefix of a prompt
(cache_prompt) and says how much in `usage.prompt_tokens_details.cached_tokens`: the cell's `prefix_reuse`.

Extra flags (`server_args`) pass through an allowlist (SERVER_ARGS): speed settings only; where it listens, which
model, files it would read or write, are the harness's. A user-level `config.ini` of llama.cpp is not read (its
config folder is pointed into the cell's folder); LLAMA_ARG_* variables that set a flag the harness passes are
overridden by it, and any other one present is recorded in the cell's engine settings.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from backends.base import BackendError, Capabilities, PrefixReuse, Request, TokenEvent, Usage, cpu_affinity
from backends.llamacpp_backend import LlamaCppBase, LlamaCppOptions
from backends.openai_backend import OpenAIClient, OpenAIClientOptions, ServedOverHTTP
from harness.core.files import cache_root
from harness.core.processes import check_server_args

# The llama-cpp-python sdist whose vendored llama.cpp scripts/install-llama-server.sh builds (keep the two equal).
SDIST_VERSION = "0.3.36"
OPEN_LOOP_SLOTS = 4  # llama-server's own default (--parallel auto), for loads with no fixed concurrency

# Flags a scenario may add, with their short forms: threads and their placement, KV cache type and layout, memory
# and GPU placement, the prompt cache and slot handling. Not: --host, --port, the model, anything naming a file or a
# URL (a config, an API key, logs, slot saves, downloads), nor what the harness sets from options (context, batch,
# slots, threads, GPU layers, flash attention).
SERVER_ARGS = (
    "-C", "--cpu-mask", "-Cr", "--cpu-range", "--cpu-strict", "--prio",
    "--poll", "-Cb", "--cpu-mask-batch", "-Crb", "--cpu-range-batch", "--cpu-strict-batch", "--prio-batch",
    "--poll-batch", "--numa", "-ctk", "--cache-type-k", "-ctv", "--cache-type-v", "-dt", "--defrag-thold", "-kvu",
    "--kv-unified", "-no-kvu", "--no-kv-unified", "--swa-full", "-cram", "--cache-ram", "--cache-reuse",
    "--context-shift", "--no-context-shift", "-lm", "--load-mode", "--repack", "-nr", "--no-repack", "-sm",
    "--split-mode", "-ts", "--tensor-split", "-mg", "--main-gpu", "-dev", "--device", "-ot", "--override-tensor",
    "-cmoe", "--cpu-moe", "-ncmoe", "--n-cpu-moe", "--op-offload", "--no-op-offload", "-fit", "--fit", "-to",
    "--timeout", "--threads-http", "-sps", "--slot-prompt-similarity", "--cache-prompt", "--no-cache-prompt",
    "-nocb", "--no-cont-batching", "--no-warmup", "--cache-idle-slots", "--no-cache-idle-slots",
)


class LlamaServerOptions(LlamaCppOptions, OpenAIClientOptions):
    mode: Literal["llama_server"] = "llama_server"
    binary: Path | None = Field(None, description="the llama-server executable; default: the one "
                                                  "scripts/install-llama-server.sh built, else llama-server on PATH")
    parallel: int | None = Field(None, gt=0, description="server slots (--parallel), decoded together by continuous "
                                                         "batching; default: the load's concurrency (sequential: 1; "
                                                         f"open loops and capacity searches: {OPEN_LOOP_SLOTS})")
    server_args: list[str] = Field(default_factory=list, description="extra llama-server flags, from an allowlist of "
                                                                    "speed settings (docs/engines.md)")
    startup_timeout_s: float = Field(120, gt=0)

    @field_validator("server_args")
    @classmethod
    def _allowed(cls, v: list[str]) -> list[str]:
        check_server_args(v, SERVER_ARGS, "llama-server")
        # llama.cpp reads each flag spelled exactly as listed (never abbreviated, never --flag=value): so does this
        # check, where argparse would take `-m` for `-mg`. A value may start with '-' only as a negative number.
        for a in v:
            if a.startswith("-") and a not in SERVER_ARGS and not re.fullmatch(r"-\d+(\.\d+)?", a):
                raise ValueError(f"{a!r:.80} is not a llama-server flag the harness passes on, spelled in full "
                                 f"(allowed: {', '.join(SERVER_ARGS)})")
        return v


def built_binary(tool: str = "llama-server") -> Path:
    """Where scripts/install-llama-server.sh puts `tool` (llama-server, llama-bench)."""
    return cache_root() / "llama.cpp" / SDIST_VERSION / "bin" / tool


def find_binary(given: Path | None = None, tool: str = "llama-server") -> Path | None:
    """The executable to run: `given`, else the one the install script built, else `tool` on PATH; None if none."""
    if given is not None:
        given = given.expanduser()
        return given if given.is_file() and os.access(given, os.X_OK) else None
    built = built_binary(tool)
    if built.is_file() and os.access(built, os.X_OK):
        return built
    found = shutil.which(tool)
    return Path(found) if found else None


def binary_version(path: Path) -> str:
    """`llama-server --version`'s first line ("version: 1 (0c1e570)"), or why it cannot say."""
    try:
        out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unknown ({e})"
    lines = [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("version")]
    return lines[0].removeprefix("version:").strip() if lines else "unknown"


class LlamaServerBackend(ServedOverHTTP, LlamaCppBase):
    Options = LlamaServerOptions
    capabilities = Capabilities(token_ids=False)  # its slots batch the requests: the harness queues none

    binary: Path | None = None

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        self.client = OpenAIClient(self.options, spec.api, spec.served_model, self.options.exact_length,
                                   adapt=self._body)
        width = ctx.concurrency
        self.parallel = self.options.parallel or (width if width is not None else OPEN_LOOP_SLOTS)

    @classmethod
    def missing(cls, spec) -> str | None:
        if spec.url is not None:
            return None
        given = spec.options.get("binary")
        if find_binary(Path(given) if given else None) is not None:
            return None
        if given:
            return f"options.binary: {given} is not an executable file"
        return (f"llama-server is not installed: neither {built_binary()} (scripts/install-llama-server.sh builds it) "
                f"nor llama-server on PATH")

    async def start(self) -> None:
        if self.spec.url is not None:
            await self.client.connect(self.spec.url)
            return
        self.binary = find_binary(self.options.binary)
        if self.binary is None:
            raise BackendError(self.missing(self.spec))
        await self._prepare_gguf()
        await self._launch()

    def argv(self, port: int) -> list[str]:
        o, p = self.options, self.placement
        return [str(self.binary), "--model", str(self.gguf_path), "--alias", self.model.name,
                "--host", "127.0.0.1", "--port", str(port), "--no-webui", "--metrics",
                # n_ctx per slot: llama-server splits its context among the slots.
                "--parallel", str(self.parallel), "--cont-batching", "--ctx-size", str(o.n_ctx * self.parallel),
                "--batch-size", str(o.n_batch), "--ubatch-size", str(o.n_batch),
                "--threads", str(self.n_threads), "--threads-batch", str(self.n_threads),
                "--n-gpu-layers", str(p["n_gpu_layers"]), *([] if p["offload_kqv"] else ["--no-kv-offload"]),
                "--flash-attn", "on" if o.flash_attn else "off", "--seed", str(self.ctx.seed),
                *o.server_args]

    async def _launch(self) -> None:
        from harness.core.processes import launch

        config = self.ctx.dir / "llama-server-config"  # llama.cpp reads $XDG_CONFIG_HOME/llama.cpp/config.ini
        config.mkdir(exist_ok=True)
        # /health answers 503 while the model loads, 200 once it serves.
        self.server = await launch("llama-server", self.argv, self.ctx.dir, "/health", self.options.startup_timeout_s,
                                   env={"XDG_CONFIG_HOME": str(config)})
        await self.client.connect(self.server.url + "/v1")

    async def stop(self) -> None:
        await self.stop_served()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        self._check_fits(request)
        async for item in self.served_stream(request):
            yield item

    def _body(self, body: dict[str, Any], request: Request) -> dict[str, Any]:
        if self.spec.api == "completions" and request.prompt_token_ids:
            body["prompt"] = request.prompt_token_ids  # exactly the tokens every backend gets
        body.pop("min_tokens", None)  # ignore_eos does it, for every end-of-generation token
        # Plain greedy (temperature 0) or plain temperature sampling: the server's defaults are neither.
        return body | {"repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}

    async def prefix_reuse(self) -> PrefixReuse:
        return PrefixReuse(self.client.cached_tokens, "llama-server: usage.prompt_tokens_details.cached_tokens, "
                                                      "summed over the cell's requests (cache_prompt)")

    def environment(self) -> dict[str, Any]:
        o = self.options
        env: dict[str, Any] = {"engine": "llama.cpp llama-server", "mode": o.mode, **self.client.environment(),
                               "sampling": "the request's temperature (greedy at 0), repeat_penalty 1.0, no "
                                           "top-k/top-p/min-p",
                               "token_counts": {"input": "server_usage (the prompt is sent as token ids)",
                                                "output": "server_usage"},
                               "exact_length": "ignore_eos (llama-server biases every end-of-generation token away)"}
        if self.spec.url is None:
            env |= {"binary": str(self.binary), "version": binary_version(self.binary), "parallel": self.parallel,
                    "continuous_batching": "--no-cont-batching" not in o.server_args and "-nocb" not in o.server_args,
                    "gguf": str(self.gguf_path), "gguf_type": "given file" if o.gguf else o.gguf_type,
                    "gguf_file_type": self.layout.file_type, "n_ctx_per_slot": o.n_ctx, "n_batch": o.n_batch,
                    "n_threads": self.n_threads, "flash_attn": o.flash_attn, "server_args": o.server_args,
                    "cpu_affinity": cpu_affinity(self.server.proc.pid),
                    **self.placement}
            if unset := sorted(k for k in os.environ if k.startswith("LLAMA_ARG_")):
                env["llama_arg_variables"] = unset  # they set flags the harness does not pass
        return env
