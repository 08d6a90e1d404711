"""CPU decode benchmark of own_engine: all resident vs weights+KV on disk under a small budget vs transformers.

    python benchmarks/engine_cpu.py --small            # a few-MB model, seconds
    python benchmarks/engine_cpu.py                    # ~0.5B-parameter synthetic Llama (2 GB fp32 on disk)
    python benchmarks/engine_cpu.py --model PATH       # an existing HF Llama-family folder

Each configuration runs in its own process, one after another, so peak RSS (getrusage ru_maxrss) belongs to it
alone. The page cache is not dropped: after the first read the "disk" tier reads come from memory, so (b)
measures the engine's streaming path, not the storage. Not part of the test suite.
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from harness.inputs.models import synth_model

_LLAMA = dict(model_type="llama", max_position_embeddings=4096, rope_theta=500000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False, torch_dtype="float32")
SIZES = {  # shaped like harness.inputs.models.PRESETS entries
    "default": dict(_LLAMA, hidden_size=1536, intermediate_size=4096, num_hidden_layers=16, num_attention_heads=12,
                    num_key_value_heads=4, vocab_size=32000, bpe_vocab=4096),
    "small": dict(_LLAMA, hidden_size=256, intermediate_size=688, num_hidden_layers=8, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=1024, bpe_vocab=1024),
}


def run_child(args) -> dict:
    """One configuration, in this process: load, generate, report timings and peak memory."""
    prompt = torch.randint(0, 1000, (args.prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    if args.child == "hf":
        from transformers import AutoModelForCausalLM

        baseline, start = psutil.Process().memory_info().rss, time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
        loaded = time.perf_counter()
        times, tokens = [], []
        with torch.inference_mode():  # transformers' own forward and cache, greedy, as generate() does
            out = model(torch.tensor([prompt]), use_cache=True)
            while True:
                tokens.append(int(out.logits[0, -1].argmax()))
                times.append(time.perf_counter())
                if len(tokens) == args.new_tokens:
                    break
                out = model(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True)
        extra = {}
    else:
        from own_engine import Engine

        baseline, start = psutil.Process().memory_info().rss, time.perf_counter()
        options = dict(weights="gpu", kv="gpu") if args.child == "resident" else dict(
            weights="disk", kv="disk", vram_budget=args.budget, offload_dir=args.offload_dir)
        engine = Engine.from_pretrained(args.model, dtype="float32", max_context=args.prompt_len + args.new_tokens,
                                        **options)
        loaded = time.perf_counter()
        times = []
        tokens = engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                                 on_token=lambda i, t: times.append(time.perf_counter()))
        stats = engine.stats
        extra = {"plan": engine.plan.explain(),
                 "decode_disk_read_bytes": stats.bytes[("decode", "disk->host")],
                 "decode_disk_read_GBps": stats.bandwidth("disk->host", "decode") / 1e9}
        engine.close()
    return {"tokens": tokens, "load_s": loaded - start, "ttft_s": times[0] - loaded,
            "decode_tps": (len(times) - 1) / (times[-1] - times[0]), "baseline_rss": baseline,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **extra}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF Llama-family folder (default: build a synthetic one)")
    parser.add_argument("--small", action="store_true", help="tiny synthetic model for a smoke run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--budget-fraction", type=float,
                        help="budget for (b) as a fraction of the model's size (default 0.25, 0.4 with --small)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice); "
                        "1 gives steadier numbers on a shared machine")
    parser.add_argument("--child", choices=["resident", "disk", "hf"], help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args)))
        return

    with tempfile.TemporaryDirectory(prefix="engine_bench_") as tmp:
        if args.model is None:
            args.model = Path(tmp) / "model"
            start = time.perf_counter()
            synth_model(SIZES["small" if args.small else "default"], args.model)
            print(f"built synthetic model in {time.perf_counter() - start:.1f}s")
        size = sum(f.stat().st_size for f in Path(args.model).glob("*.safetensors"))
        budget = int(size * (args.budget_fraction or (0.4 if args.small else 0.25)))
        print(f"model {args.model}: {size / 2**30:.2f} GiB of safetensors; budget for (b) {budget / 2**30:.2f} GiB; "
              f"prompt {args.prompt_len} tokens, {args.new_tokens} new, greedy, fp32, "
              f"{torch.get_num_threads()} threads")
        results = {}
        for name in ("resident", "disk", "hf"):
            cmd = [sys.executable, __file__, "--child", name, "--model", str(args.model), "--prompt-len",
                   str(args.prompt_len), "--new-tokens", str(args.new_tokens), "--budget", str(budget),
                   "--offload-dir", str(Path(tmp) / "offload"), "--threads", str(torch.get_num_threads())]
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                sys.exit(f"{name} failed:\n{done.stderr}")
            results[name] = json.loads(done.stdout.strip().splitlines()[-1])

    labels = {"resident": "(a) own, all resident", "disk": "(b) own, weights+KV on disk", "hf": "(c) transformers"}
    print(f"\n{'configuration':32} {'load s':>7} {'ttft s':>7} {'decode tok/s':>13} {'peak RSS':>10} "
          f"{'above import':>13}")
    for name, r in results.items():
        print(f"{labels[name]:32} {r['load_s']:7.2f} {r['ttft_s']:7.2f} {r['decode_tps']:13.2f} "
              f"{r['peak_rss'] / 2**30:8.2f} G {(r['peak_rss'] - r['baseline_rss']) / 2**30:11.2f} G")
    a, b, c = results["resident"], results["disk"], results["hf"]
    print(f"\nown_resident / HF decode: {a['decode_tps'] / c['decode_tps']:.2f}x")
    print(f"own_disk / own_resident decode: {b['decode_tps'] / a['decode_tps']:.2f}x")
    print(f"(b) peak RSS above the RSS after imports {(b['peak_rss'] - b['baseline_rss']) / 2**30:.2f} GiB vs budget "
          f"{budget / 2**30:.2f} GiB; disk reads in decode {b['decode_disk_read_GBps']:.2f} GB/s "
          f"({b['decode_disk_read_bytes'] / (args.new_tokens - 1) / 2**30:.2f} GiB per token, page cache warm)")
    print(f"tokens identical: resident == disk: {a['tokens'] == b['tokens']}, "
          f"resident == HF: {a['tokens'] == c['tokens']}")
    print(f"\nplan for (b):\n{b['plan']}")


if __name__ == "__main__":
    main()
