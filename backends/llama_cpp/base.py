"""What the three llama.cpp modes share: the model as a GGUF file (the model folder converted on first use, cached,
unless `gguf:` names a file), its layout, the layers' placement (options, else the VRAM budget by `plan_offload`,
else all on the GPU), the context check and the engine's part of environment()."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from backends.base import Backend, BackendError, Capabilities, Request, cpu_affinity
from backends.llama_cpp.gguf import GGUFError, GGUFLayout, cached_gguf, read_layout
from backends.llama_cpp.offload import plan_offload
from backends.llama_cpp.options import LlamaCppOptions


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


def _physical_cores() -> int:
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _read_layout(path: Path) -> GGUFLayout:
    try:
        return read_layout(path)
    except Exception as e:  # a truncated or foreign file: the gguf reader raises anything from ValueError to KeyError
        raise BackendError(f"{path} is not a readable GGUF file: {type(e).__name__}: {e}") from None
