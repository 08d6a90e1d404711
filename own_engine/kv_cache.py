"""Paged KV storage: blocks of [2 (K, V), block_size, kv_heads, head_dim] per layer, spread over tiers.

Block ids are global and numbered tier by tier: device blocks in one device tensor, host blocks in one
(pinned on CUDA) host tensor, disk blocks in one memory-mapped file per layer under the offload dir.
Writes touch only the new tokens' rows; reads stream a sequence's blocks in chunks for the attention.
"""
import time
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .stats import EngineStats


class KVCache:
    def __init__(self, cfg: ModelConfig, counts: dict[str, int], block_size: int, chunk_blocks: int,
                 dtype: torch.dtype, device: torch.device, directory: Path | None, stats: EngineStats):
        self.block_size, self.chunk_blocks, self.device, self.stats = block_size, chunk_blocks, device, stats
        shape = (2, block_size, cfg.num_kv_heads, cfg.head_dim)
        self.tiers = []  # (tier, first block id, block count, one pool tensor per layer)
        first = 0
        for tier in ("device", "host", "disk"):
            n = counts.get(tier, 0)
            if n == 0:
                continue
            if tier == "disk":
                directory.mkdir(parents=True, exist_ok=True)
                nbytes = n * torch.Size(shape).numel() * dtype.itemsize
                pools = [torch.from_numpy(np.memmap(directory / f"layer_{i:03d}.kv", dtype=np.uint8, mode="w+",
                                                    shape=(nbytes,))).view(dtype).view(n, *shape)
                         for i in range(cfg.num_layers)]
            else:
                where = device if tier == "device" else torch.device("cpu")
                pin = tier == "host" and device.type == "cuda"
                pools = torch.empty((cfg.num_layers, n, *shape), dtype=dtype, device=where,
                                    pin_memory=pin).unbind(0)
            self.tiers.append((tier, first, n, pools))
            first += n
        self.num_blocks = first
        # Offloaded blocks reach a CUDA device through a pinned relay buffer (about twice pageable bandwidth).
        offloaded = counts.get("host", 0) + counts.get("disk", 0)
        self.staging = (torch.empty((chunk_blocks, *shape), dtype=dtype, pin_memory=True)
                        if device.type == "cuda" and offloaded else None)

    def _gather(self, tier: str, pool: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        if tier == "device":
            return pool[local.to(self.device)]
        start = time.perf_counter()
        if self.staging is None:
            blocks = pool[local]
        else:
            blocks = torch.index_select(pool, 0, local, out=self.staging[:len(local)])
        self.stats.record("host->device" if tier == "host" else "disk->host", blocks.nbytes,
                          time.perf_counter() - start)
        if self.device.type == "cuda":
            with self.stats.transfer("host->device", blocks.nbytes):
                blocks = blocks.to(self.device)  # synchronous, so the relay buffer is free again afterwards
        return blocks

    def write(self, layer: int, blocks: list[int], offsets: list[int], k: torch.Tensor, v: torch.Tensor):
        """Store the K, V rows [T, kv_heads, head_dim] of T new tokens at (block, offset) each."""
        blocks_t, offsets_t = torch.tensor(blocks), torch.tensor(offsets)
        kv = torch.stack((k, v), 1)  # [T, 2, kv_heads, head_dim]
        for tier, first, n, pools in self.tiers:
            rows = ((blocks_t >= first) & (blocks_t < first + n)).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            local, offset = blocks_t[rows] - first, offsets_t[rows]
            if tier == "device":
                rows, local, offset = rows.to(self.device), local.to(self.device), offset.to(self.device)
                pools[layer][local, :, offset] = kv[rows]
                continue
            new = kv[rows.to(self.device)]
            if self.device.type == "cuda":
                with self.stats.transfer("device->host", new.nbytes):
                    new = new.cpu()
            start = time.perf_counter()
            pools[layer][local, :, offset] = new
            self.stats.record("device->host" if tier == "host" else "host->disk", new.nbytes,
                              time.perf_counter() - start)

    def read(self, layer: int, table: list[int], n_tokens: int):
        """Yield (k, v, positions) on the device covering positions 0 .. n_tokens-1 of a sequence, at most
        chunk_blocks blocks at a time, grouped by tier (attention does not care about the order of keys)."""
        bs = self.block_size
        used = table[:-(-n_tokens // bs)]
        for tier, first, n, pools in self.tiers:
            mine = [j for j, b in enumerate(used) if first <= b < first + n]
            for c in range(0, len(mine), self.chunk_blocks):
                part = mine[c:c + self.chunk_blocks]
                blocks = self._gather(tier, pools[layer], torch.tensor([used[j] - first for j in part]))
                # Only the sequence's last block is partial, and it is the last block of its chunk.
                valid = sum(min(bs, n_tokens - j * bs) for j in part)
                k = blocks[:, 0].flatten(0, 1)[:valid]
                v = blocks[:, 1].flatten(0, 1)[:valid]
                pos = (torch.tensor(part)[:, None] * bs + torch.arange(bs)).flatten()[:valid]
                yield k, v, pos.to(self.device)
