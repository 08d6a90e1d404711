"""The compute policy: which dtype compute runs in, and below how many rows a pass multiplies by the weights as
stored instead of converting them first.

The CPU's instruction set decides where it can. bf16 weights on a CPU with bf16 instructions (avx512_bf16,
amx_bf16) compute in bf16 as stored: on an AMD EPYC with avx512_bf16 a decode step of the 201M benchmark model
takes 26 ms for 1 row and 47 ms for 8, against 48 and 99 ms in float32 (a cliff between 1 and 2 rows). Without
them bf16 matmuls are emulated (on an AVX2 CPU a [512x1024]x[1024x2816] product takes 278 ms in bf16, 47 ms in
float32), so compute runs in float32, each layer upcast per use into one buffer.

What the instruction set does not decide is the row count below which reading the narrow weights as stored (a
memory-bound product accumulating in float32) beats converting them: it depends on the CPU's emulation and GEMM
kernels (on that AVX2 CPU, a whole decode step: 4 rows 118 ms as stored vs 190 ms upcast, 8 rows 191 vs 186). That
crossover is measured by a micro-benchmark, once per machine, and cached under $LLMBENCH_CACHE/own_engine (default
~/.cache/llmbench/own_engine), keyed by the CPU's model and flags, the torch version and its thread count.

Nor do the flags say which call multiplies a few rows fastest (matmul.linear's forms): on an Intel Xeon with AMX,
torch 2.13, the decode matmuls of that model in bf16 took 24 ms per step through F.linear, 17-18 ms through torch.mv
(1 row) or (w @ x.T).T (2-64 rows). A second micro-benchmark times each form at 1 to 64 rows over weights well past
the L2 cache (as a decode step reads them), per dtype products run in, and is cached the same way. Wider passes
(prefill) use F.linear: compute-bound, the case oneDNN's GEMM is built for.
"""
import bisect
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F

from llmbench.cpu import cpu_model, cpuinfo_flags

# Flags that make a dtype's matmuls native (those torch's own checks look for).
NATIVE = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16",)}
ROWS = (1, 2, 4, 8, 16, 32, 64)  # the pass widths the micro-benchmark times
SHAPE = (2816, 1024)  # one MLP matrix of the 201M benchmark model (benchmarks/engine_cpu.py): out, in features
REPEATS = 5
FORM_ROWS = (1, 2, 4, 8, 16, 32, 64)  # the pass widths whose product form is measured
WORKING_SET = 32 << 20  # bytes of weights each form is timed over: past the L2, as a decode step's weights are
MARGIN = 1.05  # another form replaces F.linear (or torch.mv) only when this much faster: noise must not flip it


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: /proc/cpuinfo's `flags` (x86) or `Features` (aarch64) line; where that cannot be
    read, the bf16/fp16 flags torch's own checks find."""
    flags = cpuinfo_flags()
    if flags is not None:
        return flags
    found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_fp16": torch.cpu._is_amx_fp16_supported()}
    return frozenset(flag for flag, present in found.items() if present)


@dataclass(frozen=True)
class Crossover:
    """The micro-benchmark's answer: passes of fewer than `narrow_rows` rows are faster reading the weights as
    stored; the seconds of one product at each of `rows`, both ways."""
    narrow_rows: int
    rows: tuple[int, ...]
    as_stored_s: tuple[float, ...]
    converted_s: tuple[float, ...]
    cache: str | None  # the file it was kept in (None: it could not be written)
    cached: bool  # read from there rather than measured now


@dataclass(frozen=True)
class MatmulForms:
    """The forms micro-benchmark's answer for one dtype: at each measured width, the fastest of matmul.FORMS, and
    the seconds each form took there (None: not a candidate at that width, as torch.mv beyond one row)."""
    dtype: str
    rows: tuple[int, ...]
    best: tuple[str, ...]
    seconds: dict[str, tuple[float | None, ...]]
    cache: str | None
    cached: bool

    def form(self, rows: int) -> str:
        """The form for a product of `rows` rows: that of the widest measured width not above it; F.linear past
        the widest."""
        if rows > self.rows[-1]:
            return "linear"
        return self.best[bisect.bisect_right(self.rows, rows) - 1]

    def explain(self) -> str:
        spans, start = [], 0
        for j in range(1, len(self.rows) + 1):
            if j == len(self.rows) or self.best[j] != self.best[start]:
                low, high = self.rows[start], (self.rows[j] - 1 if j < len(self.rows) else self.rows[-1])
                rows = f"{low} row" if low == high == 1 else f"{low} rows" if low == high else f"{low}-{high} rows"
                spans.append(f"{rows} {FORM_NAMES[self.best[start]]}")
                start = j
        at = self.rows.index(1)
        times = ", ".join(f"{FORM_NAMES[f]} {s * 1e3:.2f} ms" for f, t in self.seconds.items()
                          if (s := t[at]) is not None)
        where = ("measured now" if not self.cached else "measured before") + (f", kept in {self.cache}"
                                                                             if self.cache else "")
        return (f"{self.dtype}: {'; '.join(spans)}; more F.linear ({where}; 1 row, per {SHAPE[1]}x{SHAPE[0]} "
                f"matrix over {WORKING_SET >> 20} MiB of them: {times})")


FORM_NAMES = {"linear": "F.linear", "gemv": "torch.mv", "wxt": "(w @ x.T).T", "tiles": "our AMX tile kernel"}


@dataclass(frozen=True)
class Compute:
    dtype: torch.dtype
    narrow_rows: int  # passes of fewer rows multiply by the weights as stored (0: compute is the stored dtype)
    reason: str
    forms: tuple[MatmulForms, ...] = ()  # per dtype products run in, measured on this CPU (none: F.linear always)

    def form(self, dtype: torch.dtype, rows: int) -> str:
        """How a product of `rows` rows with weights in `dtype` is computed (matmul.linear's `form`)."""
        name = dtype_name(dtype)
        return next((f.form(rows) for f in self.forms if f.dtype == name), "linear")


def choose(device: torch.device, stored: torch.dtype, asked: torch.dtype | None = None) -> Compute:
    """The dtype compute runs in for weights stored in `stored` on `device` (`asked`, when given), and why; on a
    CPU also the form of each product (matmul_forms), for every dtype products run in."""
    c = _dtype(device, stored, asked)
    if device.type != "cpu":
        return c
    dtypes = [c.dtype] + ([stored] if c.narrow_rows else [])
    return Compute(c.dtype, c.narrow_rows, c.reason, tuple(matmul_forms(d) for d in dtypes))


def _dtype(device: torch.device, stored: torch.dtype, asked: torch.dtype | None) -> Compute:
    name = dtype_name(stored)
    if asked is not None:
        compute, why = asked, "asked for"
    elif stored == torch.float32:
        return Compute(stored, 0, "the stored dtype")
    elif device.type != "cpu":
        return Compute(stored, 0, f"the stored dtype ({device.type} multiplies {name} natively)")
    else:
        have = [f for f in NATIVE.get(stored, ()) if f in cpu_flags()]
        if have:
            return Compute(stored, 0, f"the stored dtype (this CPU has {name} instructions: {', '.join(have)})")
        compute = torch.float32
        why = (f"this CPU has no {name} instructions (none of {', '.join(NATIVE.get(stored, ()))} among its flags: "
               f"its {name} matmuls are emulated, several times slower than float32), so each layer is upcast per "
               f"use into a reused float32 buffer")
    if compute == stored or device.type != "cpu":
        return Compute(compute, 0, why)
    c = crossover(stored, compute)
    at = c.rows.index(c.narrow_rows) if c.narrow_rows in c.rows else -1
    where = ("measured now" if not c.cached else "measured before") + (f", kept in {c.cache}" if c.cache else "")
    return Compute(compute, c.narrow_rows,
                   f"{why}; passes of fewer than {c.narrow_rows} rows (decode) multiply by the {name} weights as "
                   f"stored, memory-bound and accumulating in float32 (this CPU, {where}: one {SHAPE[1]}x{SHAPE[0]} "
                   f"product of {c.rows[at]} rows takes {c.as_stored_s[at] * 1e3:.2f} ms as stored, "
                   f"{c.converted_s[at] * 1e3:.2f} ms converted)")


def cache_file() -> Path:
    root = Path(os.environ.get("LLMBENCH_CACHE", Path.home() / ".cache" / "llmbench"))
    return root / "own_engine" / "compute.json"


def _machine() -> dict[str, object]:
    """What a timing depends on besides its own inputs: another value of any is another machine (and another way
    of timing, a cache to measure over: "rounds", _fastest)."""
    return {"cpu": cpu_model(), "flags": sorted(cpu_flags()), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "timing": "rounds"}


Answer = TypeVar("Answer", Crossover, MatmulForms)


def _cached(key: dict[str, object], measure_now: Callable[[], Answer],
            restore: Callable[[Any, str], Answer]) -> Answer:
    """A micro-benchmark's answer: from the cache when this machine measured it before (restore(entry, file), the
    entry as parsed JSON),
    else measure_now() and kept there (a cache that cannot be read is measured over; one that cannot be written is
    done without: the answer's `cache` is None)."""
    file, entry = cache_file(), json.dumps(key, sort_keys=True)
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    try:
        return restore(entries[entry], str(file))
    except (KeyError, TypeError, ValueError, AttributeError):
        pass
    measured = measure_now()
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**entries, entry: asdict(measured)}, indent=1))
        tmp.replace(file)
    except OSError:
        return measured
    return type(measured)(**{**asdict(measured), "cache": str(file)})


def crossover(stored: torch.dtype, compute: torch.dtype) -> Crossover:
    """The row count below which products read `stored` weights faster as stored than converted to `compute`,
    measured once per machine (_cached)."""
    key = {**_machine(), "stored": dtype_name(stored), "compute": dtype_name(compute), "shape": list(SHAPE),
           "rows": list(ROWS)}
    return _cached(key, lambda: measure(stored, compute),
                   lambda c, file: Crossover(int(c["narrow_rows"]), tuple(c["rows"]), tuple(c["as_stored_s"]),
                                             tuple(c["converted_s"]), file, True))


def matmul_forms(dtype: torch.dtype) -> MatmulForms:
    """The fastest form of a product with `dtype` weights at each of FORM_ROWS, measured once per machine."""
    from .matmul import forms_here

    key = {**_machine(), "forms": list(forms_here(dtype)), "dtype": dtype_name(dtype), "shape": list(SHAPE),
           "rows": list(FORM_ROWS), "working_set": WORKING_SET}
    return _cached(key, lambda: measure_forms(dtype),
                   lambda c, file: MatmulForms(c["dtype"], tuple(c["rows"]), tuple(c["best"]),
                                               {f: tuple(t) for f, t in c["seconds"].items()}, file, True))


def measure_forms(dtype: torch.dtype) -> MatmulForms:
    """Time each form at each of FORM_ROWS over enough SHAPE matrices to fill WORKING_SET, each matrix read once
    per pass as a decode step reads its weights (_fastest: the best of REPEATS rounds over them all). A form must
    beat the ones before it in matmul.FORMS (F.linear, the call the engine made before, then torch.mv) by MARGIN.
    Only the forms that run here (matmul.forms_here) are candidates."""
    from .matmul import FORMS, forms_here, linear

    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(SHAPE, generator=gen).to(dtype)
               for _ in range(max(2, WORKING_SET // (SHAPE[0] * SHAPE[1] * dtype.itemsize)))]
    inputs = {rows: torch.randn((rows, SHAPE[1]), generator=gen).to(dtype) for rows in FORM_ROWS}

    def product(rows: int, form: str) -> Callable[[], None]:
        def run() -> None:
            for w in weights:
                linear(inputs[rows], w, None, form)
        return run

    candidates = {rows: [f for f in forms_here(dtype) if f != "gemv" or rows == 1] for rows in FORM_ROWS}
    fastest = _fastest({(rows, f): product(rows, f) for rows in FORM_ROWS for f in candidates[rows]})
    seconds: dict[str, list[float | None]] = {form: [] for form in FORMS}
    best = []
    for rows in FORM_ROWS:
        for form in FORMS:
            seconds[form].append(fastest[rows, form] / len(weights) if (rows, form) in fastest else None)
        choice = candidates[rows][0]
        for form in candidates[rows][1:]:
            if fastest[rows, form] * MARGIN < fastest[rows, choice]:
                choice = form
        best.append(choice)
    return MatmulForms(dtype_name(dtype), FORM_ROWS, tuple(best), {f: tuple(t) for f, t in seconds.items()},
                       None, False)


def measure(stored: torch.dtype, compute: torch.dtype) -> Crossover:
    """Time one SHAPE product at each of ROWS rows both ways (_fastest): reading the weights as stored
    (matmul.linear's narrow path) and converting them into a reused buffer first (the upcast path)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen).to(stored)
    wide = torch.empty(SHAPE, dtype=compute)
    inputs = {rows: torch.randn((rows, SHAPE[1]), generator=gen).to(compute) for rows in ROWS}

    def product(rows: int, way: str) -> Callable[[], object]:
        x = inputs[rows]
        return (lambda: F.linear(x.to(stored), w).to(compute)) if way == "as_stored" else (
            lambda: F.linear(x, wide.copy_(w)))

    fastest = _fastest({(rows, way): product(rows, way) for rows in ROWS for way in ("as_stored", "converted")})
    as_stored, converted = [fastest[r, "as_stored"] for r in ROWS], [fastest[r, "converted"] for r in ROWS]
    narrow = next((r for r, a, c in zip(ROWS, as_stored, converted) if c < a), 2 * ROWS[-1])
    return Crossover(narrow, ROWS, tuple(as_stored), tuple(converted), None, False)


K = TypeVar("K")


def _fastest(runs: dict[K, Callable[[], object]]) -> dict[K, float]:
    """The best of REPEATS timings of each run, taken in rounds over them all (after one untimed round: first
    touch, kernel choice), in alternate orders: a burst of load from elsewhere (another process, a VM's neighbour)
    then costs each run one or two of its timings, not all of them. Timed run by run, with timing loops of another
    process beside the measurement, the forms' cache on an Intel Xeon (AMX) kept torch.mv for 1 row at 0.79 ms a
    matrix and (w @ x.T).T for 16-64 rows, where alone the tile kernel takes 0.15-0.26 ms at every width."""
    order = list(runs)
    times: dict[K, list[float]] = {key: [] for key in order}
    for repeat in range(REPEATS + 1):
        for key in order if repeat % 2 else order[::-1]:
            start = time.perf_counter()
            runs[key]()
            if repeat:
                times[key].append(time.perf_counter() - start)
    return {key: min(t) for key, t in times.items()}
