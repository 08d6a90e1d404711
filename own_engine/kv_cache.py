"""Paged KV storage: per layer a K pool and a V pool of [blocks, block_size, kv_heads, head_dim], spread over tiers.

Block ids are global and numbered tier by tier: device blocks in device tensors, host blocks in (pinned on CUDA)
host tensors, disk blocks in one memory-mapped file per layer under the offload dir. Writes touch only the new
tokens' rows. Reads hand attention a sequence's blocks in chunks in the compute dtype: a view of the pool where
compute can read the chunk in place (consecutive blocks it can address, already in that dtype), else a copy into
one of two reused buffers. Copies are prefetched like weights: while attention runs on one chunk, the KV thread
fills the other buffer with the next (a gather or upcast on the CPU; on CUDA a gather into a pinned relay buffer
and a copy on a side stream). A chunk read in place from disk is read ahead by the kernel (madvise). On the CPU a
chunk read in place has no size limit (nothing is copied, and the CPU kernel needs no expanded copy of it), so a
sequence whose blocks are one run of ids is one chunk: one kernel call, no merge.

Where a pass's rows go (`slots`) is worked out once per pass, not per layer: per tier, which rows and their flat
index in the pool, so each layer's write is one indexed copy per pool.
"""
import os
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .mapped import Mapped
from .stats import EngineStats


# The most a gather of decoding sequences' KV copies per layer (K and V). Measured, a decode step of 8 sequences of
# the 201M bf16 model (4 KV heads of 64) gathered vs apart: 600 tokens 37 vs 41 ms, 1,000 tokens (8 MiB) 42 vs 49,
# 2,000 tokens (16 MiB) 117 vs 66.
GATHER_BYTES = 10 << 20

KV = tuple[torch.Tensor, torch.Tensor]
# Where a pass's new K and V rows go in one tier (KVCache.slots): (tier, the rows or None for all, their flat index).
Slot = tuple[str, torch.Tensor | None, torch.Tensor]


@dataclass
class Gather:
    """Where the KV of several decoding sequences is gathered from (KVCache.gather_index): one tier, the flat
    row of each [sequence, key] (padded to the longest), each sequence's key count and the keys' positions
    (-1: padding)."""
    tier: str
    index: torch.Tensor  # [sequences * width]
    lengths: torch.Tensor  # [sequences]
    positions: torch.Tensor  # [sequences, width]


@dataclass
class Paged:
    """The KV of several decoding sequences as our kernel reads it where it lies (KVCache.paged_index, native.py):
    one tier read in place, each sequence's block ids within it in key order (rows padded with 0), its key count,
    and its chunks (for the reads' bookkeeping)."""
    tier: str
    tables: torch.Tensor  # [sequences, blocks] int32
    lengths: list[int]
    reads: list[list["Chunk"]]


@dataclass
class Chunk:
    tier: str
    first: int  # the tier's first global block id
    ids: list[int]  # block ids within the tier
    valid: int  # tokens in these blocks that belong to the sequence
    positions: torch.Tensor  # [valid], on the CPU


class KVCache:
    def __init__(self, cfg: ModelConfig, counts: dict[str, int], block_size: int, chunk_blocks: int,
                 dtype: torch.dtype, compute_dtype: torch.dtype, device: torch.device, directory: Path | None,
                 stats: EngineStats, prefault: bool = False):
        """prefault: the disk tier's files get their pages at load (planner.Plan.prefault_disk_kv)."""
        self.block_size, self.chunk_blocks, self.device, self.stats = block_size, chunk_blocks, device, stats
        self.dtype, self.compute_dtype = dtype, compute_dtype
        block = (block_size, cfg.num_kv_heads, cfg.head_dim)
        self.block_bytes = torch.Size(block).numel() * dtype.itemsize  # K or V of one block in one layer
        self.tiers = {}  # tier -> (first block id, block count, per layer (K pool, V pool))
        self.maps: list[Mapped] = []  # the disk tier's file per layer
        self.whole: dict[str, torch.Tensor] = {}  # a tier in memory: every layer's pools, [layers, 2, blocks, ...]
        first = 0
        for tier in ("device", "host", "disk"):
            n = counts.get(tier, 0)
            if n == 0:
                continue
            if tier == "disk":
                assert directory is not None, "a disk tier needs a directory"
                directory.mkdir(parents=True, exist_ok=True)
                for i in range(cfg.num_layers):
                    fd = os.open(directory / f"layer_{i:03d}.kv", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                    os.ftruncate(fd, 2 * n * self.block_bytes)
                    self.maps.append(Mapped(fd, writable=True))
                    os.close(fd)  # the map keeps its own reference to the file
                    if prefault:  # else each page's first write faults inside a request, as host memory's would
                        self.maps[-1].populate()
                pools = [m.view(0, 2 * n * self.block_bytes, dtype).view(2, n, *block).unbind(0) for m in self.maps]
            else:
                where = device if tier == "device" else torch.device("cpu")
                pin = tier == "host" and device.type == "cuda"
                # Pages of host memory are touched now (zeros), at load: untouched, the first write of each faults
                # inside a request, as 12 ms of a 2,048-token document's 63 blocks read from prefix_cache_dir.
                make = torch.zeros if where.type == "cpu" and not pin else torch.empty
                self.whole[tier] = make((cfg.num_layers, 2, n, *block), dtype=dtype, device=where, pin_memory=pin)
                pools = [kv.unbind(0) for kv in self.whole[tier].unbind(0)]
            self.tiers[tier] = (first, n, pools)
            first += n
        # Each pool as [blocks * block_size, kv_heads, head_dim] rows, for writes by flat index.
        self.flat = {tier: [(k.view(-1, *block[1:]), v.view(-1, *block[1:])) for k, v in pools]
                     for tier, (_, _, pools) in self.tiers.items()}
        self.num_blocks = first
        self.buffers = torch.empty((2, 2, chunk_blocks, *block), dtype=compute_dtype, device=device)
        offloaded = counts.get("host", 0) + counts.get("disk", 0)
        # Offloaded blocks reach a CUDA device through a pinned relay buffer (about twice pageable bandwidth).
        self.staging = (torch.empty((2, chunk_blocks, *block), dtype=dtype, pin_memory=True)
                        if device.type == "cuda" and offloaded else None)
        self.copy_stream = torch.cuda.Stream(device) if self.staging is not None else None
        self.free: list[torch.cuda.Event | None] = [None, None]  # CUDA: compute done with a buffer
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="own_engine_kv")

    def slots(self, blocks: torch.Tensor, offsets: torch.Tensor) -> list[Slot]:
        """Where T new tokens' K and V go, given their (block, offset) ([T] on the CPU): per tier holding any,
        (tier, their rows, or None for all T, their flat index in the tier's pools), indices where the pools are."""
        out = []
        for tier, (first, n, _) in self.tiers.items():
            inside = (blocks >= first) & (blocks < first + n)
            rows = None if bool(inside.all()) else inside.nonzero().squeeze(1)
            if rows is not None and rows.numel() == 0:
                continue
            local, offset = (blocks, offsets) if rows is None else (blocks[rows], offsets[rows])
            flat = (local - first) * self.block_size + offset  # on the CPU, as the host and disk pools are
            out.append((tier, rows if rows is None else rows.to(self.device),
                        flat.to(self.device) if tier == "device" else flat))
        return out

    def write(self, layer: int, slots: list[Slot], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store the K, V rows [T, kv_heads, head_dim] of T new tokens where `slots` (from self.slots) says."""
        k, v = k.to(self.dtype), v.to(self.dtype)
        for tier, rows, flat in slots:
            kpool, vpool = self.flat[tier][layer]
            new_k, new_v = (k, v) if rows is None else (k[rows], v[rows])
            if tier == "device":
                kpool.index_copy_(0, flat, new_k)
                vpool.index_copy_(0, flat, new_v)
                continue
            if self.device.type == "cuda":
                with self.stats.transfer("device->host", 2 * new_k.nbytes):
                    new_k, new_v = new_k.cpu(), new_v.cpu()
            with self.stats.transfer("device->host" if tier == "host" else "host->disk", 2 * new_k.nbytes):
                kpool.index_copy_(0, flat, new_k)
                vpool.index_copy_(0, flat, new_v)

    def blocks_data(self, blocks: list[int]) -> torch.Tensor:
        """Blocks' K and V in every layer, [len(blocks), layers, 2, block_size, kv_heads, head_dim], a copy on the
        CPU: one indexed read per tier, layer and K or V (not one per block: a 2,048-token document's 64 blocks
        took ~1,600 small copies)."""
        by_tier: dict[str, list[tuple[int, int]]] = {}
        for i, block in enumerate(blocks):
            tier, at = self._locate(block)
            by_tier.setdefault(tier, []).append((i, at))
        pools = next(iter(self.tiers.values()))[2]
        out = torch.empty(len(blocks), len(pools), 2, *pools[0][0].shape[1:], dtype=self.dtype)
        for tier, found in by_tier.items():
            rows, local = (torch.tensor(x) for x in zip(*found))
            for layer, kv in enumerate(self.tiers[tier][2]):
                for j, pool in enumerate(kv):
                    out[rows, layer, j] = pool[local.to(pool.device)].cpu()
        return out

    def load_block(self, block: int, data: torch.Tensor) -> None:
        """Store a block's K and V in every layer ([layers, 2, block_size, kv_heads, head_dim], from
        blocks_data) in `block`: one copy where its tier is in memory (a copy per layer took ~115 us a block)."""
        tier, local = self._locate(block)
        if tier in self.whole:
            self.whole[tier][:, :, local] = data
            return
        for (k, v), layer in zip(self.tiers[tier][2], data):
            k[local], v[local] = layer[0], layer[1]

    def _locate(self, block: int) -> tuple[str, int]:
        return next((tier, block - first) for tier, (first, n, _) in self.tiers.items() if block < first + n)

    def chunks(self, table: list[int], n_tokens: int) -> list[Chunk]:
        """Positions 0 .. n_tokens-1 of a sequence as chunks of at most chunk_blocks blocks, grouped by tier
        (attention does not care about the order of keys). Where compute reads a tier in place, a chunk is also a
        run of consecutive block ids, so that it is one view of the pool: a sequence that starts with blocks
        another one cached has a break in its ids there, and a chunk across it would need a copy on the KV
        thread. (That copy cost more than itself: the thread's first torch op gives it an OpenMP team of its own,
        and with more OpenMP threads than cores libgomp stops spin-waiting, so every parallel region after it
        woke its workers from sleep. A 16k-token prompt on a 2-layer model, 2 threads: 0.62 s, 1.1-1.3 s once
        the KV thread had copied anything, prefix cache or not.)"""
        bs = self.block_size
        used = table[:-(-n_tokens // bs)]
        out = []
        for tier, (first, n, _) in self.tiers.items():
            in_place = self._in_place(tier)
            parts: list[list[int]] = []
            limit = None if in_place and self.device.type == "cpu" else self.chunk_blocks
            for j in (j for j, b in enumerate(used) if first <= b < first + n):
                gap = in_place and parts and used[j] != used[parts[-1][-1]] + 1
                if not parts or len(parts[-1]) == limit or gap:
                    parts.append([])
                parts[-1].append(j)
            for part in parts:
                # Only the sequence's last block is partial, and it is the last block of its chunk.
                valid = sum(min(bs, n_tokens - j * bs) for j in part)
                if part[-1] - part[0] == len(part) - 1:  # consecutive blocks of the sequence: one range
                    pos = torch.arange(part[0] * bs, part[0] * bs + valid)
                else:
                    pos = (torch.tensor(part)[:, None] * bs + torch.arange(bs)).flatten()[:valid]
                out.append(Chunk(tier, first, [used[j] - first for j in part], valid, pos))
        return out

    def read(self, layer: int, chunks: list[Chunk]) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (k, v, positions) of each chunk (from `chunks`) of a sequence: k, v [t, kv_heads, head_dim] on the
        device in the compute dtype, valid until the next chunk is asked for; positions on the CPU."""
        pending = self._start(layer, chunks[0], 0) if chunks else None
        try:
            for c, chunk in enumerate(chunks):
                # pending is chunk c's read: started before the loop, or at the end of the step before
                k, v = pending.result() if isinstance(pending, Future) else pending  # type: ignore[misc]
                pending = self._start(layer, chunks[c + 1], (c + 1) % 2) if c + 1 < len(chunks) else None
                yield k.flatten(0, 1)[:chunk.valid], v.flatten(0, 1)[:chunk.valid], chunk.positions
                if self.device.type == "cuda":
                    self.free[c % 2] = torch.cuda.current_stream(self.device).record_event()
        finally:  # a reader stopped early: its prefetch must not land in a buffer the next reader uses
            if isinstance(pending, Future):
                wait([pending])

    def gather_index(self, reads: list[list[Chunk]]) -> "Gather | None":
        """One gather for the KV of several decoding sequences (each one's chunks, from `chunks`), so attention
        runs once for all of them: on the CPU, when every chunk is in one tier read in place and the copy is at
        most GATHER_BYTES per layer (a gather that small costs less than the kernel calls it saves; a longer one
        costs more than reading each sequence's KV where it is). None when it does not apply."""
        tier = self._one_tier_in_place(reads)
        if self.device.type != "cpu" or tier is None:
            return None
        lengths = [sum(c.valid for c in chunks) for chunks in reads]
        width = max(lengths)
        if 2 * len(reads) * width * self.block_bytes // self.block_size > GATHER_BYTES:
            return None
        bs, rows, positions = self.block_size, [], []
        for chunks, n in zip(reads, lengths):
            # A chunk read in place is a run of consecutive blocks: its keys are consecutive rows of the pool.
            flat = torch.cat([torch.arange(c.ids[0] * bs, c.ids[0] * bs + c.valid) for c in chunks])
            rows.append(torch.cat((flat, flat[:1].expand(width - n))))  # padding: a row it has, masked out
            positions.append(torch.cat([c.positions for c in chunks] + [torch.full((width - n,), -1)]))
        return Gather(tier, torch.stack(rows).view(-1), torch.tensor(lengths), torch.stack(positions))

    def paged_index(self, reads: list[list[Chunk]]) -> Paged | None:
        """The block tables of decoding sequences (each one's chunks, from `chunks`) for our kernel, when all of
        them lie in one tier read in place; None when they do not."""
        tier = self._one_tier_in_place(reads)
        if tier is None:
            return None
        # One tier: its chunks are the sequence's blocks in order, all full but the last.
        ids = [[i for c in chunks for i in c.ids] for chunks in reads]
        tables = torch.zeros((len(ids), max(map(len, ids))), dtype=torch.int32)
        for row, blocks in zip(tables, ids):
            row[:len(blocks)] = torch.tensor(blocks, dtype=torch.int32)
        return Paged(tier, tables, [sum(c.valid for c in chunks) for chunks in reads], reads)

    def paged_pools(self, layer: int, p: Paged) -> KV:
        """The K and V pools [rows, kv_heads, head_dim] our kernel reads the layer's KV of `p` from."""
        for chunks in p.reads:
            for chunk in chunks:
                self._touch(layer, chunk)
        return self.flat[p.tier][layer]

    def gather(self, layer: int, g: "Gather") -> tuple[torch.Tensor, torch.Tensor]:
        """The gathered K and V [sequences, width, kv_heads, head_dim] of one layer (gather_index)."""
        kpool, vpool = self.flat[g.tier][layer]
        k, v = kpool.index_select(0, g.index), vpool.index_select(0, g.index)
        if g.tier != "device":  # read by the gather itself, so no time of its own
            self.stats.record("host->device" if g.tier == "host" else "disk->host", k.nbytes + v.nbytes)
        return k.view(len(g.lengths), -1, *k.shape[1:]), v.view(len(g.lengths), -1, *v.shape[1:])

    def _start(self, layer: int, chunk: Chunk, buf: int) -> Future[KV] | KV:
        """The chunk's (K, V) blocks [n, block_size, kv_heads, head_dim]: views when compute can read them in place,
        else a Future of their copy into buffer `buf`."""
        ids, (_, _, pools) = chunk.ids, self.tiers[chunk.tier]
        kpool, vpool = pools[layer]
        if not self._in_place(chunk.tier):
            return self.thread.submit(self._copy, chunk.tier, kpool, vpool, ids, buf, self.free[buf],
                                      self.stats.phase)
        self._touch(layer, chunk)
        return kpool[ids[0]:ids[0] + len(ids)], vpool[ids[0]:ids[0] + len(ids)]

    def _touch(self, layer: int, chunk: Chunk) -> None:
        """Account for a chunk that attention reads in place (its kernel reads it, so no time of its own), and ask
        the kernel to read a disk chunk ahead (madvise)."""
        ids = chunk.ids
        if chunk.tier != "device":
            self.stats.record("host->device" if chunk.tier == "host" else "disk->host", 2 * len(ids) * self.block_bytes)
        if chunk.tier == "disk":
            n = self.tiers["disk"][1]
            for start in (ids[0], n + ids[0]):  # the K run, then the V run
                self.maps[layer].will_need(start * self.block_bytes, (start + len(ids)) * self.block_bytes)

    def _one_tier_in_place(self, reads: list[list[Chunk]]) -> str | None:
        """The tier all these chunks lie in, when it is one and compute reads it in place; else None."""
        tiers = {c.tier for chunks in reads for c in chunks}
        tier = tiers.pop() if len(tiers) == 1 else None
        return tier if tier is not None and self._in_place(tier) else None

    def _in_place(self, tier: str) -> bool:
        """Whether compute reads the tier's pools where they are (a chunk of consecutive blocks as one view)."""
        return (tier == "device" or self.device.type == "cpu") and self.dtype == self.compute_dtype

    def _copy(self, tier: str, kpool: torch.Tensor, vpool: torch.Tensor, ids: list[int], buf: int,
              free: torch.cuda.Event | None, phase: str) -> KV:
        """On the KV thread: gather (and upcast) the blocks into buffer `buf`; on CUDA, through the relay buffer."""
        n, out = len(ids), self.buffers[buf, :, :len(ids)]
        direction = "host->device" if tier == "host" else "disk->host"
        start = time.perf_counter()
        if tier == "device" or self.device.type == "cpu":
            for dst, (src, r) in _runs(ids).items():
                out[0, dst:dst + r].copy_(kpool[src:src + r])
                out[1, dst:dst + r].copy_(vpool[src:src + r])
            if tier != "device":
                self.stats.record(direction, 2 * n * self.block_bytes, time.perf_counter() - start, phase)
            return out[0], out[1]
        assert self.staging is not None and self.copy_stream is not None  # made for CUDA with offloaded blocks
        staged, index = self.staging[:, :n], torch.tensor(ids)
        torch.index_select(kpool, 0, index, out=staged[0])
        torch.index_select(vpool, 0, index, out=staged[1])
        self.stats.record(direction, staged.nbytes, time.perf_counter() - start, phase)
        if free is not None:
            free.synchronize()  # compute is done with the buffer this copy overwrites
        with self.stats.transfer("host->device", staged.nbytes, phase):
            with torch.cuda.stream(self.copy_stream):
                out.copy_(staged, non_blocking=True)
            self.copy_stream.synchronize()  # the relay buffer is free again, and compute may use `out`
        return out[0], out[1]

    def close(self) -> None:
        self.thread.shutdown(wait=True)


def _runs(ids: list[int]) -> dict[int, tuple[int, int]]:
    """Runs of consecutive block ids: {position in ids: (first id, length)}."""
    runs, start = {}, 0
    for i in range(1, len(ids) + 1):
        if i == len(ids) or ids[i] != ids[i - 1] + 1:
            runs[start] = (ids[start], i - start)
            start = i
    return runs
