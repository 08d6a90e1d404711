"""Decides where weights and KV live, and the chunk sizes, from a memory budget; explains the decision.

On CUDA the budget is device memory. On the CPU device it is the memory for resident weights, device-tier KV
and working buffers; "host" there is the same RAM, so auto placement streams from disk instead (memory-mapped:
the page cache the kernel may reclaim, not the budget).

Weights and KV are stored in the checkpoint's dtype (or the one asked for); compute runs in the fastest dtype that
is exact enough on the device: the stored one where the hardware has it, else float32.
"""
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .config import EngineError, ModelConfig
from .model import NARROW_ROWS
from .placement import LOGIT_ROWS
from .units import fmt_bytes, parse_size
from .weights import LayerLayout

MODES = ("auto", "gpu", "cpu", "disk")
TIER_OF_MODE = {"gpu": "device", "cpu": "host", "disk": "disk"}


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype  # weights as stored and streamed
    compute_dtype: torch.dtype
    compute_reason: str
    kv_dtype: torch.dtype
    budget: int | None
    context: int
    batch: int
    block_size: int
    prefill_chunk: int
    step_tokens: int  # rows of one scheduler step (one pass over the weights, in chunks of prefill_chunk)
    kv_chunk_blocks: int
    mlp_rows: int
    n_slots: int
    slot_bytes: int  # one ring slot: a layer in the compute dtype
    layer_tiers: list[str]
    embed_tier: str
    kv_blocks: dict[str, int]
    layer_bytes: int
    globals_bytes: int  # on the device: lm_head, norm, embedding table if resident
    working_bytes: int
    block_bytes: int  # one block in all layers
    disk_bytes: int  # to be written under the offload dir
    offload_dir: Path | None

    def count(self, tier: str) -> int:
        return self.layer_tiers.count(tier)

    @property
    def device_bytes(self) -> int:
        return (self.globals_bytes + self.count("device") * self.layer_bytes + self.n_slots * self.slot_bytes
                + self.kv_blocks.get("device", 0) * self.block_bytes + self.working_bytes)

    def explain(self) -> str:
        budget = fmt_bytes(self.budget) if self.budget else "unlimited"
        streamed = len(self.layer_tiers) - self.count("device")
        blocks = ", ".join(f"{n} on {t}" for t, n in self.kv_blocks.items() if n)
        kv_offloaded = sum(n for t, n in self.kv_blocks.items() if t != "device") * self.block_bytes
        stored, compute, kv = (str(d).removeprefix("torch.") for d in (self.dtype, self.compute_dtype, self.kv_dtype))
        lines = [
            f"device {self.device}, weights stored in {stored}, budget {budget}, "
            f"context {self.context} tokens x batch {self.batch}",
            f"compute in {compute}: {self.compute_reason}",
            f"KV cache in {kv}" + (" (the compute dtype: attention reads it in place)" if kv == compute else
                                   " (upcast as each chunk is read)"),
            f"weights: {self.count('device')} of {len(self.layer_tiers)} layers resident, "
            f"{self.count('host')} streamed from host memory, {self.count('disk')} from disk "
            f"({fmt_bytes(self.layer_bytes)} per layer, {self.n_slots} "
            f"{'upcast buffer' if self.device.type == 'cpu' else 'ring slot'}(s) of {fmt_bytes(self.slot_bytes)})",
            f"lm_head and final norm on the device, embed_tokens on {self.embed_tier}",
            f"KV cache: {blocks} blocks of {self.block_size} tokens ({fmt_bytes(self.block_bytes)} per block, all layers)",
            f"chunks: prefill {self.prefill_chunk} tokens, attention KV {self.kv_chunk_blocks * self.block_size} "
            f"tokens, MLP {self.mlp_rows} rows; working buffers {fmt_bytes(self.working_bytes)}",
            f"scheduler: up to {self.step_tokens} tokens per pass over the weights "
            + ("(whole prompts: each pass streams every layer once)" if self.count("device") < len(self.layer_tiers)
               else "(one prefill chunk: decodes wait at most one chunk)"),
            f"device memory planned: {fmt_bytes(self.device_bytes)} of {budget}",
            f"streamed per decoded token at full context: weights {fmt_bytes(streamed * self.layer_bytes)}, "
            f"KV {fmt_bytes(kv_offloaded)}",
        ]
        if self.disk_bytes:
            where = self.offload_dir or "a new temporary folder"
            lines.append(f"offload dir {where}: {fmt_bytes(self.disk_bytes)} written")
        return "\n".join(lines)


def compute_dtype_for(device: torch.device, dtype: torch.dtype) -> tuple[torch.dtype, str]:
    """The fastest dtype that computes exactly enough on the device, and why."""
    name = str(dtype).removeprefix("torch.")
    if dtype == torch.float32:
        return dtype, "the stored dtype"
    if device.type != "cpu":
        return dtype, f"the stored dtype ({device.type} multiplies {name} natively)"
    native = (torch.cpu._is_avx512_bf16_supported() if dtype == torch.bfloat16
              else torch.cpu._is_amx_fp16_supported())
    if native:
        return dtype, f"the stored dtype (this CPU has {name} instructions)"
    return torch.float32, (f"this CPU has no {name} instructions (its {name} matmuls are emulated, several times "
                           f"slower than float32), so each layer is upcast per use into a reused float32 buffer; "
                           f"passes of fewer than {NARROW_ROWS} rows (decode) multiply by the {name} weights as stored, "
                           f"memory-bound and accumulating in float32")


def working_bytes(cfg: ModelConfig, compute: torch.dtype, rows: int, chunk: int, kv_tokens: int, mlp_rows: int,
                  batch: int, device: torch.device, upcast: bool) -> int:
    """Activation memory of one forward pass: hidden states and rope tables of every row; one chunk's projections,
    attention output and merge (the fused kernels keep no score matrix); the buffer a KV chunk is read into, on
    CUDA its heads expanded for the kernel, and a sliding window's mask; one MLP row chunk; the logits, and the
    slice of lm_head upcast at a time."""
    e, h, d, heads = compute.itemsize, cfg.hidden_size, cfg.head_dim, cfg.num_heads
    whole = rows * (h * e + 2 * d * e + 16)
    qkv = chunk * (heads + 2 * cfg.num_kv_heads) * d * e + 4 * chunk * h * e
    attention = 4 * chunk * heads * (d + 1) * 4 + 2 * kv_tokens * cfg.num_kv_heads * d * e
    if device.type == "cuda":
        attention += 2 * kv_tokens * heads * d * e
    if cfg.sliding_window:
        attention += chunk * kv_tokens * e
    head = min(LOGIT_ROWS, cfg.vocab_size) * h * e if upcast else 0
    return whole + qkv + attention + 3 * mlp_rows * cfg.intermediate_size * e + batch * cfg.vocab_size * 4 + head


def make_plan(cfg: ModelConfig, *, device="cpu", dtype: torch.dtype | None = None, vram_budget=None,
              context: int = 4096, batch: int = 1, weights: str = "auto", kv: str = "auto", offload_dir=None,
              block_size: int | None = None, prefill_chunk: int | None = None, pack_weights: bool = False,
              compute_dtype: torch.dtype | None = None, kv_dtype: torch.dtype | None = None) -> Plan:
    """Place weights and KV within the budget. Priority for device memory under "auto": decoder layers (each
    resident layer is one less to stream per token), then KV blocks, then the embedding table (a lookup reads
    only a few rows from disk). Raises EngineError when even the minimum does not fit."""
    device, dtype, budget = torch.device(device), dtype or cfg.dtype, _budget(vram_budget)
    compute, why = (compute_dtype, "asked for") if compute_dtype else compute_dtype_for(device, dtype)
    kv_dtype = kv_dtype or compute
    if device.type == "cuda" and compute != dtype:
        raise EngineError(f"on CUDA compute runs in the stored dtype ({dtype}), not {compute}: pass dtype instead")
    for name, mode in (("weights", weights), ("kv", kv)):
        if mode not in MODES:
            raise EngineError(f"{name}='{mode}': expected one of {', '.join(MODES)}")
    # Streamed data lives in pinned host memory on CUDA when RAM allows; on CPU host memory *is* the budget.
    slow = "host" if device.type == "cuda" else "disk"
    ram = psutil.virtual_memory().available * 0.8
    limit = math.inf if budget is None else budget

    block_size = block_size or 256
    L, layer, slot = cfg.num_layers, LayerLayout.of(cfg, dtype).nbytes, LayerLayout.of(cfg, compute).nbytes
    # A CPU reads every tier in place (host memory, mapped files) and upcasts through one buffer; on CUDA a layer
    # needs a ring slot unless it is resident in the compute dtype.
    upcast = compute != dtype

    def ring(resident: int) -> int:
        if device.type == "cpu":
            return int(upcast)
        return min(2, L if upcast else L - resident)

    block_bytes = L * block_size * cfg.kv_bytes_per_token(kv_dtype)
    need_blocks = batch * -(-context // block_size)
    lm_head = (cfg.vocab_size + 1) * cfg.hidden_size * dtype.itemsize  # + the final norm
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * dtype.itemsize
    kv_forced = need_blocks * block_bytes if kv == "gpu" else 0
    forced = L if weights == "gpu" else 0  # resident layers the mode asks for
    weights_min = forced * layer + (embed if forced else 0) + min(1, ring(forced)) * slot

    # Shrink the chunks until the minimum configuration fits.
    chunk, kv_chunk = min(prefill_chunk or 512, batch * context), max(1, min(4096, context) // block_size)
    while True:
        mlp_rows = min(chunk, 512)
        work = working_bytes(cfg, compute, batch * context, chunk, kv_chunk * block_size, mlp_rows, batch, device,
                             upcast)
        minimum = lm_head + work + weights_min + kv_forced
        if minimum <= limit:
            break
        if kv_chunk == 1 and (prefill_chunk or chunk <= 16):
            raise EngineError(
                f"vram_budget {fmt_bytes(budget)} is too small: needs at least {fmt_bytes(minimum)} (lm_head and norm "
                f"{fmt_bytes(lm_head)}, {'all layers' if weights == 'gpu' else 'one layer'} {fmt_bytes(weights_min)}, "
                f"working buffers {fmt_bytes(work)} with prefill chunk {chunk}, forced KV {fmt_bytes(kv_forced)})")
        chunk, kv_chunk = chunk if prefill_chunk else max(16, chunk // 2), max(1, kv_chunk // 2)

    free = limit - lm_head - work - kv_forced
    if weights == "auto" and L * layer + ring(L) * slot <= free:
        resident, tiers = L, ["device"] * L
    elif weights == "auto":
        # Two slots let layer i+1 load while layer i computes: worth more than one more resident layer.
        reserve = ring(0) * slot if free >= ring(0) * slot else slot
        resident = min(L - 1, int((free - reserve) // layer))
        tiers = ["device"] * resident + [slow if (L - resident) * layer < ram else "disk"] * (L - resident)
    else:
        tiers = [TIER_OF_MODE[weights]] * L
        resident = L if weights == "gpu" else 0
    slots = ring(resident)
    if slots == 2 and free - resident * layer < 2 * slot:
        slots = 1
    free -= resident * layer + slots * slot

    kv_wanted = need_blocks * block_bytes if kv == "auto" else 0
    embed_tier = "device" if cfg.tie_word_embeddings or embed + kv_wanted <= free else "disk"
    if embed_tier == "device":
        free -= embed
    if kv == "auto":
        on_device = need_blocks if free == math.inf else min(need_blocks, max(0, int(free // block_bytes)))
        rest = need_blocks - on_device
        host_ram = ram - tiers.count("host") * layer
        kv_blocks = {"device": on_device, slow if rest * block_bytes < host_ram else "disk": rest}
    else:
        kv_blocks = {TIER_OF_MODE[kv]: need_blocks}

    disk_bytes = kv_blocks.get("disk", 0) * block_bytes + (tiers.count("disk") * layer if pack_weights else 0)
    if disk_bytes:
        where = Path(offload_dir or tempfile.gettempdir()).absolute()
        probe = where
        while not probe.exists():
            probe = probe.parent
        available = shutil.disk_usage(probe).free
        if available < disk_bytes * 1.05:
            raise EngineError(f"offload dir {where}: needs {fmt_bytes(disk_bytes)} on disk, "
                              f"only {fmt_bytes(available)} free on its filesystem")
    return Plan(device=device, dtype=dtype, compute_dtype=compute, compute_reason=why, kv_dtype=kv_dtype,
                budget=budget, context=context, batch=batch, block_size=block_size, prefill_chunk=chunk,
                step_tokens=chunk if resident == L else batch * context, kv_chunk_blocks=kv_chunk, mlp_rows=mlp_rows,
                n_slots=slots, slot_bytes=slot,
                layer_tiers=tiers, embed_tier=embed_tier, kv_blocks=kv_blocks, layer_bytes=layer,
                globals_bytes=lm_head + (embed if embed_tier == "device" else 0),
                working_bytes=work, block_bytes=block_bytes, disk_bytes=disk_bytes,
                offload_dir=Path(offload_dir) if offload_dir else None)


def _budget(size) -> int | None:
    try:
        return parse_size(size)
    except ValueError as e:
        raise EngineError(f"vram_budget: {e}") from None
