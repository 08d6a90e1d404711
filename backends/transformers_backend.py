"""HF transformers, in-process: the reference every other engine is compared against.

`model.generate` runs in a thread; a streamer stamps each token the moment the engine hands it over.
One request at a time (HF generate does not batch independent requests), so under concurrent load the wait
for the engine shows up in TTFT, as it would for a user.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from backends.base import Capabilities, EngineThread, Request, TokenEvent, TorchBackend, Usage, now, vram_share


# Share of a VRAM budget kept free of weights for activations and the KV cache when device_map places layers.
ACTIVATION_RESERVE = 0.2


class TransformersOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    device: str = Field("cpu", description="cpu, cuda, cuda:N")
    num_threads: int | None = Field(None, gt=0, description="torch intra-op threads (default: one per CPU the engine "
                                                            "may run on); more than those CPUs are capped to them, "
                                                            "with a note in the cell's engine record")
    attn_implementation: str | None = Field(None, description="e.g. sdpa, eager")


class _Streamer:
    """transformers' streamer protocol: put() gets the prompt once, then each new token."""

    def __init__(self, emit):
        self.emit = emit
        self.seen_prompt = False

    def put(self, value) -> None:
        t = now()
        if not self.seen_prompt:
            self.seen_prompt = True
            return
        ids = value.reshape(-1).tolist()
        self.emit(TokenEvent(t=t, n_tokens=len(ids), token_ids=ids))

    def end(self) -> None:
        pass


class TransformersBackend(TorchBackend):
    kind = "transformers"
    Options = TransformersOptions
    capabilities = Capabilities(max_concurrency=1)
    engine_thread: EngineThread | None = None  # made by start()

    async def start(self) -> None:
        self.engine_thread = EngineThread(self.spec.name)
        await self.engine_thread.call(self._load)
        self._lock = asyncio.Lock()

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        o = self.options
        self.set_threads(o.num_threads)
        kwargs: dict[str, Any] = {"dtype": getattr(torch, o.dtype)}
        if o.attn_implementation:
            kwargs["attn_implementation"] = o.attn_implementation
        self.torch = torch
        budget = self.ctx.vram_budget if o.device.startswith("cuda") else None
        if budget:
            # The budget caps the allocator, and accelerate's device_map places what does not fit in host memory.
            index = torch.device(o.device).index or 0
            torch.cuda.set_per_process_memory_fraction(
                vram_share(budget, torch.cuda.get_device_properties(index).total_memory), index)
            kwargs |= {"device_map": "auto", "max_memory": {index: int(budget * (1 - ACTIVATION_RESERVE)), "cpu": "1TiB"}}
            self.hf = AutoModelForCausalLM.from_pretrained(self.model.path, **kwargs).eval()
        else:
            self.hf = AutoModelForCausalLM.from_pretrained(self.model.path, **kwargs).to(o.device).eval()

    async def stop(self) -> None:
        self.hf = None
        if self.engine_thread is not None:
            self.engine_thread.close()
        if self.options.device.startswith("cuda"):
            self.torch.cuda.empty_cache()

    async def generate(self, request: Request) -> AsyncIterator[TokenEvent | Usage]:
        async with self._lock:
            stream = self.engine_thread.stream(lambda emit: self._generate(request, _Streamer(emit)))
            async for event in stream:
                yield event
        yield Usage(prompt_tokens=len(request.prompt_token_ids), output_tokens=stream.result,
                    prompt_source="engine", output_source="engine")

    def _generate(self, request: Request, streamer: _Streamer) -> int:
        from transformers import GenerationConfig

        torch = self.torch
        ids = torch.tensor([request.prompt_token_ids], device=self.hf.device)
        sampling = request.temperature > 0
        config = GenerationConfig(
            max_new_tokens=request.max_tokens,
            min_new_tokens=request.max_tokens if request.ignore_eos else None,
            do_sample=sampling, temperature=request.temperature if sampling else None,
            top_k=None, top_p=None,
            pad_token_id=self.hf.config.eos_token_id if isinstance(self.hf.config.eos_token_id, int) else 0,
            eos_token_id=self.hf.config.eos_token_id,
        )
        if sampling:
            torch.manual_seed(request.seed)
        with torch.inference_mode():
            out = self.hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config, streamer=streamer)
        return out.shape[1] - ids.shape[1]

    def environment(self) -> dict[str, Any]:
        import torch
        import transformers

        return {"engine": "transformers", "transformers": transformers.__version__, "torch": torch.__version__,
                "dtype": self.options.dtype, "device": self.options.device, **self.cpu_settings()}
