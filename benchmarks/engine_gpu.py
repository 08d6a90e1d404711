"""GPU benchmark of own_engine: Llama-3.1-8B (bf16, random weights) with a 100k-token prompt under an 8 GiB budget.

    python benchmarks/engine_gpu.py                       # builds the synthetic model once (16 GB) under the cache
    python benchmarks/engine_gpu.py --model DIR --context 100000 --budget 8GiB --new-tokens 8

First checks the CUDA attention kernels (own_engine.kernels: the memory-efficient SDPA op with its log-sum-exp,
GQA folded or expanded, causal, a sliding-window bias) against the plain-PyTorch reference, in bf16 and fp32: no
CPU machine runs them. Then measures peak VRAM (torch allocator and NVML for this process), TTFT, decode seconds
per token, and decode time against its physical bound: bytes streamed per decoded token / pinned host->device
bandwidth measured here (own_engine.bandwidth.probe_bandwidth). The run streams weights from pinned host memory on
a side stream and KV chunks through the pinned relay buffer into two device buffers, prefetched on the KV thread.
Targets (issue 4): VRAM <= 7.5 GiB, decode <= 1.5x the bound, TTFT <= 60 s.
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


def check_kernels() -> None:
    """The fused CUDA path against the reference, on shapes that cover each branch; exits on a mismatch."""
    import torch

    from own_engine.attention import attend, part, visible

    gen = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float32, 1e-4)):
        for tq, q0, window, causal in ((37, 0, None, True), (1, 300, None, False), (37, 300, None, False),
                                       (37, 0, 16, True), (37, 60, 40, False)):
            tk = tq if causal else 96
            q, k, v = (torch.randn(n, h, 64, generator=gen).to("cuda", dtype) for n, h in ((tq, 32), (tk, 8), (tk, 8)))
            q_pos, k_pos = torch.arange(q0, q0 + tq), torch.arange(tk)
            got = part(q, k, v, q_pos, k_pos, 0.125, window, causal)
            ref = attend(q, k, v, visible(q_pos, k_pos, window).cuda(), 0.125)
            err = max((got[i] - ref[i]).abs().nan_to_num(posinf=0, neginf=0).max().item() for i in range(2))
            same_empty = torch.equal(got[1].isinf(), ref[1].isinf())
            print(f"kernel check {str(dtype)[6:]:8} Tq={tq:3} window={window} causal={causal}: max error {err:.1e}"
                  f"{'' if same_empty else ', rows without keys differ'}")
            if err > tol or not same_empty:
                sys.exit("the CUDA attention kernel disagrees with the reference")


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
    check_kernels()

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
    probe = probe_bandwidth("cuda")
    if probe.bytes_per_s is None:
        sys.exit(probe.error)
    bandwidth = probe.bytes_per_s
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
        ("compute dtype", str(engine.plan.compute_dtype)),
    ]
    for name, value in rows:
        print(f"{name:45s} {value}")


if __name__ == "__main__":
    main()
