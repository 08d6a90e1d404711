"""Resource monitor for one cell: a background thread in the worker samples the worker's process tree (so an
engine server launched as a child counts), the disks, the declared offload folders and the GPUs every
`interval_ms`; phases (load, prefill, decode, idle) split the samples. docs/resources.md defines every number.

    with ResourceMonitor(os.getpid(), offload_dirs=[...], cache_paths=[model_dir]) as mon:
        ...                          # the cell
    phases = request_phases(records, load)   # harness/measure/phases.py: from the requests' own timestamps
    resources = mon.result(phases)   # JSON-ready: whole run and per phase
    timeline = mon.timeline(phases)  # compact arrays for plots
"""

from __future__ import annotations

import math
import os
import threading
import time
from array import array
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import psutil

from harness.measure import disk
from harness.measure.phases import subtract, union
from harness.core.gpu import Nvml

clock = time.perf_counter  # the worker's clock (harness.core.events.now): requests and samples share it

# Finding descendants scans /proc/<pid>/stat of every process on the machine (~1 ms for 80 processes): every
# 0.2 s, and up to 2 s where it is slower, to keep it under ~1 % of a core. A child that lives less
# than that may go unseen; its I/O and CPU time still count, folded into its parent when it is reaped.
TREE_EVERY_S = 0.2
TREE_MAX_EVERY_S = 2.0
TREE_MAX_SHARE = 0.01
OFFLOAD_EVERY_S = 0.5  # sizing a folder walks it
BASELINE_SAMPLES = 5
TIMELINE_POINTS = 1500

# A sample is a tuple in this order, None where a measure is unavailable; samples are kept as one array of
# doubles per column (NaN for None): 120 bytes a sample, 43 MB for two hours at 20 ms.
COLUMNS = ("t", "rss", "cpu_s", "read", "write", "dev_read", "dev_write", "offload",
           "global_vram", "process_vram", "util", "power_w", "energy_mj", "allocated", "reserved",
           "other_cpu_s", "steal_s", "load1")
_COL = {name: i for i, name in enumerate(COLUMNS)}

# Measures named in `unavailable` when they cannot be taken; each lists the result keys it nulls.
_DISK_KEYS = ("disk_read_bytes", "disk_write_bytes")
_DEVICE_KEYS = ("device_read_bytes", "device_write_bytes")
_TORCH_KEYS = ("max_allocated_bytes", "max_reserved_bytes")


class _Proc:
    __slots__ = ("proc", "ppid", "base", "last")

    def __init__(self, proc: psutil.Process, ppid: int, base: list[float]):
        self.proc, self.ppid, self.base, self.last = proc, ppid, base, list(base)


class ProcessTree:
    """RSS, disk bytes and CPU seconds of a process and all its descendants, right even as children exit.

    When a parent reaps a child, the kernel adds the child's I/O and CPU time to the parent's own counters
    (/proc/<pid>/io, cutime/cstime), so the tree's total is the sum over live processes. A child reaped outside
    the tree (an orphan, reparented to init) keeps its last reading instead. Totals never go backwards: a
    child reaped between reading its parent and reading it dips the sum for one sample, which is ignored.
    """

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.procs: dict[int, _Proc] = {}
        self.io_error: str | None = None
        self._frozen = [0.0, 0.0, 0.0]  # read, write, cpu_s of processes gone outside the tree
        self._high = [0.0, 0.0, 0.0]
        self._track(self.root, self.root.ppid(), initial=True)
        self.refresh(initial=True)

    def _counters(self, p: psutil.Process) -> tuple[int, list[float]]:
        ct = p.cpu_times()
        rss = p.memory_info().rss
        if self.io_error:
            return rss, [0, 0, ct.user + ct.system + ct.children_user + ct.children_system]
        io = p.io_counters()
        return rss, [io.read_bytes, io.write_bytes, ct.user + ct.system + ct.children_user + ct.children_system]

    def _track(self, p: psutil.Process, ppid: int, initial: bool) -> None:
        # Processes there before the monitor started count from now; later ones from their birth.
        base = [0.0, 0.0, 0.0]
        if initial:
            try:
                base = self._counters(p)[1]
            except psutil.AccessDenied as e:
                if p is not self.root:
                    raise
                self.io_error = f"cannot read /proc/{p.pid}/io: {e}"
                base = self._counters(p)[1]
        self.procs[p.pid] = _Proc(p, ppid, base)

    def refresh(self, initial: bool = False) -> None:
        """Find descendants born since the last call; psutil lists parents before their children."""
        try:
            kids = self.root.children(recursive=True)
        except psutil.NoSuchProcess:
            return
        for p in kids:
            try:
                ppid = p.ppid()
                if p.pid in self.procs:
                    self.procs[p.pid].ppid = ppid  # an orphan's new parent decides where its counters fold
                else:
                    self._track(p, ppid, initial)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue

    def pids(self) -> set[int]:
        return set(self.procs)

    def sample(self) -> tuple[int, float, float, float]:
        """(rss bytes, read bytes, written bytes, cpu seconds), the last three since the monitor started."""
        rss, gone = 0, []
        for pid, tp in self.procs.items():
            try:
                r, tp.last = self._counters(tp.proc)
                rss += r
            except psutil.ZombieProcess:
                continue  # exited, not yet reaped: no memory, counters final
            except psutil.NoSuchProcess:
                gone.append(pid)
            except psutil.AccessDenied:
                continue
        for pid in reversed(gone):  # children before parents, so a fold reaches the live ancestor
            tp = self.procs.pop(pid)
            parent = self.procs.get(tp.ppid)
            if parent is not None:
                # Its whole life is in the parent's counters now, including what it did before we started.
                parent.base = [pb + b for pb, b in zip(parent.base, tp.base)]
            else:
                self._frozen = [f + last - b for f, last, b in zip(self._frozen, tp.last, tp.base)]
        totals = list(self._frozen)
        for tp in self.procs.values():
            totals = [s + last - b for s, last, b in zip(totals, tp.last, tp.base)]
        self._high = [max(h, v) for h, v in zip(self._high, totals)]
        return rss, *self._high


class ResourceMonitor:
    """Samples one process tree and the machine around it; see the module docstring for use.

    pid: root of the tree (the worker). offload_dirs: folders whose size is tracked. gpu_indices: NVML indices
    (default: CUDA_VISIBLE_DEVICES, else all GPUs). torch_allocator: for in-process torch engines, a callable
    returning (max allocated, max reserved) bytes since its previous call (harness.core.gpu.torch_peak_reader()).
    cache_paths: the model files whose page-cache state before the run is reported.
    """

    def __init__(self, pid: int, interval_ms: float = 20, offload_dirs: Iterable[str] = (),
                 gpu_indices: Sequence[int] | None = None,
                 torch_allocator: Callable[[], tuple[int, int]] | None = None, cache_paths: Iterable[str] = ()):
        if interval_ms <= 0:
            raise ValueError(f"interval_ms must be > 0, got {interval_ms}")
        self.pid, self.interval_ms, self.interval = pid, interval_ms, interval_ms / 1000
        self.offload_dirs, self.cache_paths = list(offload_dirs), list(cache_paths)
        self.gpu_indices, self.torch_allocator = gpu_indices, torch_allocator
        self.marks: list[tuple[str, float]] = []
        self._cols = [array("d") for _ in COLUMNS]
        self._stop, self._wake = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None

    # ---- running ----

    def __enter__(self) -> ResourceMonitor:
        self.unavailable: dict[str, str] = {}
        self.page_cache_resident = disk.resident_fraction(self.cache_paths) if self.cache_paths else None
        if not self.cache_paths:
            self.unavailable["page_cache"] = "no cache_paths given"
        elif self.page_cache_resident is None:
            self.unavailable["page_cache"] = "mincore could not read the page-cache state of cache_paths"
        if not self.offload_dirs:
            self.unavailable["max_offload_dir_bytes"] = "no offload folders declared"
        if self.torch_allocator is None:
            self._lose(_TORCH_KEYS, "no torch allocator in this process (not an in-process torch engine, or no CUDA)")
        self.disks = disk.physical_disks()
        try:
            self._dev0 = disk.device_bytes(self.disks) if self.disks else None
            if not self.disks:
                self._lose(_DEVICE_KEYS, "no physical disk found in /sys/block")
        except OSError as e:
            self._dev0 = None
            self._lose(_DEVICE_KEYS, f"cannot read /proc/diskstats: {e}")
        self.tree = ProcessTree(self.pid)
        if self.tree.io_error:
            self._lose(_DISK_KEYS, self.tree.io_error)
        self.gpu = Nvml(self.gpu_indices)
        self._own_cpu = 0.0
        self._machine0 = _machine_cpu()
        self._tree_t = self._offload_t = -float("inf")
        self._tree_every = TREE_EVERY_S
        self._offload: int | None = None
        self.t_enter = clock()
        base = []
        for i in range(BASELINE_SAMPLES):
            base.append(self._read())
            if i < BASELINE_SAMPLES - 1:
                time.sleep(self.interval)
        self.baseline = self._baseline(base)
        self._stop.clear()
        self._wake.clear()
        self._cols = [array("d") for _ in COLUMNS]
        self._append(self._read())
        self._thread = threading.Thread(target=self._run, name="resource-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join()
        self._append(self._read())  # the end of the run is a sample, not up to an interval before it
        self.gpu.close()
        self.unavailable.update(self.gpu.unavailable)

    def mark(self, phase: str, t: float | None = None) -> None:
        """Start `phase` at `t` (default now, on the worker's perf_counter clock); a sample is taken at once."""
        self.marks.append((phase, clock() if t is None else t))
        self._wake.set()

    def _run(self) -> None:
        next_t = clock() + self.interval
        while True:
            woken = self._wake.wait(max(0.0, next_t - clock()))
            self._wake.clear()
            if self._stop.is_set():
                return
            if woken and clock() - self._cols[0][-1] < self.interval / 10:
                continue  # a burst of marks: interpolation between nearby samples is as good
            self._append(self._read())
            if not woken:
                next_t += self.interval
                while next_t <= clock():  # fell behind (a slow folder walk): skip ticks, do not burst
                    next_t += self.interval

    def _append(self, sample: tuple) -> None:
        for col, v in zip(self._cols, sample):
            col.append(math.nan if v is None else v)

    def _lose(self, keys: Iterable[str], reason: str) -> None:
        for k in keys:
            self.unavailable.setdefault(k, reason)

    def _read(self) -> tuple:
        cpu0 = time.thread_time()
        t = clock()
        if t - self._tree_t >= self._tree_every:
            self.tree.refresh()
            self._tree_t = t
            # CPU time, not wall: on a loaded machine the wall time of a scan says nothing about its cost.
            self._tree_every = min(max(TREE_EVERY_S, (time.thread_time() - cpu0) / TREE_MAX_SHARE), TREE_MAX_EVERY_S)
        rss, read, write, cpu_s = self.tree.sample()
        dev = (None, None)
        if self._dev0 is not None:
            now = disk.device_bytes(self.disks)
            dev = (now[0] - self._dev0[0], now[1] - self._dev0[1])
        if self.offload_dirs and t - self._offload_t >= OFFLOAD_EVERY_S:
            self._offload, self._offload_t = disk.dir_bytes(self.offload_dirs), t
        g = self.gpu.read(self.tree.pids())
        torch_mem = (None, None)
        if self.torch_allocator is not None and "max_allocated_bytes" not in self.unavailable:
            try:
                torch_mem = tuple(self.torch_allocator())
            except Exception as e:  # a broken reader loses its measure, not the cell
                self._lose(_TORCH_KEYS, f"torch allocator reader failed: {type(e).__name__}: {e}")
        # What else ran: the machine's busy CPU time less the tree's (the sampler is in the tree), and steal.
        busy, steal = _machine_cpu()
        other = (busy - self._machine0[0] - cpu_s, steal - self._machine0[1])
        try:
            load1 = os.getloadavg()[0]
        except OSError:
            load1 = None
        # The sampler runs inside the worker: its own CPU time is taken out of the tree's.
        sample = (t, rss, cpu_s - self._own_cpu, read, write, *dev, self._offload, *g, *torch_mem, *other, load1)
        self._own_cpu += time.thread_time() - cpu0
        return sample

    def _baseline(self, samples: list[tuple]) -> dict[str, Any]:
        def median(col: str):
            vals = [s[_COL[col]] for s in samples if s[_COL[col]] is not None]
            return float(np.median(vals)) if vals else None

        def as_int(v):
            return None if v is None else int(v)

        util, power = median("util"), median("power_w")
        return {"samples": len(samples), "rss_bytes": as_int(median("rss")),
                "global_vram_bytes": as_int(median("global_vram")), "process_vram_bytes": as_int(median("process_vram")),
                "gpu_util": None if util is None else round(util, 1),
                "power_w": None if power is None else round(power, 1)}

    # ---- results ----

    def _arrays(self) -> dict[str, np.ndarray]:
        if self._thread is None or self._thread.is_alive():
            raise RuntimeError("ResourceMonitor.result()/timeline() are read after the `with` block")
        return {name: np.array(col, dtype=float) for name, col in zip(COLUMNS, self._cols)}

    def _segments(self, phases: dict[str, list[tuple[float, float]]] | None) -> dict[str, list[tuple[float, float]]]:
        """Phases as intervals, clipped to the measured time. Given `phases` (derived from the requests, see
        harness/measure/phases.py), the time they leave uncovered is `idle`; otherwise a mark() starts its phase,
        which lasts until the next mark or the end. Repeated names add up."""
        t0, t1 = self._cols[0][0], self._cols[0][-1]
        if phases is None:
            marks = sorted(self.marks, key=lambda m: m[1])
            ends = [m[1] for m in marks[1:]] + [t1]
            phases = {}
            for (name, s), e in zip(marks, ends):
                phases.setdefault(name, []).append((s, e))
        else:
            covered = union(i for segs in phases.values() for i in segs)
            phases = {**phases, "idle": [*phases.get("idle", []), *subtract([(t0, t1)], covered)]}
        out: dict[str, list[tuple[float, float]]] = {}
        for name, segs in phases.items():
            for s, e in segs:
                s, e = max(s, t0), min(e, t1)
                if e > s:
                    out.setdefault(name, []).append((s, e))
        return out

    def result(self, phases: dict[str, list[tuple[float, float]]] | None = None,
               repetitions: Sequence[tuple[float, float]] = ()) -> dict[str, Any]:
        """JSON-ready resources of the run: `whole` and per-phase blocks (docs/resources.md), and what else ran on
        the machine during each of `repetitions` (spans on the perf_counter clock).

        phases: {phase: [(start, end), ...]} on the perf_counter clock; without them, the marks given to mark()."""
        a = self._arrays()
        t0, t1 = a["t"][0], a["t"][-1]
        return {
            "repetitions": [self._background(a, [(max(s, t0), min(e, t1))]) for s, e in repetitions
                            if min(e, t1) > max(s, t0)],
            "sample_interval_ms": self.interval_ms,
            "samples": len(self._cols[0]),
            "sampler_cpu_percent": round(100 * self._own_cpu / (t1 - self.t_enter), 2),
            "baseline": self.baseline,
            "unavailable": dict(sorted(self.unavailable.items())),
            "page_cache": disk.cache_label(self.page_cache_resident),
            "page_cache_resident": (None if self.page_cache_resident is None
                                    else round(self.page_cache_resident, 4)),
            "whole": self._block(a, [(t0, t1)]),
            "phases": {name: self._block(a, segs) for name, segs in self._segments(phases).items()},
        }

    @staticmethod
    def _delta(a: dict[str, np.ndarray], col: str, segs: list[tuple[float, float]]) -> float:
        # Counters are read between samples by linear interpolation, so a phase gets the bytes of its own time.
        t = a["t"]
        return sum(np.interp(e, t, a[col]) - np.interp(s, t, a[col]) for s, e in segs)

    @staticmethod
    def _window(t: np.ndarray, s: float, e: float) -> slice:
        # The samples inside the phase plus one at each boundary: a short phase still has a reading.
        i0 = max(int(np.searchsorted(t, s, "right")) - 1, 0)
        i1 = min(int(np.searchsorted(t, e, "left")), len(t) - 1)
        return slice(i0, i1 + 1)

    @classmethod
    def _peak(cls, a: dict[str, np.ndarray], col: str, segs: list[tuple[float, float]]) -> float:
        return max(float(np.max(a[col][cls._window(a["t"], s, e)])) for s, e in segs)

    def _background(self, a: dict[str, np.ndarray], segs: list[tuple[float, float]]) -> dict[str, Any]:
        """What else ran on the machine meanwhile, in percent of one core (so 2 busy cores are 200%)."""
        dur = sum(e - s for s, e in segs)
        load = self._peak(a, "load1", segs)
        return {"other_cpu_percent": round(100 * max(float(self._delta(a, "other_cpu_s", segs)), 0.0) / dur, 1),
                "steal_percent": round(100 * max(float(self._delta(a, "steal_s", segs)), 0.0) / dur, 1),
                "load_avg_max": None if math.isnan(load) else round(load, 2)}

    def _block(self, a: dict[str, np.ndarray], segs: list[tuple[float, float]]) -> dict[str, Any]:
        t = a["t"]
        dur = sum(e - s for s, e in segs)

        def delta(col: str) -> float:
            return self._delta(a, col, segs)

        def peak(col: str) -> float:
            return self._peak(a, col, segs)

        def mean(col: str) -> float:  # time-weighted: samples after a mark come closer together
            total = 0.0
            for s, e in segs:
                w = self._window(t, s, e)
                tt, v = t[w], a[col][w]
                if len(tt) > 1:
                    area = float(np.sum((v[1:] + v[:-1]) / 2 * np.diff(tt)))
                    total += area / (tt[-1] - tt[0]) * (e - s)
                else:
                    total += float(v[0]) * (e - s)
            return total / dur

        b = self.baseline
        values: dict[str, Callable[[], Any]] = {
            "max_rss_bytes": lambda: int(peak("rss")),
            "cpu_percent_mean": lambda: round(100 * max(delta("cpu_s"), 0.0) / dur, 1),
            "disk_read_bytes": lambda: int(round(delta("read"))),
            "disk_write_bytes": lambda: int(round(delta("write"))),
            "device_read_bytes": lambda: int(round(delta("dev_read"))),
            "device_write_bytes": lambda: int(round(delta("dev_write"))),
            "max_offload_dir_bytes": lambda: int(peak("offload")),
            "max_global_vram_bytes": lambda: int(peak("global_vram") - b["global_vram_bytes"]),
            "max_process_vram_bytes": lambda: int(peak("process_vram") - b["process_vram_bytes"]),
            "max_allocated_bytes": lambda: int(peak("allocated")),
            "max_reserved_bytes": lambda: int(peak("reserved")),
            "gpu_util_mean": lambda: round(mean("util"), 1),
            "power_w_mean": lambda: round(mean("power_w"), 1),
            "energy_j": lambda: round(delta("energy_mj") / 1000, 3),
            "duration_s": lambda: round(dur, 4),
        }
        return {**{k: None if k in self.unavailable else f() for k, f in values.items()}, **self._background(a, segs)}

    def timeline(self, phases: dict[str, list[tuple[float, float]]] | None = None) -> dict[str, Any]:
        """Compact arrays for plots: at most TIMELINE_POINTS bins over the run, times in seconds from its start.
        Rates are bytes/s over each bin; memory is the bin's peak, absolute (not above the baseline)."""
        a = self._arrays()
        t = a["t"]
        t0, t1 = t[0], t[-1]
        n = max(1, min(TIMELINE_POINTS, int(round((t1 - t0) / self.interval))))
        edges = np.linspace(t0, t1, n + 1)
        width = np.diff(edges)
        starts = np.searchsorted(t, edges[:-1], "left")
        ends = np.searchsorted(t, edges[1:], "right")
        centers = (edges[:-1] + edges[1:]) / 2

        def rate(col: str, scale: float = 1.0) -> np.ndarray:
            return np.maximum(np.diff(np.interp(edges, t, a[col])) / width * scale, 0.0)

        def gauge(col: str) -> list[int] | None:
            if np.isnan(a[col]).all():
                return None
            v = a[col]
            return [int(v[i:j].max()) if j > i else int(np.interp(c, t, v)) for i, j, c in zip(starts, ends, centers)]

        def ints(x: np.ndarray) -> list[int]:
            return [int(round(v)) for v in x]

        out = {
            "t": [round(float(c - t0), 3) for c in centers],
            "rss_bytes": gauge("rss"),
            "cpu_percent": [round(float(v), 1) for v in rate("cpu_s", 100.0)],
            "other_cpu_percent": [round(float(v), 1) for v in rate("other_cpu_s", 100.0)],
            "disk_read_bps": None if "disk_read_bytes" in self.unavailable else ints(rate("read")),
            "disk_write_bps": None if "disk_write_bytes" in self.unavailable else ints(rate("write")),
            "device_read_bps": None if "device_read_bytes" in self.unavailable else ints(rate("dev_read")),
            "device_write_bps": None if "device_write_bytes" in self.unavailable else ints(rate("dev_write")),
            "offload_dir_bytes": None if "max_offload_dir_bytes" in self.unavailable else gauge("offload"),
            "global_vram_bytes": None if "max_global_vram_bytes" in self.unavailable else gauge("global_vram"),
            "process_vram_bytes": None if "max_process_vram_bytes" in self.unavailable else gauge("process_vram"),
        }
        segments = sorted((s, e, name) for name, segs in self._segments(phases).items() for s, e in segs)
        out["phases"] = [[name, round(float(s - t0), 3), round(float(e - t0), 3)] for s, e, name in segments]
        return out


def _machine_cpu() -> tuple[float, float]:
    """(busy, stolen) CPU seconds of the whole machine since boot: /proc/stat, about 25 µs a read."""
    ct = psutil.cpu_times()
    busy = ct.user + ct.nice + ct.system + getattr(ct, "irq", 0.0) + getattr(ct, "softirq", 0.0)
    return busy, getattr(ct, "steal", 0.0)


def over_budget(result: dict[str, Any], budget_bytes: int | None) -> bool | None:
    """Whether the process tree's peak VRAM (absolute: above-baseline peak plus baseline) exceeded the budget;
    None without a budget or without per-process VRAM."""
    peak = result["whole"]["max_process_vram_bytes"]
    if budget_bytes is None or peak is None:
        return None
    return peak + (result["baseline"]["process_vram_bytes"] or 0) > budget_bytes
