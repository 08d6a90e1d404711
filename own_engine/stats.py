"""Counters for bytes moved between tiers and time spent, per phase."""
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NotRequired, TypedDict


PHASES = ("load", "prefill", "decode")
# Logical hops between tiers. On the CPU device host and device are the same memory, so host->device and
# device->host are plain copies that stand in for the CUDA transfers.
DIRECTIONS = ("disk->host", "host->device", "device->host", "host->disk")


class PrefixCounts(TypedDict):
    """Full KV blocks a new sequence found cached (in memory or in prefix_cache_dir) or had to compute."""
    hit_blocks: int
    disk_hit_blocks: int
    miss_blocks: int
    bytes_reused: int
    stored_blocks: int
    store_rebuilt: NotRequired[bool]  # with prefix_cache_dir: its manifest could not be trusted
    store_error: NotRequired[str]  # why persisting blocks stopped


class TransferCounts(TypedDict):
    bytes: int
    seconds: float
    in_place_bytes: int
    bytes_per_s: float


class StatsDict(TypedDict):
    transfers: dict[str, TransferCounts]  # by "phase/direction"
    phase_seconds: dict[str, float]
    tokens: dict[str, int]
    read_bytes: dict[str, int]
    prefix_cache: PrefixCounts
    preemptions: int


class EngineStats:
    """Bytes and seconds per (phase, direction); wall seconds and token counts per phase.

    Transfers run partly on a prefetch thread that overlaps compute, so the seconds of a direction measure the
    transfer itself (its achieved bandwidth), not its share of the phase's wall time. Data that compute reads in
    place (a memory-mapped file on the CPU) counts in bytes but has no time of its own: bandwidths cover the
    timed bytes only.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.phase = "load"
        self.bytes: defaultdict[tuple[str, str], int] = defaultdict(int)  # by (phase, direction)
        self.timed_bytes: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.seconds: defaultdict[tuple[str, str], float] = defaultdict(float)
        self.phase_seconds: defaultdict[str, float] = defaultdict(float)
        self.tokens: defaultdict[str, int] = defaultdict(int)
        # per phase: weights and KV compute read, wherever they are (every tier)
        self.read_bytes: defaultdict[str, int] = defaultdict(int)
        self.prefix: PrefixCounts = {"hit_blocks": 0, "disk_hit_blocks": 0, "miss_blocks": 0, "bytes_reused": 0,
                                     "stored_blocks": 0}
        self.preemptions = 0  # sequences the scheduler sent back to wait for lack of KV blocks

    def record(self, direction: str, nbytes: int, seconds: float | None = None, phase: str | None = None) -> None:
        """seconds None: read in place by compute, no transfer of its own."""
        key = (phase or self.phase, direction)
        with self._lock:
            self.bytes[key] += nbytes
            if seconds is not None:
                self.timed_bytes[key] += nbytes
                self.seconds[key] += seconds

    @contextmanager
    def transfer(self, direction: str, nbytes: int, phase: str | None = None) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.record(direction, nbytes, time.perf_counter() - start, phase)

    @contextmanager
    def in_phase(self, phase: str, tokens: int = 0) -> Iterator[None]:
        self.phase = phase
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[phase] += time.perf_counter() - start
            self.tokens[phase] += tokens

    def count_read(self, nbytes: int) -> None:
        """Bytes of weights and KV one pass read (in the current phase): what bounds it by memory bandwidth."""
        with self._lock:
            self.read_bytes[self.phase] += nbytes

    def count_prefix(self, hits: int, from_disk: int, misses: int, block_bytes: int) -> None:
        with self._lock:
            self.prefix["hit_blocks"] += hits + from_disk
            self.prefix["disk_hit_blocks"] += from_disk
            self.prefix["miss_blocks"] += misses
            self.prefix["bytes_reused"] += (hits + from_disk) * block_bytes

    def count_stored(self, blocks: int) -> None:
        """Blocks written to prefix_cache_dir (called on the store's writer thread)."""
        with self._lock:
            self.prefix["stored_blocks"] += blocks

    def bandwidth(self, direction: str, phase: str | None = None) -> float:
        """Achieved bytes/s of one direction's timed transfers, over one phase or all of them."""
        keys = [k for k in self.bytes if k[1] == direction and phase in (None, k[0])]
        seconds = sum(self.seconds[k] for k in keys)
        return sum(self.timed_bytes[k] for k in keys) / seconds if seconds > 0 else 0.0

    def as_dict(self) -> StatsDict:
        with self._lock:
            transfers: dict[str, TransferCounts] = {
                f"{p}/{d}": {"bytes": b, "seconds": self.seconds[k], "in_place_bytes": b - self.timed_bytes[k],
                             "bytes_per_s": self.timed_bytes[k] / self.seconds[k] if self.seconds[k] else 0.0}
                for k, b in sorted(self.bytes.items()) for p, d in [k]}
        return {"transfers": transfers, "phase_seconds": dict(self.phase_seconds), "tokens": dict(self.tokens),
                "read_bytes": dict(self.read_bytes), "prefix_cache": self.prefix.copy(),
                "preemptions": self.preemptions}
