"""Weight tiers: each decoder layer resident on the device, in (pinned) host memory, or on disk.

Streamed layers pass through a ring of preallocated device slots, one flat buffer per slot, filled with one
contiguous copy per layer. A single prefetch thread loads the next streamed layers while the current one
computes: file reads release the GIL, and on CUDA the host->device copy runs on its own stream.
"""
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from .stats import EngineStats
from .weights import Checkpoint, Extent, LayerLayout, read_extents


class LayerWeights:
    def __init__(self, ckpt: Checkpoint, layout: LayerLayout, tiers: list[str], n_slots: int,
                 device: torch.device, stats: EngineStats, packed: dict[int, list[Extent]]):
        self.layout, self.tiers, self.device, self.stats = layout, tiers, device, stats
        cuda = device.type == "cuda"
        self.resident: dict[int, dict[str, torch.Tensor]] = {}
        self.host: dict[int, torch.Tensor] = {}
        self.extents: dict[int, list[Extent]] = {}
        for i, tier in enumerate(tiers):
            if tier == "disk":
                self.extents[i] = packed.get(i) or ckpt.layer_extents(i, layout)
                continue
            buf = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=cuda and tier == "host")
            ckpt.read_layer(i, layout, buf)
            if tier == "host":
                self.host[i] = buf
            else:
                with stats.transfer("host->device", layout.nbytes):
                    self.resident[i] = layout.views(buf.to(device))

        self.streamed = [i for i, t in enumerate(tiers) if t != "device"]
        n_slots = min(n_slots, len(self.streamed))
        self.slots = [torch.empty(layout.nbytes, dtype=torch.uint8, device=device) for _ in range(n_slots)]
        self.slot_views = [layout.views(s) for s in self.slots]
        # Disk reads on CUDA land in a pinned relay buffer first; on CPU they go straight into the slot.
        self.staging = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True) if cuda and self.extents else None
        self.copy_stream = torch.cuda.Stream(device) if cuda else None
        self.released: list[torch.cuda.Event | None] = [None] * n_slots  # compute done with the slot
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="own_engine_prefetch") if self.streamed else None
        self.queue: deque[tuple[int, int, Future]] = deque()  # (layer, slot, load) in flight or ready
        self.submitted = 0  # loads submitted so far; load k goes to slot k % n_slots
        self.next = 0  # index into self.streamed of the next layer to submit
        self.current: int | None = None  # slot being computed on

    def layer(self, i: int) -> dict[str, torch.Tensor]:
        """Views of layer i's weights on the device; layers must be asked for in order, cyclically."""
        if i in self.resident:
            return self.resident[i]
        if self.current is not None and self.device.type == "cuda":
            self.released[self.current] = torch.cuda.current_stream(self.device).record_event()
        if self.queue and self.queue[0][0] != i:  # an interrupted pass left other layers queued
            for _, _, load in self.queue:
                load.result()
            self.queue.clear()
        if not self.queue:
            self.next = self.streamed.index(i)
            self._submit()
        _, slot, load = self.queue.popleft()
        load.result()
        self.current = slot
        while len(self.queue) < len(self.slots) - 1:
            self._submit()
        return self.slot_views[slot]

    def _submit(self):
        layer = self.streamed[self.next]
        slot = self.submitted % len(self.slots)
        self.next = (self.next + 1) % len(self.streamed)
        self.submitted += 1
        load = self.pool.submit(self._load, layer, slot, self.released[slot], self.stats.phase)
        self.queue.append((layer, slot, load))

    def _load(self, layer: int, slot: int, released, phase: str):
        if released is not None:
            released.synchronize()
        dst, nbytes = self.slots[slot], self.layout.nbytes
        src = self.host.get(layer)
        if src is None:
            src = self.staging if self.staging is not None else dst
            with self.stats.transfer("disk->host", nbytes, phase):
                read_extents(self.extents[layer], src)
            if src is dst:
                return
        with self.stats.transfer("host->device", nbytes, phase):
            if self.copy_stream is None:
                dst.copy_(src)
            else:
                with torch.cuda.stream(self.copy_stream):
                    dst.copy_(src, non_blocking=True)
                self.copy_stream.synchronize()

    def close(self):
        if self.pool is not None:
            for _, _, load in self.queue:
                load.cancel()
            self.pool.shutdown(wait=True)
            self.queue.clear()


class Globals:
    """Embedding table, final norm and lm_head. lm_head and the norm stay on the device; the embedding table
    either too, or (when the budget is short) memory-mapped from the checkpoint so a lookup reads only its rows."""

    def __init__(self, ckpt: Checkpoint, embed_tier: str, tied: bool, dtype: torch.dtype,
                 device: torch.device, stats: EngineStats):
        self.device, self.dtype, self.stats = device, dtype, stats

        def to_device(name):
            t = ckpt.read(name, dtype)
            with stats.transfer("host->device", t.nbytes):
                return t.to(device)

        self.norm = to_device("model.norm.weight")
        self.lm_head = to_device("model.embed_tokens.weight" if tied else "lm_head.weight")
        self.embed_on_disk = embed_tier == "disk" and not tied
        if not self.embed_on_disk:
            self.embed = self.lm_head if tied else to_device("model.embed_tokens.weight")
        else:
            e = ckpt.entries["model.embed_tokens.weight"]
            raw = np.memmap(e.file, dtype=np.uint8, mode="r", offset=e.offset, shape=(e.nbytes,))
            with warnings.catch_warnings():  # read-only on purpose: torch warns about non-writable arrays
                warnings.simplefilter("ignore", UserWarning)
                self.embed = torch.from_numpy(raw).view(e.dtype).view(e.shape)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.embed_on_disk:
            return self.embed[tokens]
        start = time.perf_counter()
        rows = self.embed[tokens.cpu()]
        self.stats.record("disk->host", rows.nbytes, time.perf_counter() - start)
        return rows.to(self.device, self.dtype)
