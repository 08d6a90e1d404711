"""How fast the link that streamed weights cross is, or memory where nothing streamed: the bound a decode step is
compared with.

A probe runs after the measurement it explains, so it must never cost that measurement: it makes its folder,
fits itself in the free space, and reports why it could not run instead of raising.
"""
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from llmbench.units import fmt_bytes

from .weights import read_into  # the same read path the disk tier uses

MIN_PROBE = 16 << 20  # smaller reads say more about latency than bandwidth


@dataclass(frozen=True)
class Probe:
    bytes_per_s: float | None  # None when the probe could not run
    nbytes: int = 0  # bytes it moved
    error: str | None = None  # why it could not run


def probe_bandwidth(device: str | torch.device = "cpu", nbytes: int = 256 << 20,
                    directory: str | Path | None = None) -> Probe:
    """Bytes/s of the link that streamed weights cross: pinned host->device on CUDA, file->memory on CPU.

    The CPU probe writes a file of at most a quarter of the free space in `directory` (created if missing, and
    removed again then), drops it from the page cache (fsync + POSIX_FADV_DONTNEED) and reads it back, so it
    measures the storage rather than the page cache, as far as the kernel honours the advice.
    """
    device = torch.device(device)
    if device.type == "cuda":
        try:
            return _probe_cuda(device, nbytes)
        except RuntimeError as e:  # out of memory, or no pinned memory left
            return Probe(None, error=f"host->device probe failed: {e}")
    directory = Path(directory or tempfile.gettempdir()).absolute()
    created, top = not directory.exists(), directory  # top: the highest folder the probe makes
    while not top.parent.exists():
        top = top.parent
    try:
        directory.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(directory).free
        size = min(nbytes, free // 4) >> 20 << 20
        if size < min(nbytes, MIN_PROBE):
            return Probe(None, error=f"{directory}: {fmt_bytes(free)} free, too little for a {fmt_bytes(MIN_PROBE)} "
                                     f"bandwidth probe (it takes at most a quarter of the free space)")
        return _probe_file(directory, size)
    except OSError as e:
        return Probe(None, error=f"bandwidth probe in {directory} failed: {e}")
    finally:
        if created:
            shutil.rmtree(top, ignore_errors=True)


def probe_memory(nbytes: int = 256 << 20, device: torch.device | str = "cpu") -> Probe:
    """Bytes/s at which this process's torch threads read `device`'s memory (host RAM by default): the best of three
    sums over a buffer far larger than the caches are per core, touched first. What bounds a decode step whose weights
    and KV are read in place (resident, or a warm page cache). Never raises: a buffer it cannot allocate is a
    probe_error."""
    device = torch.device(device)
    try:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    except RuntimeError as e:
        return Probe(None, error=f"memory probe: {e}")
    best = float("inf")
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        buf.sum().item()
        best = min(best, time.perf_counter() - start)
    return Probe(buf.nbytes / best, buf.nbytes)


def _probe_file(directory: Path, nbytes: int) -> Probe:
    with tempfile.NamedTemporaryFile(dir=directory, prefix="own_engine_probe_") as f:
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        buf = torch.empty(nbytes, dtype=torch.uint8)
        start = time.perf_counter()
        read_into(f.fileno(), 0, buf)
        return Probe(nbytes / (time.perf_counter() - start), nbytes)


def _probe_cuda(device: torch.device, nbytes: int) -> Probe:
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
    return Probe(nbytes / best, nbytes)
