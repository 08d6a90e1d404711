"""oLLM vs our engine on the same bf16 Llama with the same placement: decoder weights streamed layer by layer from
the safetensors on disk, KV cache on disk. Our engine all resident and transformers are there for reference.

    bash scripts/install-ollm.sh                # once: oLLM 1.0.3 in its own venv, .venv-ollm/
    python benchmarks/ollm_compare.py           # llama-3.2-1b-shaped random bf16 model (2.5 GB, cached), 256 + 32 tokens
    python benchmarks/ollm_compare.py --cold    # drop the model files from the page cache before each engine

Each engine runs in its own process, one after another, on the same prompt ids, greedy, a fixed output length:
  ollm          oLLM's AutoInference on the local folder, its DiskCache (benchmarks/ollm_driver.py, .venv-ollm)
  own_disk      Engine(weights="disk", kv="disk"): every decoded token re-reads all decoder layers and the KV
  own_resident  Engine(weights="gpu", kv="gpu"): on the CPU device that means everything in RAM
  hf            transformers' generate(), everything in RAM (benchmarks/ollm_driver.py, this venv)
Peak RSS is sampled every 100 ms over the child's process tree with psutil (file pages a process maps count too).

Page cache: by default the model files are read once before the runs, so the "disk" reads of every engine come
from the page cache (warm): the comparison is of the engines' streaming paths, not of the storage. With --cold the
kernel is asked to drop the model files' pages (posix_fadvise DONTNEED) before each engine: load and TTFT then
include the storage, but a model that fits in RAM is cached again after the first pass, so later decode steps still
read from memory; the KV files each engine writes during its run stay cached either way. Not part of the test suite.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

ROOT = Path(__file__).resolve().parent.parent
OLLM_PYTHON = ROOT / ".venv-ollm" / "bin" / "python"
DRIVER = Path(__file__).resolve().parent / "ollm_driver.py"
LABELS = {"ollm": "oLLM, weights+KV on disk", "own_disk": "ours, weights+KV on disk",
          "own_resident": "ours, all resident", "hf": "transformers, resident"}


def run_own(args):
    """One configuration of our engine, in this process; prints the same JSON as ollm_driver.py."""
    import resource

    from own_engine import Engine

    torch.set_num_threads(args.threads)
    prompt = json.loads(Path(args.prompt_ids).read_text())
    options = {"weights": "gpu", "kv": "gpu"} if args.child == "own_resident" else {
        "weights": "disk", "kv": "disk", "offload_dir": args.offload_dir}
    start = time.perf_counter()
    engine = Engine(args.model, device="cpu", dtype="bfloat16", max_context=len(prompt) + args.new_tokens,
                    **options)
    loaded = time.perf_counter()
    times = []
    tokens = engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                             on_token=lambda i, t: times.append(time.perf_counter()))
    transfers = engine.stats.as_dict()["transfers"]
    plan = engine.plan.explain()
    engine.close()
    print(json.dumps({"tokens": tokens, "load_s": loaded - start, "ttft_s": times[0] - loaded,
                      "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1),
                      "peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                      "decode_transfers": {k: v for k, v in transfers.items() if k.startswith("decode/")},
                      "plan": plan}))


class PeakRSS(threading.Thread):
    """Largest RSS summed over a process and its descendants, sampled until the process ends."""

    def __init__(self, pid: int, interval: float = 0.1):
        super().__init__(daemon=True)
        self.root, self.interval, self.peak = psutil.Process(pid), interval, 0

    def run(self):
        while True:
            try:
                if self.root.status() == psutil.STATUS_ZOMBIE:
                    return
                total = sum(p.memory_info().rss for p in [self.root, *self.root.children(recursive=True)])
            except psutil.NoSuchProcess:  # a descendant ended mid-sample, or the process itself
                if not self.root.is_running():
                    return
                continue
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


def run_child(name: str, cmd: list[str]) -> dict:
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = PeakRSS(proc.pid)
    sampler.start()
    out, err = proc.communicate()
    sampler.join()
    if proc.returncode:
        sys.exit(f"{name} failed (exit {proc.returncode}):\n{err[-4000:]}")
    result = json.loads(out.strip().splitlines()[-1])
    result["peak_rss"] = max(sampler.peak, result["peak_rss_self"])
    return result


def model_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def warm(files: list[Path]):
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass


def drop(files: list[Path]):
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF Llama folder with bf16 safetensors (default: the synthetic llama-3.2-1b)")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in every engine")
    parser.add_argument("--cold", action="store_true", help="drop the model files from the page cache before each")
    parser.add_argument("--only", nargs="+", choices=list(LABELS), default=list(LABELS), help="engines to run")
    parser.add_argument("--child", choices=["own_disk", "own_resident"], help=argparse.SUPPRESS)
    parser.add_argument("--prompt-ids", help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_own(args)
        return
    if "ollm" in args.only and not OLLM_PYTHON.is_file():
        sys.exit(f"{OLLM_PYTHON} not found: run `bash scripts/install-ollm.sh` first")

    if args.model is None:
        from harness.inputs.models import cached_synthetic

        start = time.perf_counter()
        args.model = cached_synthetic("llama-3.2-1b", 0)
        print(f"synthetic llama-3.2-1b ready in {time.perf_counter() - start:.1f}s")
    model = Path(args.model)
    files = model_files(model)
    config = json.loads((model / "config.json").read_text())
    size = sum(f.stat().st_size for f in files)
    # Ordinary (non-special) ids of the synthetic tokenizer; any ids below the vocab size do for random weights.
    prompt = torch.randint(5, min(16384, config["vocab_size"]), (args.prompt_len,),
                           generator=torch.Generator().manual_seed(1)).tolist()
    print(f"model {model}: {size / 1e9:.2f} GB bf16 safetensors, {config['num_hidden_layers']} layers; prompt "
          f"{args.prompt_len} tokens, {args.new_tokens} new (greedy, fixed length), {args.threads} torch threads, "
          f"page cache {'cold (dropped before each engine)' if args.cold else 'warm'}; "
          f"load average {os.getloadavg()[0]:.2f}")

    results = {}
    with tempfile.TemporaryDirectory(prefix="ollm_compare_") as tmp:
        ids_file = Path(tmp) / "prompt.json"
        ids_file.write_text(json.dumps(prompt))
        common = ["--model", str(model), "--prompt-ids", str(ids_file), "--new-tokens", str(args.new_tokens),
                  "--threads", str(args.threads)]
        commands = {
            "ollm": [str(OLLM_PYTHON), str(DRIVER), "--engine", "ollm", *common, "--kv-dir", f"{tmp}/ollm_kv"],
            "own_disk": [sys.executable, __file__, "--child", "own_disk", *common, "--offload-dir", f"{tmp}/own"],
            "own_resident": [sys.executable, __file__, "--child", "own_resident", *common],
            "hf": [sys.executable, str(DRIVER), "--engine", "hf", *common, "--kv-dir", f"{tmp}/unused"],
        }
        if not args.cold:
            warm(files)
        for name in args.only:
            if args.cold:
                drop(files)
            start = time.perf_counter()
            results[name] = run_child(name, commands[name])
            print(f"  {name}: done in {time.perf_counter() - start:.1f}s")

    print(f"\n{'engine':28} {'load s':>7} {'TTFT s':>7} {'s/token':>8} {'tok/s':>6} {'peak RSS':>9} "
          f"{'= HF tokens':>11}")
    reference = results.get("hf", {}).get("tokens")
    for name, r in results.items():
        same = f"{common_prefix(r['tokens'], reference)}/{len(reference)}" if reference else "-"
        print(f"{LABELS[name]:28} {r['load_s']:7.2f} {r['ttft_s']:7.2f} {r['decode_s_per_token']:8.3f} "
              f"{1 / r['decode_s_per_token']:6.2f} {r['peak_rss'] / 2**30:7.2f} G {same:>11}")

    print()
    if {"ollm", "own_disk"} <= results.keys():
        o, d = results["ollm"], results["own_disk"]
        print(f"speed-up of ours_disk over oLLM (same placement; oLLM's time / ours): "
              f"decode {o['decode_s_per_token'] / d['decode_s_per_token']:.2f}x, TTFT {o['ttft_s'] / d['ttft_s']:.2f}x; "
              f"peak RSS ours / oLLM {d['peak_rss'] / o['peak_rss']:.2f}")
    if {"own_resident", "own_disk"} <= results.keys():
        d, r = results["own_disk"], results["own_resident"]
        print(f"ours_disk / ours_resident: decode tok/s {r['decode_s_per_token'] / d['decode_s_per_token']:.2f}, "
              f"TTFT {r['ttft_s'] / d['ttft_s']:.2f}; tokens identical: {d['tokens'] == r['tokens']}")
    if "own_disk" in results:
        t = results["own_disk"]["decode_transfers"]
        reads = {k.removeprefix("decode/"): v for k, v in t.items()}
        per_token = {k: v["bytes"] / (args.new_tokens - 1) for k, v in reads.items()}
        print("ours_disk decode traffic per token: " + ", ".join(
            f"{k} {per_token[k] / 1e9:.3f} GB at {v['bytes_per_s'] / 1e9:.2f} GB/s" for k, v in reads.items()))
    if reference:
        print("'= HF tokens' is the length of the greedy prefix equal to transformers' (all bf16). Random weights "
              "give small logit margins, so kernels that round differently may part after a few tokens.")


if __name__ == "__main__":
    main()
