"""Decides where weights and KV live, and the chunk sizes, from a memory budget; explains the decision.

On CUDA the budget is device memory. On the CPU device it is the memory for resident weights, device-tier KV
and working buffers; "host" there is the same RAM, so auto placement streams from disk instead.
"""
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from .config import EngineError, ModelConfig
from .units import fmt_bytes, parse_size
from .weights import LayerLayout

MODES = ("auto", "gpu", "cpu", "disk")
TIER_OF_MODE = {"gpu": "device", "cpu": "host", "disk": "disk"}


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    budget: int | None
    context: int
    batch: int
    block_size: int
    prefill_chunk: int
    kv_chunk_blocks: int
    mlp_rows: int
    n_slots: int
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
        return (self.globals_bytes + self.count("device") * self.layer_bytes + self.n_slots * self.layer_bytes
                + self.kv_blocks.get("device", 0) * self.block_bytes + self.working_bytes)

    def explain(self) -> str:
        budget = fmt_bytes(self.budget) if self.budget else "unlimited"
        streamed = len(self.layer_tiers) - self.count("device")
        kv = ", ".join(f"{n} on {t}" for t, n in self.kv_blocks.items() if n)
        kv_offloaded = sum(n for t, n in self.kv_blocks.items() if t != "device") * self.block_bytes
        lines = [
            f"device {self.device}, {str(self.dtype).removeprefix('torch.')}, budget {budget}, "
            f"context {self.context} tokens x batch {self.batch}",
            f"weights: {self.count('device')} of {len(self.layer_tiers)} layers resident, "
            f"{self.count('host')} streamed from host memory, {self.count('disk')} from disk "
            f"({fmt_bytes(self.layer_bytes)} per layer, {self.n_slots} ring slot(s))",
            f"lm_head and final norm on the device, embed_tokens on {self.embed_tier}",
            f"KV cache: {kv} blocks of {self.block_size} tokens ({fmt_bytes(self.block_bytes)} per block, all layers)",
            f"chunks: prefill {self.prefill_chunk} tokens, attention KV {self.kv_chunk_blocks * self.block_size} "
            f"tokens, MLP {self.mlp_rows} rows; working buffers {fmt_bytes(self.working_bytes)}",
            f"device memory planned: {fmt_bytes(self.device_bytes)} of {budget}",
            f"streamed per decoded token at full context: weights {fmt_bytes(streamed * self.layer_bytes)}, "
            f"KV {fmt_bytes(kv_offloaded)}",
        ]
        if self.disk_bytes:
            where = self.offload_dir or "a new temporary folder"
            lines.append(f"offload dir {where}: {fmt_bytes(self.disk_bytes)} written")
        return "\n".join(lines)


def working_bytes(cfg: ModelConfig, dtype: torch.dtype, rows: int, chunk: int, kv_tokens: int,
                  mlp_rows: int, batch: int) -> int:
    """Activation memory of one forward pass: hidden states and rope tables of every row, one chunk's
    projections and attention scores, one MLP row chunk, the logits."""
    e, h, d = dtype.itemsize, cfg.hidden_size, cfg.head_dim
    whole = rows * (h * e + 2 * d * e + 16)
    qkv = chunk * (cfg.num_heads + 2 * cfg.num_kv_heads) * d * e + 4 * chunk * h * e
    scores = 3 * cfg.num_heads * chunk * max(chunk, kv_tokens) * 4 + 3 * chunk * cfg.num_heads * d * 4
    kv_read = 2 * kv_tokens * 2 * cfg.num_kv_heads * d * e
    return whole + qkv + scores + kv_read + 3 * mlp_rows * cfg.intermediate_size * e + batch * cfg.vocab_size * 4


def make_plan(cfg: ModelConfig, *, device="cpu", dtype: torch.dtype | None = None, vram_budget=None,
              context: int = 4096, batch: int = 1, weights: str = "auto", kv: str = "auto", offload_dir=None,
              block_size: int | None = None, prefill_chunk: int | None = None, pack_weights: bool = False) -> Plan:
    """Place weights and KV within the budget. Priority for device memory under "auto": decoder layers (each
    resident layer is one less to stream per token), then KV blocks, then the embedding table (a lookup reads
    only a few rows from disk). Raises EngineError when even the minimum does not fit."""
    device, dtype, budget = torch.device(device), dtype or cfg.dtype, _budget(vram_budget)
    for name, mode in (("weights", weights), ("kv", kv)):
        if mode not in MODES:
            raise EngineError(f"{name}='{mode}': expected one of {', '.join(MODES)}")
    # Streamed data lives in pinned host memory on CUDA when RAM allows; on CPU host memory *is* the budget.
    slow = "host" if device.type == "cuda" else "disk"
    ram = psutil.virtual_memory().available * 0.8
    limit = math.inf if budget is None else budget

    block_size = block_size or 256
    L, layer = cfg.num_layers, LayerLayout.of(cfg, dtype).nbytes
    block_bytes = L * block_size * cfg.kv_bytes_per_token(dtype)
    need_blocks = batch * -(-context // block_size)
    lm_head = (cfg.vocab_size + 1) * cfg.hidden_size * dtype.itemsize  # + the final norm
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * dtype.itemsize
    kv_forced = need_blocks * block_bytes if kv == "gpu" else 0
    weights_min = L * layer + embed if weights == "gpu" else layer

    # Shrink the chunks until the minimum configuration fits.
    chunk, kv_chunk = min(prefill_chunk or 512, batch * context), max(1, min(4096, context) // block_size)
    while True:
        mlp_rows = min(chunk, 512)
        work = working_bytes(cfg, dtype, batch * context, chunk, kv_chunk * block_size, mlp_rows, batch)
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
    if weights == "auto" and L * layer <= free:
        resident, slots, tiers = L, 0, ["device"] * L
    elif weights == "auto":
        # Two slots let layer i+1 load while layer i computes: worth more than one more resident layer.
        slots = 2 if L >= 2 and free >= 2 * layer else 1
        resident = min(L - 1, int((free - slots * layer) // layer))
        slots = min(slots, L - resident)
        tiers = ["device"] * resident + [slow if (L - resident) * layer < ram else "disk"] * (L - resident)
    else:
        tiers = [TIER_OF_MODE[weights]] * L
        resident = L if weights == "gpu" else 0
        slots = 0 if weights == "gpu" else 2 if L >= 2 and free >= 2 * layer else 1
    free -= (resident + slots) * layer

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
    return Plan(device=device, dtype=dtype, budget=budget, context=context, batch=batch, block_size=block_size,
                prefill_chunk=chunk, kv_chunk_blocks=kv_chunk, mlp_rows=mlp_rows, n_slots=slots,
                layer_tiers=tiers, embed_tier=embed_tier, kv_blocks=kv_blocks, layer_bytes=layer,
                globals_bytes=lm_head + (embed if embed_tier == "device" else 0),
                working_bytes=work, block_bytes=block_bytes, disk_bytes=disk_bytes,
                offload_dir=Path(offload_dir) if offload_dir else None)


def _budget(size) -> int | None:
    try:
        return parse_size(size)
    except ValueError as e:
        raise EngineError(f"vram_budget: {e}") from None
