"""GPU benchmark of own_engine: Llama-3.1-8B (bf16, random weights) with a 100k-token prompt under an 8 GiB budget.

    python benchmarks/engine_gpu.py                       # builds the synthetic model once (16 GB) under the cache
    python benchmarks/engine_gpu.py --model DIR --context 100000 --budget 8GiB --new-tokens 8

Measures peak VRAM (torch allocator and NVML for this process), TTFT, decode seconds per token, and decode time
against its physical bound: bytes streamed per decoded token / pinned host->device bandwidth measured here
(own_engine.bandwidth.probe_bandwidth). Targets (issue 4): VRAM <= 7.5 GiB, decode <= 1.5x the bound, TTFT <= 60 s.
To emulate an 8 GB card on a bigger one, the engine caps itself with torch.cuda.set_per_process_memory_fraction.
Needs an NVIDIA GPU; not part of the test suite.
"""
import argparse
import sys
import time
from pathlib import Path


GiB = 2**30


def nvml_process_vram() -> int | None:
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        return sum(p.usedGpuMemory or 0 for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h) if p.pid == os.getpid())
    except Exception:
        return None


def main() -> None:
    import numpy as np
    import torch

    from harness.inputs.models import cached_synthetic
    from own_engine.engine import Engine
    from own_engine.bandwidth import probe_bandwidth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="an HF folder; default: the synthetic llama-3.1-8b preset")
    ap.add_argument("--context", type=int, default=100_000, help="prompt tokens")
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--budget", default="8GiB")
    ap.add_argument("--offload-dir", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("engine_gpu.py needs a CUDA GPU")

    model = args.model or cached_synthetic("llama-3.1-8b", 0)
    t0 = time.perf_counter()
    engine = Engine(model, device="cuda", dtype="bfloat16", vram_budget=args.budget, offload_dir=args.offload_dir,
                    max_context=args.context + args.new_tokens, max_batch=1)
    load_s = time.perf_counter() - t0
    print(engine.plan.explain(), "\n")
    prompt = np.random.default_rng(0).integers(100, engine.config.vocab_size - 300, size=args.context).tolist()

    torch.cuda.reset_peak_memory_stats()
    times: list[float] = []
    start = time.perf_counter()
    engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                    on_token=lambda i, t: times.append(time.perf_counter()))
    ttft = times[0] - start
    per_token = (times[-1] - times[0]) / (len(times) - 1)
    stats = engine.stats.as_dict()
    decode_tokens = stats["tokens"].get("decode", 0)
    streamed = sum(v["bytes"] for k, v in stats["transfers"].items() if k.startswith("decode/") and
                   k.endswith(("host->device", "disk->host")))
    bandwidth = probe_bandwidth("cuda")
    bound = streamed / decode_tokens / bandwidth
    allocated, reserved = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()
    process = nvml_process_vram()
    engine.close()

    rows = [
        ("load", f"{load_s:.1f} s"),
        ("peak VRAM (allocator allocated / reserved)", f"{allocated / GiB:.2f} / {reserved / GiB:.2f} GiB (target <= 7.5)"),
        ("VRAM of this process (NVML, at the end)", f"{process / GiB:.2f} GiB" if process else "n/a"),
        ("TTFT", f"{ttft:.1f} s (target <= 60)"),
        ("decode", f"{per_token:.3f} s/token"),
        ("streamed per decoded token", f"{streamed / decode_tokens / GiB:.2f} GiB"),
        ("pinned host->device bandwidth", f"{bandwidth / 1e9:.1f} GB/s"),
        ("bound", f"{bound:.3f} s/token"),
        ("decode / bound", f"{per_token / bound:.2f}x (target <= 1.5)"),
    ]
    for name, value in rows:
        print(f"{name:45s} {value}")


if __name__ == "__main__":
    main()
