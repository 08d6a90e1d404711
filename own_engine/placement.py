"""Weight tiers: each decoder layer stored resident on the device, in (pinned) host memory, or on disk, in the
storage dtype; and the copy compute reads.

On the CPU compute reads every tier where it is stored: resident layers, host memory and disk files, which are
memory-mapped (a warm page cache then costs no copy; the next mapped layer is read ahead with madvise). On a CPU
without native bf16 a pass of many rows first upcasts the layer into one reused float32 buffer, in the calling
thread. On CUDA, layers not resident pass through a ring of preallocated slots filled ahead of use by a single
prefetch thread: a disk read into a pinned relay buffer and one contiguous copy on a side stream. File reads and
copies release the GIL, so the thread works while the current layer computes.
"""
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from .matmul import linear
from .stats import EngineStats
from .weights import Checkpoint, Extent, LayerLayout, Span, fused, read_extents

LOGIT_ROWS = 4096  # rows of lm_head upcast at a time when compute runs in a wider dtype than storage


class LayerWeights:
    def __init__(self, ckpt: Checkpoint, layout: LayerLayout, compute: LayerLayout, tiers: list[str], n_slots: int,
                 device: torch.device, stats: EngineStats, packed: dict[int, Path]) -> None:
        self.layout, self.tiers, self.device, self.stats = layout, tiers, device, stats
        cuda = device.type == "cuda"
        self.stored: dict[int, dict[str, torch.Tensor]] = {}  # views compute can address, in the storage dtype
        self.spans: dict[int, list[Span]] = {}  # memory-mapped layers: the bytes of each file they span
        self.host: dict[int, torch.Tensor] = {}  # pinned flat buffers of the CUDA host tier
        self.extents: dict[int, list[Extent]] = {}  # file reads of the CUDA disk tier
        for i, tier in enumerate(tiers):
            if tier == "disk" and cuda:
                self.extents[i] = ckpt.packed_extents(packed[i], layout) if i in packed else ckpt.layer_extents(i, layout)
            elif tier == "disk":
                views, self.spans[i] = ckpt.mapped_layer(i, layout, packed.get(i))
                self.stored[i] = fused(views)
            else:
                buf = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=cuda and tier == "host")
                ckpt.read_layer(i, layout, buf)
                if tier == "host" and cuda:
                    self.host[i] = buf
                elif tier == "host":
                    self.stored[i] = fused(layout.views(buf))
                else:
                    with stats.transfer("host->device", layout.nbytes):
                        self.stored[i] = fused(layout.views(buf.to(device)))

        upcast = compute.dtype != layout.dtype
        # A CPU upcasts in the calling thread: the copy is compute on the same cores, and a second thread doing it
        # meanwhile only oversubscribes them (measured: a batch-8 decode step 367 ms with the thread, 236 without).
        self.wide: dict[str, torch.Tensor] | None = None
        if upcast and not cuda:
            self.wide = fused(compute.views(torch.empty(compute.nbytes, dtype=torch.uint8)))
        self.streamed = [i for i in range(len(tiers)) if (upcast and cuda) or i not in self.stored]
        n_slots = min(n_slots, len(self.streamed))
        self.slots = [torch.empty(compute.nbytes, dtype=torch.uint8, device=device) for _ in range(n_slots)]
        self.slot_views = [fused(compute.views(s)) for s in self.slots]
        # Disk reads on CUDA land in a pinned relay buffer first.
        self.staging = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=True) if self.extents else None
        self.copy_stream = torch.cuda.Stream(device) if cuda and self.streamed else None
        self.released: list[torch.cuda.Event | None] = [None] * n_slots  # compute done with the slot
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="own_engine_prefetch") if self.streamed else None
        self.queue: deque[tuple[int, int, Future[None]]] = deque()  # (layer, slot, load) in flight or ready
        self.submitted = 0  # loads submitted so far; load k goes to slot k % n_slots
        self.next = 0  # index into self.streamed of the next layer to submit
        self.current: int | None = None  # slot being computed on

    def layer(self, i: int, narrow: bool = False) -> dict[str, torch.Tensor]:
        """Views of layer i's weights on the device in the compute dtype, or with `narrow` as stored wherever compute
        can address them (a decode step's few rows read the narrower weights directly). Layers that pass through
        the ring must be asked for in order, cyclically."""
        if i not in self.streamed or (narrow and i in self.stored):
            for m, first, end in self.spans.get((i + 1) % len(self.tiers), []):
                m.will_need(first, end)
            views, start = self.stored[i], time.perf_counter()
            if self.wide is not None and not narrow:
                for name in self.layout.tensors:
                    self.wide[name].copy_(views[name])
                views = self.wide
            if self.tiers[i] != "device":  # read in place by compute, so no time of its own unless upcast here
                self.stats.record("disk->host" if self.tiers[i] == "disk" else "host->device", self.layout.nbytes,
                                  time.perf_counter() - start if views is self.wide else None)
            return views
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

    def _submit(self) -> None:
        assert self.pool is not None  # made where layers stream
        layer = self.streamed[self.next]
        slot = self.submitted % len(self.slots)
        self.next = (self.next + 1) % len(self.streamed)
        self.submitted += 1
        load = self.pool.submit(self._load, layer, slot, self.released[slot], self.stats.phase)
        self.queue.append((layer, slot, load))

    def _load(self, layer: int, slot: int, released: torch.cuda.Event | None, phase: str) -> None:
        if released is not None:
            released.synchronize()
        nbytes, tier = self.layout.nbytes, self.tiers[layer]
        if layer in self.stored:  # an upcast from memory compute can address (from the page cache when mapped)
            start = time.perf_counter()
            for name in self.layout.tensors:
                self.slot_views[slot][name].copy_(self.stored[layer][name])
            if tier != "device":
                self.stats.record("disk->host" if tier == "disk" else "host->device", nbytes,
                                  time.perf_counter() - start, phase)
            return
        assert self.copy_stream is not None  # made where layers stream
        src = self.host.get(layer)
        if src is None:
            assert self.staging is not None  # made where the disk tier streams
            src = self.staging
            with self.stats.transfer("disk->host", nbytes, phase):
                read_extents(self.extents[layer], src)
        with self.stats.transfer("host->device", nbytes, phase):
            with torch.cuda.stream(self.copy_stream):
                self.slots[slot].copy_(src, non_blocking=True)
            self.copy_stream.synchronize()

    def close(self) -> None:
        if self.pool is not None:
            for _, _, load in self.queue:
                load.cancel()
            self.pool.shutdown(wait=True)
            self.queue.clear()


class Globals:
    """Embedding table, final norm and lm_head. lm_head and the norm stay on the device; the embedding table
    either too, or (when the budget is short) memory-mapped from the checkpoint so a lookup reads only its rows.
    Stored in the storage dtype; rows reach compute in the compute dtype."""

    def __init__(self, ckpt: Checkpoint, embed_tier: str, tied: bool, dtype: torch.dtype, compute: torch.dtype,
                 device: torch.device, stats: EngineStats) -> None:
        self.device, self.compute, self.stats = device, compute, stats

        def to_device(name: str, as_dtype: torch.dtype = dtype) -> torch.Tensor:
            t = ckpt.read(name, as_dtype)
            with stats.transfer("host->device", t.nbytes):
                return t.to(device)

        self.norm = to_device("model.norm.weight", compute)
        self.lm_head = to_device("model.embed_tokens.weight" if tied else "lm_head.weight")
        self.embed_on_disk = embed_tier == "disk" and not tied
        self.embed = ckpt.mapped_tensor("model.embed_tokens.weight") if self.embed_on_disk else (
            self.lm_head if tied else to_device("model.embed_tokens.weight"))
        self.buffer = (torch.empty((min(LOGIT_ROWS, self.lm_head.shape[0]), self.lm_head.shape[1]), dtype=compute,
                                   device=device) if compute != dtype else None)

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.embed_on_disk:
            return self.embed[tokens].to(self.compute)
        start = time.perf_counter()
        rows = self.embed[tokens.cpu()]
        self.stats.record("disk->host", rows.nbytes, time.perf_counter() - start)
        return rows.to(self.device, self.compute)

    def logits(self, x: torch.Tensor, narrow: bool, form: str = "linear") -> torch.Tensor:
        """float32 logits of hidden states x [B, hidden] (already normalised); `narrow`: multiply by lm_head as
        stored rather than upcast slice by slice; `form`: how (matmul.linear)."""
        if self.buffer is None or narrow:
            return linear(x.to(self.lm_head.dtype), self.lm_head, None, form).float()
        out = torch.empty((x.shape[0], self.lm_head.shape[0]), dtype=torch.float32, device=self.device)
        for r in range(0, self.lm_head.shape[0], len(self.buffer)):
            rows = self.lm_head[r:r + len(self.buffer)]
            out[:, r:r + len(rows)] = linear(x, self.buffer[:len(rows)].copy_(rows), None, form)
        return out
