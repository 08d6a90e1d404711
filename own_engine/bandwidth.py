"""How fast the link that streamed weights cross is: the bound a streamed decode is compared with."""
import os
import tempfile
import time

import torch

from .weights import read_into  # the same read path the disk tier uses


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
