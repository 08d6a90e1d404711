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
"""
import json
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

# Flags that make a dtype's matmuls native (those torch's own checks look for).
NATIVE = {torch.bfloat16: ("amx_bf16", "avx512_bf16"), torch.float16: ("amx_fp16",)}
ROWS = (1, 2, 4, 8, 16, 32, 64)  # the pass widths the micro-benchmark times
SHAPE = (2816, 1024)  # one MLP matrix of the 201M benchmark model (benchmarks/engine_cpu.py): out, in features
REPEATS = 5


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _cpuinfo(*keys: str) -> str | None:
    """The first /proc/cpuinfo line named one of `keys`, its value; None where there is none or no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys:
                return value.strip()
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags: /proc/cpuinfo's `flags` (x86) or `Features` (aarch64) line; where that cannot be
    read, the bf16/fp16 flags torch's own checks find."""
    line = _cpuinfo("flags", "Features")
    if line is not None:
        return frozenset(line.split())
    found = {"avx512_bf16": torch.cpu._is_avx512_bf16_supported(), "amx_fp16": torch.cpu._is_amx_fp16_supported()}
    return frozenset(flag for flag, present in found.items() if present)


@lru_cache(maxsize=1)
def cpu_model() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()


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
class Compute:
    dtype: torch.dtype
    narrow_rows: int  # passes of fewer rows multiply by the weights as stored (0: compute is the stored dtype)
    reason: str


def choose(device: torch.device, stored: torch.dtype, asked: torch.dtype | None = None) -> Compute:
    """The dtype compute runs in for weights stored in `stored` on `device` (`asked`, when given), and why."""
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


def crossover(stored: torch.dtype, compute: torch.dtype) -> Crossover:
    """The row count below which products read `stored` weights faster as stored than converted to `compute`:
    from the cache when this machine measured it before, else measured now and kept there (a cache that cannot be
    read is measured over; one that cannot be written is done without)."""
    key = {"cpu": cpu_model(), "flags": sorted(cpu_flags()), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "stored": dtype_name(stored), "compute": dtype_name(compute),
           "shape": list(SHAPE), "rows": list(ROWS)}
    file, entry = cache_file(), json.dumps(key, sort_keys=True)
    try:
        entries = json.loads(file.read_text())
    except (OSError, ValueError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}
    try:
        c = entries[entry]
        return Crossover(int(c["narrow_rows"]), tuple(c["rows"]), tuple(c["as_stored_s"]), tuple(c["converted_s"]),
                         str(file), True)
    except (KeyError, TypeError, ValueError):
        pass
    measured = measure(stored, compute)
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f"{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**entries, entry: asdict(measured)}, indent=1))
        tmp.replace(file)
    except OSError:
        return measured
    return Crossover(**{**asdict(measured), "cache": str(file)})


def measure(stored: torch.dtype, compute: torch.dtype) -> Crossover:
    """Time one SHAPE product at each of ROWS rows both ways (the best of REPEATS): reading the weights as stored
    (model.linear's narrow path) and converting them into a reused buffer first (the upcast path)."""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(SHAPE, generator=gen).to(stored)
    wide = torch.empty(SHAPE, dtype=compute)
    as_stored, converted = [], []
    for rows in ROWS:
        x = torch.randn((rows, SHAPE[1]), generator=gen).to(compute)
        as_stored.append(_best(lambda: F.linear(x.to(stored), w).to(compute)))
        converted.append(_best(lambda: F.linear(x, wide.copy_(w))))
    narrow = next((r for r, a, c in zip(ROWS, as_stored, converted) if c < a), 2 * ROWS[-1])
    return Crossover(narrow, ROWS, tuple(as_stored), tuple(converted), None, False)


def _best(run) -> float:
    run()  # first touch: allocations, kernel choice
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)
