"""llama.cpp as a server, in two modes of the kind `llama_cpp`, each launched by the shared launcher on 127.0.0.1 at a
port it picks (or attached to with `url:`) and spoken to through the shared OpenAI client:

- `LlamaServerBackend` (mode llama_server): llama.cpp's own C++ `llama-server`, the one users deploy. Built by
  `scripts/install-llama-server.sh` from the llama.cpp that the llama-cpp-python sdist vendors (the same engine, at
  the same commit, as the in-process mode), or any `llama-server` named by `options.binary` or on PATH. It serves
  `--parallel` slots, one per request the load keeps in flight (the workload's concurrency, unless `options.parallel`
  says otherwise), decoded together by continuous batching, each slot with `n_ctx` tokens of context; the harness
  therefore queues nothing (no max_concurrency). Requests carry the prompt as token ids (llama-server accepts them
  for /v1/completions), so the input is exactly what every other backend gets; `ignore_eos` is llama-server's own
  (EOS and every other end-of-generation token biased away), so outputs have exactly max_tokens; counts come from
  its usage. It reuses the longest cached prefix of a prompt (cache_prompt) and says how much in
  `usage.prompt_tokens_details.cached_tokens`: the cell's `prefix_reuse`. Extra flags (`server_args`) pass through
  an allowlist (options.SERVER_ARGS): speed settings only. A user-level `config.ini` of llama.cpp is not read (its
  config folder is pointed into the cell's folder); LLAMA_ARG_* variables that set a flag the harness passes are
  overridden by it, and any other one present is recorded in the cell's engine settings.
- `LlamaCppServerBackend` (mode server): llama-cpp-python's `python -m llama_cpp.server`. It takes no `ignore_eos`,
  and `min_tokens` together with `logit_bias` silently drops both (llama-cpp-python 0.3.36 assigns the result of
  `list.extend`), so exact lengths come from a -1e9 logit bias on every end-of-generation token, which is HF's
  `min_new_tokens` semantics. It streams text, not token ids, and merges tokens into one chunk when they end inside
  a UTF-8 character, so chunk counts undercount: when the EOS bias was sent and the server finished with `length`,
  the output length is max_tokens by the server's own stop rule (source `server_finish_reason`), otherwise the chunk
  count (`stream_chunks`). The server's Llama keeps the longest prefix a prompt shares with the previous request, and
  says nothing of it.

Neither server's sampling defaults are greedy: every body sets temperature, repeat_penalty and top_k/top_p/min_p.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from backends.base import BackendError, Capabilities, PrefixReuse, Request, TokenEvent, Usage, cpu_affinity
from backends.llama_cpp.base import LlamaCppBase
from backends.llama_cpp.options import (OPEN_LOOP_SLOTS, SERVER_SECRETS, LlamaCppServedOptions, LlamaCppServerOptions,
                                        LlamaServerOptions)
from backends.openai_backend import EngineServerBackend
from harness.core.files import cache_root
from harness.core.processes import secrets_to_environment

EOS_BIAS = -1e9
# The llama-cpp-python sdist whose vendored llama.cpp scripts/install-llama-server.sh builds (keep the two equal).
SDIST_VERSION = "0.3.36"
# Plain greedy (temperature 0) or plain temperature sampling: neither server's defaults are either.
PLAIN_SAMPLING = {"repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}


class LlamaCppServed(EngineServerBackend, LlamaCppBase):
    """What both server modes share: their options, the GGUF file prepared before a launch, and the context check
    before each request's stream."""
    Options = LlamaCppServedOptions

    async def start(self) -> None:
        if self.spec.url is None:
            await self._prepare_gguf()
        await super().start()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        self._check_fits(request)
        async for item in self.served_stream(request):
            yield self._usage(item, request) if isinstance(item, Usage) else item

    def _usage(self, usage: Usage, request: Request) -> Usage:
        """The usage as recorded: the server's, unless the mode knows the count better."""
        return usage


# ---- llama.cpp's C++ llama-server ---------------------------------------------------------------------------------

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


class LlamaServerBackend(LlamaCppServed):
    Options = LlamaServerOptions
    capabilities = Capabilities(token_ids=False)  # its slots batch the requests: the harness queues none

    binary: Path | None = None

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
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
        self.binary = find_binary(self.options.binary)
        if self.binary is None:
            raise BackendError(self.missing(self.spec))
        config = self.ctx.dir / "llama-server-config"  # llama.cpp reads $XDG_CONFIG_HOME/llama.cpp/config.ini
        config.mkdir(exist_ok=True)
        # /health answers 503 while the model loads, 200 once it serves.
        await self.launch_server("llama-server", self.argv, "/health", {"XDG_CONFIG_HOME": str(config)})

    def _body(self, body: dict[str, Any], request: Request) -> dict[str, Any]:
        if self.spec.api == "completions" and request.prompt_token_ids:
            body["prompt"] = request.prompt_token_ids  # exactly the tokens every backend gets
        body.pop("min_tokens", None)  # ignore_eos does it, for every end-of-generation token
        return body | PLAIN_SAMPLING

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


# ---- llama-cpp-python's llama_cpp.server --------------------------------------------------------------------------

class LlamaCppServerBackend(LlamaCppServed):
    Options = LlamaCppServerOptions
    capabilities = Capabilities(max_concurrency=1, token_ids=False)

    eog_ids: list[int] | None = None

    async def start(self) -> None:
        if self.spec.url is not None and self.options.gguf is not None:  # without it: no EOS bias
            self.eog_ids = await asyncio.to_thread(_eog_ids, self.options.gguf.expanduser())
        await super().start()

    async def _launch(self) -> None:
        self.eog_ids = await asyncio.to_thread(_eog_ids, self.gguf_path)
        o, p = self.options, self.placement
        extra, secrets = secrets_to_environment(o.server_args, SERVER_SECRETS)

        def argv(port: int) -> list[str]:
            return [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf_path),
                    "--model_alias", self.model.name, "--host", "127.0.0.1", "--port", str(port),
                    "--n_ctx", str(o.n_ctx), "--n_batch", str(o.n_batch), "--n_ubatch", str(o.n_batch),
                    "--n_threads", str(self.n_threads), "--n_threads_batch", str(self.n_threads),
                    "--n_gpu_layers", str(p["n_gpu_layers"]), "--offload_kqv", _flag(p["offload_kqv"]),
                    "--flash_attn", _flag(o.flash_attn), "--seed", str(self.ctx.seed),
                    # logits for every prompt token would slow prefill; no request here asks for logprobs.
                    "--logits_all", "false",
                    # by default a waiting request cuts off the one streaming: a concurrent load would truncate outputs
                    "--interrupt_requests", "false",
                    *extra]

        await self.launch_server("llama_server", argv, "/v1/models", {"PYTHONUNBUFFERED": "1", **secrets},
                                 # with an API key the harness's probe is refused: a refusal is an answer
                                 ready=lambda status, body: status == 200 or (status == 401 and bool(secrets)))

    def _body(self, body: dict[str, Any], request: Request) -> dict[str, Any]:
        body.pop("ignore_eos", None)  # not a llama_cpp.server field
        body |= PLAIN_SAMPLING
        if self._forced_length(request):
            body.pop("min_tokens", None)  # beside logit_bias it would disable both (see the module docstring)
            body["logit_bias"] = {str(i): EOS_BIAS for i in self.eog_ids}
        return body

    async def prefix_reuse(self) -> PrefixReuse:
        return PrefixReuse(None, "llama_cpp.server keeps the longest prefix a prompt shares with the previous request "
                                 "in its KV cache (with or without --cache), but does not say how much: its usage has "
                                 "prompt and completion tokens only")

    def _forced_length(self, request: Request) -> bool:
        return self.options.exact_length and request.ignore_eos and bool(self.eog_ids)

    def _usage(self, usage: Usage, request: Request) -> Usage:
        # n_ctx was checked for launched servers only: an attached one may shorten max_tokens without saying so.
        if self._forced_length(request) and usage.finish_reason == "length" and self.server is not None:
            return Usage(usage.prompt_tokens, request.max_tokens, usage.prompt_source, "server_finish_reason",
                         usage.finish_reason, exact_length=True)
        usage.exact_length = self.options.exact_length and request.ignore_eos and usage.output_tokens == request.max_tokens
        return usage

    def environment(self) -> dict[str, Any]:
        env = super().environment() | self.client.environment()
        env["token_counts"] = {
            "input": "client_tokenizer (the server re-tokenizes the prompt text; the harness's count is used)",
            "output": ("server_finish_reason when finish_reason is length under the EOS bias, else stream_chunks"
                       if self.server is not None else "stream_chunks (an attached server's n_ctx is unknown)")}
        env["exact_length"] = (f"logit_bias {EOS_BIAS:g} on end-of-generation tokens {self.eog_ids}" if self.eog_ids
                               else "min_tokens: masks the EOS id only (no GGUF to read the other end-of-generation "
                                    "tokens from); exact per request only when the counted chunks reach max_tokens")
        return env


def _flag(value: bool) -> str:
    return "true" if value else "false"


def _eog_ids(path: Path) -> list[int]:
    """Every token llama.cpp treats as end of generation (EOS, EOT, ... also those it detects by their text)."""
    import llama_cpp

    try:
        llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    except (ValueError, RuntimeError) as e:
        raise BackendError(f"llama.cpp could not read the vocabulary of {path}: {e}") from None
    try:
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        return [i for i in range(llama_cpp.llama_vocab_n_tokens(vocab)) if llama_cpp.llama_vocab_is_eog(vocab, i)]
    finally:
        llm.close()
