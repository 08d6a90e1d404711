"""Continuous batching (own_engine/scheduler.py) against the static batcher it replaced, under Poisson arrivals.

    python benchmarks/engine_batching.py                  # the ~200M bf16 Llama of engine_cpu.py, both mixes
    python benchmarks/engine_batching.py --small          # a tiny model: checks it all runs
    python benchmarks/engine_batching.py --mixes chat     # one mix

Both batchers drive the same Engine in this process, one after the other, on the same requests, greedy, EOS ignored,
at most --max-batch sequences at once, for each mix of requests:
  short       prompts of --prompt-len tokens, --out-min..--out-max new tokens (mostly prefill: 256, 8-64)
  chat        prompts of 128-512 tokens, 16-512 new tokens (decode-heavy, as users' chats are)
lengths drawn uniformly (seeded; users' answers differ in length, which is what static batching pays for).
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
              The static batcher's req/s here is the rate where static batching saturates. Output tok/s while
              saturated: the tokens out before the queue emptied (the last request admitted; for static, its last
              batch formed) over that time, which a server under a steady load stays in; over the whole run, the
              last batch's drain counts too, once per run for continuous batching and once per batch for static
              (--requests sets how much of a run the end is). Occupancy: the mean number of sequences in a pass
              over the weights, as a share of max_batch, over the passes made while requests were waiting
              (saturation: a full batch is possible).
  latency     Poisson arrivals at that rate (seeded, rescaled to the exact rate as the harness's load generator
              does). TTFT counts from each request's arrival (queueing included, as its user sees it).
max_batch defaults to the own backend's, and the process runs with its OpenMP wait environment (omp_wait_policy's
default) unless OMP_WAIT_POLICY / GOMP_SPINCOUNT are set. Not part of the test suite; all figures come from this one
run.
"""
import argparse
import json
import os
import time

from backends.own_backend import WAIT_ENVIRONMENT, OwnOptions

# The own backend's OpenMP wait environment, set before torch loads libgomp (unless already set in the environment).
for key, value in WAIT_ENVIRONMENT[OwnOptions.model_fields["omp_wait_policy"].default].items():
    os.environ.setdefault(key, value)

import numpy as np  # noqa: E402 (after the environment libgomp reads)
import torch  # noqa: E402

from engine_cpu import build_model, prompt_ids  # noqa: E402
from own_engine import Engine  # noqa: E402
from own_engine.scheduler import Scheduler  # noqa: E402
from own_engine.sequence import SamplingParams, Sequence  # noqa: E402


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    t = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    return (t * (n - 1) / rate / t[-1]).tolist()


def run(engine: Engine, prompts: list[list[int]], lengths: list[int], arrivals: list[float], static: bool,
        max_batch: int) -> dict:
    """Serve every request at its arrival time (seconds from the start); per request: arrival, first, last token."""
    scheduler = Scheduler(engine)
    first, last = [None] * len(prompts), [None] * len(prompts)
    stamps = []  # every output token's time

    def request(i: int) -> Sequence:
        def on_token(_token: int):
            t = time.perf_counter()
            first[i] = first[i] or t
            last[i] = t
            stamps.append(t)
        return Sequence(prompts[i], SamplingParams(lengths[i], ignore_eos=True), on_token=on_token)

    start, nxt, saturated, queue_empty = time.perf_counter(), 0, [], None
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
        waiting = bool(scheduler.waiting) or (nxt < len(prompts) and arrivals[nxt] <= elapsed)
        scheduler.step()
        if waiting:  # a request could have filled a free slot: this pass counts towards occupancy
            saturated.append(scheduler.last_pass)
        if queue_empty is None and nxt == len(prompts) and not scheduler.waiting:
            queue_empty = time.perf_counter()  # the last request is in: from here on the batch only drains
    sent = [start + a for a in arrivals]
    ttft = np.array(first) - np.array(sent)
    return {"ttft_p50": float(np.percentile(ttft, 50)), "ttft_p99": float(np.percentile(ttft, 99)),
            "tok_s": sum(lengths) / (max(last) - start), "makespan": max(last) - start,
            "saturated_tok_s": sum(t <= queue_empty for t in stamps) / (queue_empty - start),
            "occupancy": float(np.mean(saturated)) / max_batch if saturated else float("nan")}


MIXES = ("short", "chat")
CHAT = dict(prompt_min=128, prompt_max=512, out_min=16, out_max=512)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true")
    parser.add_argument("--mixes", default=",".join(MIXES), help=f"comma-separated, of {', '.join(MIXES)}")
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--prompt-len", type=int, default=256, help="the short mix's prompts")
    parser.add_argument("--out-min", type=int, default=8, help="the short mix's shortest output")
    parser.add_argument("--out-max", type=int, default=64, help="the short mix's longest output")
    parser.add_argument("--max-batch", type=int, default=OwnOptions.model_fields["max_batch"].default)
    args = parser.parse_args()
    mixes = args.mixes.split(",")
    if unknown := set(mixes) - set(MIXES):
        parser.error(f"--mixes: unknown {', '.join(sorted(unknown))} (expected some of {', '.join(MIXES)})")
    model = build_model("small" if args.small else "default")
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    omp = {k: os.environ[k] for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    print(f"model {model}; {args.requests} requests per mix; max_batch {args.max_batch}; "
          f"{torch.get_num_threads()} threads, OpenMP {omp}; load average {os.getloadavg()[0]:.2f}")
    for mix in mixes:
        rng = np.random.default_rng(0)
        if mix == "chat":
            prompt_lens = rng.integers(CHAT["prompt_min"], CHAT["prompt_max"] + 1, size=args.requests).tolist()
            lengths = rng.integers(CHAT["out_min"], CHAT["out_max"] + 1, size=args.requests).tolist()
        else:
            prompt_lens = [args.prompt_len] * args.requests
            lengths = rng.integers(args.out_min, args.out_max + 1, size=args.requests).tolist()
        prompts = [prompt_ids(n, vocab, seed=100 + i) for i, n in enumerate(prompt_lens)]
        print(f"\n== {mix} mix: prompts of {min(prompt_lens)}-{max(prompt_lens)} tokens (mean "
              f"{np.mean(prompt_lens):.0f}), {min(lengths)}-{max(lengths)} new (mean {np.mean(lengths):.1f})")
        compare(model, prompts, lengths, args.max_batch)


def compare(model, prompts: list[list[int]], lengths: list[int], max_batch: int):
    # Both batchers see the same prompts: a prefix cache would let the second one skip their prefills.
    engine = Engine(model, max_context=max(map(len, prompts)) + max(lengths), max_batch=max_batch,
                    prefix_cache=False)
    run(engine, prompts[:2], [4, 4], [0.0, 0.0], False, max_batch)  # warm-up: first-call allocations

    def measure(arrivals: list[float]) -> dict[str, dict[str, float]]:
        runs = {"static": [], "continuous": []}
        for name in ("static", "continuous", "continuous", "static"):
            runs[name].append(run(engine, prompts, lengths, arrivals, name == "static", max_batch))
        queued = not any(arrivals)  # every request waiting from the start: a saturated stretch to report
        for name, rs in runs.items():
            print(f"  {name:>10}: " + ", ".join(f"{label} {np.mean([r[k] for r in rs]):.2f} "
                                               f"({' / '.join(f'{r[k]:.2f}' for r in rs)})"
                                               for k, label in (("tok_s", "output tok/s"),
                                                                ("saturated_tok_s", "while saturated"),
                                                                ("ttft_p50", "TTFT p50 s"),
                                                                ("ttft_p99", "TTFT p99 s"),
                                                                ("occupancy", "occupancy"))
                                               if queued or k != "saturated_tok_s"))
        return {name: {k: float(np.mean([r[k] for r in rs])) for k in rs[0]} for name, rs in runs.items()}

    print("throughput, every request queued at once; mean of two runs (the two runs):")
    full = measure([0.0] * len(prompts))
    capacity = {name: len(prompts) / r["makespan"] for name, r in full.items()}
    s, c = full["static"], full["continuous"]
    print(f"capacity: static {capacity['static']:.3f} req/s, continuous {capacity['continuous']:.3f} req/s; "
          f"continuous / static output tok/s while saturated {c['saturated_tok_s'] / s['saturated_tok_s']:.2f}x "
          f"(target >= 1.5), over the whole run {c['tok_s'] / s['tok_s']:.2f}x; occupancy under saturation: "
          f"continuous {c['occupancy']:.0%} of max_batch (target >= 90%), static {s['occupancy']:.0%}")
    print(f"latency, Poisson at the static batcher's capacity, {capacity['static']:.3f} req/s:")
    poisson = measure(poisson_arrivals(len(prompts), capacity["static"], seed=1))
    s, c = poisson["static"], poisson["continuous"]
    print(f"continuous / static: TTFT p99 {c['ttft_p99'] / s['ttft_p99']:.2f}x (target <= 0.5), output tok/s "
          f"{c['tok_s'] / s['tok_s']:.2f}x; load average {os.getloadavg()[0]:.2f}")
    print(f"engine stats: preemptions {engine.stats.preemptions}")
    engine.close()


if __name__ == "__main__":
    main()
