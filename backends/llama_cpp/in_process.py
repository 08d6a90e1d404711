"""llama.cpp in the worker (mode in_process, the default): `Llama.generate` runs in a thread on the request's own
token ids (so the input length is exact) and each token is stamped in that thread the moment the sampler returns
it. `generate` never stops by itself, so exact lengths cost nothing: EOS is produced and decoding goes on (vLLM's
`ignore_eos`). One request at a time, each from an empty KV cache (like the transformers backend), unless
`prefix_reuse: true` keeps the cache: Llama.generate then reuses the longest prefix the prompt shares with the
previous request, and the tokens reused are counted (the cell's `prefix_reuse`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from backends.base import BackendError, EngineThread, PrefixReuse, Request, TokenEvent, Usage, now
from backends.llama_cpp.base import LlamaCppBase
from backends.llama_cpp.options import LlamaCppInProcessOptions


class LlamaCppInProcessBackend(LlamaCppBase):
    Options = LlamaCppInProcessOptions

    llm: Any = None
    engine_thread: EngineThread | None = None  # made by start()
    reused_tokens = 0  # over the cell: KV positions a request found kept from the previous one
    _kept: int | None = None  # the current request's, once its prompt's evaluation began

    @classmethod
    def check_spec(cls, spec) -> str | None:
        if spec.url is not None:
            return "url: attaching to a running llama.cpp server needs options.mode: server"
        return super().check_spec(spec)

    async def start(self) -> None:
        await self._prepare_gguf()
        self.engine_thread = EngineThread(self.spec.name)
        await self.engine_thread.call(self._load)
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
        if self.engine_thread is not None:
            self.engine_thread.close()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        self._check_fits(request)
        async with self._lock:
            stream = self.engine_thread.stream(lambda emit: self._decode(request, emit))
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
