"""A first question on a new document with the prefix cache on vs off (issue 28, item 5: on should cost nothing).

    python benchmarks/engine_prefix_first.py                 # 16,384-token prompts, 4 documents, 3 rounds
    python benchmarks/engine_prefix_first.py --prompt-len 4096 --rounds 1

The documents workload's order (scenarios/documents.yaml): a warm-up question, then per document three questions in
a row (document + a question of its own), 32 new tokens each, on that scenario's model (tiny-llama-40k, 2 layers),
max_batch 4. The second and third questions reuse the document's KV blocks; the first question of the next document
computes everything either way, so its TTFT should not depend on the cache. Each mode runs in a process of its own,
the modes alternating per round; printed per first question: TTFT and the process's voluntary context switches
during it (threads put to sleep and woken: OpenMP workers that no longer spin between parallel regions). Not part of
the test suite.
"""
import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

QUESTION = 30


def switches() -> int:
    total = 0
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/status") as f:
            total += int(f.read().split("voluntary_ctxt_switches:\t")[1].split()[0])
    return total


def child(args) -> None:
    import torch

    from harness.inputs.models import cached_synthetic
    from own_engine import Engine

    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    docs = [[rng.randrange(3, 500) for _ in range(args.prompt_len - QUESTION)] for _ in range(args.documents + 1)]
    prompts = [docs[0] + [rng.randrange(3, 500) for _ in range(QUESTION)]]  # the warm-up
    prompts += [d + [rng.randrange(3, 500) for _ in range(QUESTION)] for d in docs[1:] for _ in range(3)]
    firsts = []
    with Engine.from_pretrained(cached_synthetic("tiny-llama-40k", 0), max_batch=4, max_context=33792,
                                prefix_cache=args.child == "on") as engine:
        for i, prompt in enumerate(prompts):
            times, before, start = [], switches(), time.perf_counter()
            engine.generate(prompt, max_new_tokens=32, ignore_eos=True,
                            on_token=lambda _, __: times.append(time.perf_counter()))
            if i % 3 == 1:
                firsts.append({"ttft_s": times[0] - start, "switches": switches() - before})
    print(json.dumps(firsts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=16384)
    parser.add_argument("--documents", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--child", choices=["on", "off"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    ttft = {"on": [], "off": []}
    for r in range(args.rounds):
        for mode in ("on", "off"):
            cmd = [sys.executable, __file__, "--child", mode, "--prompt-len", str(args.prompt_len),
                   "--documents", str(args.documents)] + (["--threads", str(args.threads)] if args.threads else [])
            firsts = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            ttft[mode] += [f["ttft_s"] for f in firsts]
            print(f"round {r + 1}, prefix cache {mode:>3}: first questions "
                  + ", ".join(f"{f['ttft_s']:.3f} s ({f['switches']} switches)" for f in firsts), flush=True)
    on, off = statistics.median(ttft["on"]), statistics.median(ttft["off"])
    print(f"median first-question TTFT: cache on {on:.3f} s, off {off:.3f} s, on/off {on / off:.2f}x "
          f"(target <= 1.0); {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
