"""Counters for bytes moved between tiers and time spent, per phase."""
import threading
import time
from collections import defaultdict
from contextlib import contextmanager


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
