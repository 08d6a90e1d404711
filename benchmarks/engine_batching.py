"""Continuous batching (own_engine/scheduler.py) against the static batcher it replaced, under Poisson arrivals.

    python benchmarks/engine_batching.py            # the ~200M bf16 Llama of engine_cpu.py, 24 requests
    python benchmarks/engine_batching.py --small    # a tiny model: checks it all runs

Both batchers drive the same Engine in this process, one after the other, on the same requests: prompts of
--prompt-len tokens, output lengths drawn uniformly from --out-min..--out-max (seeded; users' answers differ in
length, which is what static batching pays for), greedy, EOS ignored, at most --max-batch sequences at once.
  static      the pre-v2 own backend: when the engine is idle, the requests that have arrived (up to max_batch) form a
              batch that runs until its last member finishes; later arrivals wait for the whole batch. Kinder to
              static than the pre-v2 backend was: it batched only requests of equal max_tokens (here nearly every
              request would have run alone), and here a member that finishes early stops costing compute (as one
              ending at EOS did), where a padded batch would go on computing it.
  continuous  requests join the scheduler when they arrive and leave when they finish, between passes.
Each measurement runs in the order static, continuous, continuous, static, so a machine that speeds up or slows
down during the run favours neither; a figure is the mean of its two runs, and both runs are printed.
  throughput  every request queued at once, so both batchers are saturated: req/s and output tok/s = requests and
              tokens / makespan. (Below saturation a batcher's output rate is the offered rate, whichever it is.)
              The static batcher's req/s here is the rate where static batching saturates.
  latency     Poisson arrivals at that rate (seeded, rescaled to the exact rate as the harness's load generator
              does). TTFT counts from each request's arrival (queueing included, as its user sees it).
max_batch defaults to the own backend's. Not part of the test suite; all figures come from this one run.
"""
import argparse
import json
import os
import time

import numpy as np
import torch

from backends.own_backend import OwnOptions
from engine_cpu import build_model, prompt_ids
from own_engine import Engine
from own_engine.scheduler import Scheduler
from own_engine.sequence import SamplingParams, Sequence


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    t = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return (t * (n - 1) / rate / t[-1]).tolist()


def run(engine: Engine, prompts: list[list[int]], lengths: list[int], arrivals: list[float], static: bool,
        max_batch: int) -> dict:
    """Serve every request at its arrival time (seconds from the start); per request: arrival, first, last token."""
    scheduler = Scheduler(engine)
    first, last = [None] * len(prompts), [None] * len(prompts)

    def request(i: int) -> Sequence:
        def on_token(_token: int):
            t = time.perf_counter()
            first[i] = first[i] or t
            last[i] = t
        return Sequence(prompts[i], SamplingParams(lengths[i], ignore_eos=True), on_token=on_token)

    start, nxt = time.perf_counter(), 0
    while nxt < len(prompts) or scheduler.busy:
        elapsed = time.perf_counter() - start
        if not scheduler.busy and nxt < len(prompts) and arrivals[nxt] > elapsed:
            time.sleep(arrivals[nxt] - elapsed)
            elapsed = arrivals[nxt]
        if not static or not scheduler.busy:
            taken = 0
            while nxt < len(prompts) and arrivals[nxt] <= elapsed and (not static or taken < max_batch):
                scheduler.add(request(nxt))
                nxt, taken = nxt + 1, taken + 1
        scheduler.step()
    sent = [start + a for a in arrivals]
    ttft = np.array(first) - np.array(sent)
    return {"ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "tok_s": sum(lengths) / (max(last) - start), "makespan": max(last) - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--out-min", type=int, default=8)
    parser.add_argument("--out-max", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=OwnOptions.model_fields["max_batch"].default)
    args = parser.parse_args()
    model = build_model("small" if args.small else "default")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.out_min, args.out_max + 1, size=args.requests).tolist()
    prompts = [prompt_ids(args.prompt_len, vocab, seed=100 + i) for i in range(args.requests)]
    # Both batchers see the same prompts: a prefix cache would let the second one skip their prefills.
    engine = Engine(model, max_context=args.prompt_len + args.out_max, max_batch=args.max_batch, prefix_cache=False)
    print(f"model {model}; {args.requests} requests of {args.prompt_len} prompt tokens, {args.out_min}-{args.out_max} "
          f"new (mean {np.mean(lengths):.1f}); max_batch {args.max_batch}; {torch.get_num_threads()} threads; "
          f"load average {os.getloadavg()[0]:.2f}")
    run(engine, prompts[:2], [4, 4], [0.0, 0.0], False, args.max_batch)  # warm-up: first-call allocations

    def measure(arrivals: list[float]) -> dict[str, dict[str, float]]:
        runs = {"static": [], "continuous": []}
        for name in ("static", "continuous", "continuous", "static"):
            runs[name].append(run(engine, prompts, lengths, arrivals, name == "static", args.max_batch))
        for name, rs in runs.items():
            print(f"  {name:>10}: " + ", ".join(f"{label} {np.mean([r[k] for r in rs]):.2f} "
                                               f"({' / '.join(f'{r[k]:.2f}' for r in rs)})"
                                               for k, label in (("tok_s", "output tok/s"), ("ttft_p50", "TTFT p50 s"),
                                                                ("ttft_p99", "TTFT p99 s"))))
        return {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}

    print("\nthroughput, every request queued at once; mean of two runs (the two runs):")
    full = measure([0.0] * args.requests)
    capacity = {name: args.requests / r["makespan"] for name, r in full.items()}
    s, c = full["static"], full["continuous"]
    print(f"capacity: static {capacity['static']:.3f} req/s, continuous {capacity['continuous']:.3f} req/s; "
          f"continuous / static output tok/s {c['tok_s'] / s['tok_s']:.2f}x (target >= 1.5)")
    print(f"\nlatency, Poisson at the static batcher's capacity, {capacity['static']:.3f} req/s:")
    poisson = measure(poisson_arrivals(args.requests, capacity["static"], seed=1))
    s, c = poisson["static"], poisson["continuous"]
    print(f"continuous / static: TTFT p99 {c['ttft_p99'] / s['ttft_p99']:.2f}x (target <= 0.5), output tok/s "
          f"{c['tok_s'] / s['tok_s']:.2f}x; load average {os.getloadavg()[0]:.2f}")
    print(f"engine stats: preemptions {engine.stats.preemptions}")
    engine.close()


if __name__ == "__main__":
    main()
