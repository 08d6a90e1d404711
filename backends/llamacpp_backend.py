"""llama.cpp through llama-cpp-python, as two backends of the kind `llama_cpp` (`options.mode` picks one):

- `LlamaCppInProcessBackend` (mode in_process, the default): `Llama.generate` runs in a thread on the request's own
  token ids (so the input length is exact) and each token is stamped in that thread the moment the sampler returns
  it. `generate` never stops by itself, so exact lengths cost nothing: EOS is produced and decoding goes on (vLLM's
  `ignore_eos`). One request at a time, each from an empty KV cache (like the transformers backend), unless
  `prefix_reuse: true` keeps the cache: Llama.generate then reuses the longest prefix the prompt shares with the
  previous request, and the tokens reused are counted (the cell's `prefix_reuse`).
- `LlamaCppServerBackend` (mode server): `python -m llama_cpp.server` started by the shared launcher, or a running one
  attached with `url:`, spoken to through the shared OpenAI client. Its sampling defaults are not greedy, so every
  body sets temperature, repeat_penalty, top_k/top_p/min_p. It takes no `ignore_eos`, and `min_tokens` together with
  `logit_bias` silently drops both (llama-cpp-python 0.3.36 assigns the result of `list.extend`), so exact lengths
  come from a -1e9 logit bias on every end-of-generation token, which is HF's `min_new_tokens` semantics. It streams
  text, not token ids, and merges tokens into one chunk when they end inside a UTF-8 character, so chunk counts
  undercount: when the EOS bias was sent and the server finished with `length`, the output length is max_tokens by
  the server's own stop rule (source `server_finish_reason`), otherwise the chunk count (`stream_chunks`). The
  server's Llama keeps the longest prefix a prompt shares with the previous request, and says nothing of it.

Both take the model as GGUF: the model folder is converted on first use (backends/gguf.py, cached), unless `gguf:`
names a file. A VRAM budget (cell `resources.vram_budget`) becomes `n_gpu_layers` and `offload_kqv` by
`plan_offload`, a pure function.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from backends.base import (Backend, BackendError, Capabilities, EngineThread, PrefixReuse, Request, TokenEvent,
                           Usage, cpu_affinity, now)
from backends.gguf import GGUF_TYPES, GGUFLayout
from backends.openai_backend import OpenAIClient, OpenAIClientOptions, ServedOverHTTP
from harness.core.processes import check_server_args, secrets_to_environment

EOS_BIAS = -1e9
KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16
GPU_RESERVE_BYTES = 512 * 2**20  # CUDA context and llama.cpp's fixed buffers (an estimate)
# llama_cpp.server's flags (its Settings' fields) a scenario may add, in full (check_server_args). Left out: where it
# listens (host, port, ssl_keyfile, ssl_certfile, and config_file, which can set them) and what the harness sets
# from the scenario (model, model_alias).
SERVER_FLAGS = tuple(f"--{name}" for name in (
    "n_gpu_layers", "split_mode", "main_gpu", "tensor_split", "vocab_only", "use_mmap", "use_mlock", "kv_overrides",
    "rpc_servers", "seed", "n_ctx", "n_batch", "n_ubatch", "n_threads", "n_threads_batch", "rope_scaling_type",
    "rope_freq_base", "rope_freq_scale", "yarn_ext_factor", "yarn_attn_factor", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_orig_ctx", "mul_mat_q", "logits_all", "embedding", "offload_kqv", "flash_attn", "last_n_tokens_size",
    "lora_base", "lora_path", "numa", "chat_format", "chat_template_kwargs", "clip_model_path", "cache",
    "cache_type", "cache_size", "hf_tokenizer_config_path", "hf_pretrained_model_name_or_path", "hf_model_repo_id",
    "draft_model", "draft_model_num_pred_tokens", "type_k", "type_v", "verbose", "api_key", "interrupt_requests",
    "disable_ping_events", "root_path"))
# Secret flags go to the server as the variables its settings (pydantic-settings) also read, never on its argv.
SERVER_SECRETS = {"--api_key": "API_KEY"}


class LlamaCppOptions(BaseModel):
    """What both variants take."""
    model_config = ConfigDict(extra="forbid")
    exact_length: bool = Field(True, description="outputs of exactly max_tokens: decoding goes on past EOS in "
                                                 "process; the server gets EOS biased away")
    gguf_type: Literal[GGUF_TYPES] = Field("f32", description="f32/f16/bf16/q8_0 written by the converter; k-quants "
                                                             "and others by llama.cpp's quantizer")
    gguf: Path | None = Field(None, description="use this GGUF file instead of converting the model folder")
    n_ctx: int = Field(4096, gt=0, description="context size: must hold prompt + output tokens")
    n_batch: int = Field(512, gt=0, description="prompt tokens per llama_decode call")
    n_threads: int | None = Field(None, gt=0, description="decode and batch threads; default: physical cores")
    flash_attn: bool = False
    n_gpu_layers: int | None = Field(None, ge=-1, description="override; default: from the VRAM budget, else all (-1)")
    offload_kqv: bool | None = Field(None, description="override; default: from the VRAM budget, else true")


class LlamaCppInProcessOptions(LlamaCppOptions):
    mode: Literal["in_process"] = "in_process"
    prefix_reuse: bool = Field(False, description="keep the KV cache between requests: llama.cpp then reuses the "
                                                  "longest prefix a prompt shares with the previous request (its "
                                                  "prompt and output); false: each request starts from an empty "
                                                  "KV cache")


class LlamaCppServerOptions(LlamaCppOptions, OpenAIClientOptions):
    mode: Literal["server"] = "server"
    server_args: list[str] = Field(default_factory=list, description="extra llama_cpp.server flags, spelled in full "
                                                                    "(not --host, --port, --ssl_*, --config_file: "
                                                                    "the harness serves on 127.0.0.1 at a port it "
                                                                    "picks); --api_key reaches the server through its "
                                                                    "environment, not its command line")
    startup_timeout_s: float = Field(120, gt=0)

    _allowed = field_validator("server_args")(lambda v: check_server_args(v, SERVER_FLAGS, "llama_cpp.server"))


# ---- placing layers on a GPU under a budget ------------------------------------------------------------------------

@dataclass
class OffloadPlan:
    n_gpu_layers: int
    offload_kqv: bool
    gpu_bytes: int  # estimated VRAM use of the plan, reserve included


def plan_offload(budget: int, layout: GGUFLayout, n_ctx: int, n_batch: int) -> OffloadPlan:
    """The placement that fits in `budget` bytes of VRAM and leaves the CPU the fewest bytes to read per token.

    reserve = GPU_RESERVE_BYTES + n_batch × n_vocab × 4   (context, fixed buffers, one batch of f32 logits)
    a layer costs its tensor bytes, plus kv = n_ctx × (n_embd_k_gqa + n_embd_v_gqa) × 2 bytes of f16 KV when
    offload_kqv (otherwise every layer's KV stays in host memory); llama.cpp offloads the last layers first, and
    n_gpu_layers = n_layers + 1 also places the output head. Batch-1 decode is memory-bound and host memory is the
    slow side, so of the most layers that fit with and without KV on the GPU, the plan whose CPU reads fewer bytes
    per token at full context wins (weights of CPU layers and the head if left there, plus the KV the CPU attends
    over); a tie keeps KV with its layers.
    """
    kv_per_layer = n_ctx * (layout.n_embd_k_gqa + layout.n_embd_v_gqa) * KV_BYTES_PER_ELEMENT
    reserve = GPU_RESERVE_BYTES + n_batch * layout.n_vocab * 4
    room = budget - reserve
    n_layers = layout.n_layers

    def fit(kv: int) -> tuple[int, int]:
        used = n = 0
        for size in reversed(layout.layer_bytes):
            if used + size + kv > room:
                return n, used
            used, n = used + size + kv, n + 1
        if used + layout.output_bytes <= room:
            return n + 1, used + layout.output_bytes
        return n, used

    def cpu_reads(n_gpu: int, kv_on_gpu: bool) -> int:
        n_cpu = n_layers - min(n_gpu, n_layers)
        head = layout.output_bytes if n_gpu <= n_layers else 0
        return sum(layout.layer_bytes[:n_cpu]) + head + kv_per_layer * (n_cpu if kv_on_gpu else n_layers)

    (n_kv, used_kv), (n_host_kv, used_host_kv) = fit(kv_per_layer), fit(0)
    if cpu_reads(n_host_kv, False) < cpu_reads(n_kv, True):
        return OffloadPlan(n_host_kv, False, used_host_kv + reserve)
    return OffloadPlan(n_kv, True, used_kv + reserve)


# ---- what both variants share -----------------------------------------------------------------------------------------

class LlamaCppBase(Backend):
    """The GGUF file, its layout and the layer placement, the context check and the engine's part of environment()."""
    kind = "llama_cpp"
    Options = LlamaCppOptions
    capabilities = Capabilities(max_concurrency=1)  # in process: one Llama context; the server serializes too

    gguf_path: Path | None = None
    layout: GGUFLayout | None = None
    placement: dict[str, Any] | None = None

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        self.n_threads = self.options.n_threads or ctx.engine_threads() or _physical_cores()

    @classmethod
    def check_spec(cls, spec) -> str | None:
        gguf = spec.options.get("gguf")
        if gguf is not None and not Path(gguf).expanduser().is_file():
            return f"options.gguf: expected a GGUF file, {gguf} does not exist"
        return None

    async def prepare(self) -> None:
        if self.spec.url is None:
            await self._prepare_gguf()

    async def _prepare_gguf(self) -> None:
        if self.placement is not None:
            return  # prepare() did it
        self.gguf_path = await asyncio.to_thread(self._gguf)
        self.layout = await asyncio.to_thread(_read_layout, self.gguf_path)
        self.placement = self._placement()

    def _gguf(self) -> Path:
        from backends.gguf import GGUFError, cached_gguf

        if self.options.gguf is not None:
            return self.options.gguf.expanduser()
        try:
            return cached_gguf(self.model.path, self.options.gguf_type)
        except GGUFError as e:
            raise BackendError(f"cannot convert {self.model.path} to GGUF: {e}") from None

    def _placement(self) -> dict[str, Any]:
        o, budget = self.options, self.ctx.vram_budget
        plan = plan_offload(budget, self.layout, o.n_ctx, o.n_batch) if budget is not None else None
        return {
            "n_gpu_layers": o.n_gpu_layers if o.n_gpu_layers is not None else (plan.n_gpu_layers if plan else -1),
            "offload_kqv": o.offload_kqv if o.offload_kqv is not None else (plan.offload_kqv if plan else True),
            "from": "options" if o.n_gpu_layers is not None else ("vram_budget" if plan else "default (all layers)"),
            "planned_gpu_bytes": plan.gpu_bytes if plan else None,
        }

    def _check_fits(self, request: Request) -> None:
        if self.spec.url is None and len(request.prompt_token_ids) + request.max_tokens > self.options.n_ctx:
            raise BackendError(f"prompt ({len(request.prompt_token_ids)}) + output ({request.max_tokens}) tokens "
                               f"exceed options.n_ctx = {self.options.n_ctx}")

    def environment(self) -> dict[str, Any]:
        import llama_cpp

        o = self.options
        env: dict[str, Any] = {
            "engine": "llama.cpp", "llama_cpp_python": llama_cpp.__version__, "mode": o.mode,
            "gpu_offload_supported": bool(llama_cpp.llama_supports_gpu_offload()),
            "sampling": "the request's temperature (greedy at 0), repeat_penalty 1.0, no top-k/top-p/min-p",
        }
        if self.spec.url is None:
            env |= {"gguf": str(self.gguf_path), "gguf_type": "given file" if o.gguf else o.gguf_type,
                    "gguf_file_type": self.layout.file_type, "n_ctx": o.n_ctx, "n_batch": o.n_batch,
                    "n_threads": self.n_threads, "flash_attn": o.flash_attn, "cpu_affinity": cpu_affinity(),
                    **self.placement}
        return env


# ---- in process ---------------------------------------------------------------------------------------------------

class LlamaCppInProcessBackend(LlamaCppBase):
    Options = LlamaCppInProcessOptions

    llm: Any = None
    reused_tokens = 0  # over the cell: KV positions a request found kept from the previous one
    _kept: int | None = None  # the current request's, once its prompt's evaluation began

    @classmethod
    def check_spec(cls, spec) -> str | None:
        if spec.url is not None:
            return "url: attaching to a running llama.cpp server needs options.mode: server"
        return super().check_spec(spec)

    async def start(self) -> None:
        await self._prepare_gguf()
        await asyncio.to_thread(self._load)
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        import llama_cpp

        o = self.options
        try:
            self.llm = llama_cpp.Llama(
                model_path=str(self.gguf_path), n_ctx=o.n_ctx, n_batch=o.n_batch, n_ubatch=o.n_batch,
                n_threads=self.n_threads, n_threads_batch=self.n_threads, flash_attn=o.flash_attn,
                n_gpu_layers=self.placement["n_gpu_layers"], offload_kqv=self.placement["offload_kqv"],
                seed=self.ctx.seed, verbose=False)
        except (ValueError, RuntimeError) as e:
            raise BackendError(f"llama.cpp could not load {self.gguf_path}: {e}") from None
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self._is_eog = lambda token: llama_cpp.llama_vocab_is_eog(vocab, token)
        evaluate = self.llm.eval

        def eval_counting(tokens) -> None:
            # Llama.generate truncates the KV cache to the longest prefix the prompt shares with what it holds, then
            # evaluates the rest: the cache's length at a request's first evaluation is the prefix it reused.
            if self._kept is None:
                self._kept = self.llm.n_tokens
            evaluate(tokens)

        self.llm.eval = eval_counting

    async def stop(self) -> None:
        if self.llm is not None:
            self.llm.close()
            self.llm = None

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        self._check_fits(request)
        async with self._lock:
            stream = EngineThread(lambda emit: self._decode(request, emit))
            async for event in stream:
                yield event
        n_out, exact = stream.result, self.options.exact_length and request.ignore_eos
        yield Usage(len(request.prompt_token_ids), n_out, "engine", "engine",
                    "length" if n_out == request.max_tokens else "stop", exact_length=exact)

    def _decode(self, request: Request, emit) -> int:
        """Runs in the engine thread: prefill, then one token per step, each stamped as the sampler returns it."""
        sampling = request.temperature > 0
        if sampling:
            self.llm.set_seed(request.seed)
        stop_at_eog = not (self.options.exact_length and request.ignore_eos)
        if not self.options.prefix_reuse:
            self.llm.reset()  # an empty KV cache: nothing of the previous request is reused
        self._kept = None
        n = 0
        for token in self.llm.generate(request.prompt_token_ids, temp=request.temperature, repeat_penalty=1.0,
                                       top_k=0 if sampling else 1, top_p=1.0, min_p=0.0):
            t = now()
            if stop_at_eog and self._is_eog(token):
                break
            emit(TokenEvent(t=t, n_tokens=1, token_ids=[token]))
            n += 1
            if n == request.max_tokens:
                break
        self.reused_tokens += self._kept  # set: the prompt was evaluated before the first token came
        return n

    async def prefix_reuse(self) -> PrefixReuse:
        return PrefixReuse(self.reused_tokens, "llama.cpp: KV cache positions kept from the previous request when "
                                               "each prompt's evaluation began" +
                           ("" if self.options.prefix_reuse else "; prefix_reuse: false resets the cache first"))

    def environment(self) -> dict[str, Any]:
        return super().environment() | {
            "token_counts": {"input": "engine (the request's token ids are fed directly)",
                             "output": "engine (tokens returned by Llama.generate)"},
            "exact_length": "Llama.generate does not stop at EOS; decoding continues (ignore_eos semantics)"}


# ---- as a server ----------------------------------------------------------------------------------------------------

class LlamaCppServerBackend(ServedOverHTTP, LlamaCppBase):
    Options = LlamaCppServerOptions
    capabilities = Capabilities(max_concurrency=1, token_ids=False)

    server: Any = None
    eog_ids: list[int] | None = None

    def __init__(self, spec, model, ctx):
        super().__init__(spec, model, ctx)
        self.client = OpenAIClient(self.options, spec.api, spec.served_model, self.options.exact_length,
                                   adapt=self._body)

    async def start(self) -> None:
        if self.spec.url is not None:
            if self.options.gguf is not None:
                self.eog_ids = await asyncio.to_thread(_eog_ids, self.options.gguf.expanduser())
            await self.client.connect(self.spec.url)
        else:
            await self._prepare_gguf()
            self.eog_ids = await asyncio.to_thread(_eog_ids, self.gguf_path)
            await self._launch()

    async def _launch(self) -> None:
        from harness.core.processes import launch

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

        self.server = await launch("llama_server", argv, self.ctx.dir, "/v1/models", o.startup_timeout_s,
                                   env={"PYTHONUNBUFFERED": "1", **secrets},
                                   # with an API key the harness's probe is refused: a refusal is an answer
                                   ready=lambda status, body: status == 200 or (status == 401 and bool(secrets)))
        await self.client.connect(self.server.url + "/v1")

    async def stop(self) -> None:
        await self.stop_served()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        self._check_fits(request)
        async for item in self.served_stream(request):
            yield self._usage(item, request) if isinstance(item, Usage) else item

    def _body(self, body: dict[str, Any], request: Request) -> dict[str, Any]:
        body.pop("ignore_eos", None)  # not a llama_cpp.server field
        # Plain greedy (temperature 0) or plain temperature sampling: the server's defaults are neither.
        body |= {"repeat_penalty": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
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


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _read_layout(path: Path) -> GGUFLayout:
    from backends.gguf import read_layout

    try:
        return read_layout(path)
    except Exception as e:  # a truncated or foreign file: the gguf reader raises anything from ValueError to KeyError
        raise BackendError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None


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
