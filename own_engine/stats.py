"""Counters for bytes moved between tiers and time spent, per phase; and a bandwidth probe."""
import os
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager

import torch

PHASES = ("load", "prefill", "decode")
# Logical hops between tiers. On the CPU device host and device are the same memory, so host->device and
# device->host are plain copies that stand in for the CUDA transfers.
DIRECTIONS = ("disk->host", "host->device", "device->host", "host->disk")


class EngineStats:
    """Bytes and seconds per (phase, direction); wall seconds and token counts per phase.

    Transfers run partly on a prefetch thread that overlaps compute, so the seconds of a direction measure the
    transfer itself (its achieved bandwidth), not its share of the phase's wall time.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self.phase = "load"
        self.bytes = defaultdict(int)
        self.seconds = defaultdict(float)
        self.phase_seconds = defaultdict(float)
        self.tokens = defaultdict(int)

    def record(self, direction: str, nbytes: int, seconds: float, phase: str | None = None):
        key = (phase or self.phase, direction)
        with self._lock:
            self.bytes[key] += nbytes
            self.seconds[key] += seconds

    @contextmanager
    def transfer(self, direction: str, nbytes: int, phase: str | None = None):
        start = time.perf_counter()
        yield
        self.record(direction, nbytes, time.perf_counter() - start, phase)

    @contextmanager
    def in_phase(self, phase: str, tokens: int = 0):
        self.phase = phase
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.perf_counter() - start
            self.tokens[phase] += tokens

    def bandwidth(self, direction: str, phase: str | None = None) -> float:
        """Achieved bytes/s of one direction, over one phase or all of them."""
        keys = [k for k in self.bytes if k[1] == direction and phase in (None, k[0])]
        seconds = sum(self.seconds[k] for k in keys)
        return sum(self.bytes[k] for k in keys) / seconds if seconds > 0 else 0.0

    def as_dict(self) -> dict:
        with self._lock:
            transfers = {f"{p}/{d}": {"bytes": b, "seconds": self.seconds[(p, d)],
                                      "bytes_per_s": b / self.seconds[(p, d)] if self.seconds[(p, d)] else 0.0}
                         for (p, d), b in sorted(self.bytes.items())}
        return {"transfers": transfers, "phase_seconds": dict(self.phase_seconds), "tokens": dict(self.tokens)}


def probe_bandwidth(device="cpu", nbytes: int = 256 << 20, directory=None) -> float:
    """Bytes/s of the link that streamed weights cross: pinned host->device on CUDA, file->memory on CPU.

    The CPU probe writes a file, drops it from the page cache (fsync + POSIX_FADV_DONTNEED) and reads it back,
    so it measures the storage rather than the page cache, as far as the kernel honours the advice.
    """
    device = torch.device(device)
    if device.type == "cuda":
        src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        dst.copy_(src)  # warm-up
        best = float("inf")
        for _ in range(3):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1000)
        return nbytes / best
    from .weights import read_into  # the same read path the disk tier uses

    with tempfile.NamedTemporaryFile(dir=directory, prefix="own_engine_probe_") as f:
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = torch.empty(nbytes >> 20 << 20, dtype=torch.uint8)
        start = time.perf_counter()
        read_into(f.fileno(), 0, buf)
        return buf.numel() / (time.perf_counter() - start)
