"""CPU benchmark of own_engine on the shapes users run: long prompts on a bf16 Llama of ~200M parameters.

    python benchmarks/engine_cpu.py                        # prompts of 2,048 and 8,192 tokens, 16 new tokens
    python benchmarks/engine_cpu.py --small                # a tiny model and short prompts: checks it all runs
    python benchmarks/engine_cpu.py --prompts 512 --skip hf,llamacpp

Per prompt length, each configuration in its own process, one after another (peak RSS is its own):
  own           own_engine, all resident (weights stored bf16, compute as the plan decides)
  own-disk      weights and KV on disk (memory-mapped; the page cache is warmed first, so this measures the
                streaming path, not the storage)
  hf            transformers, same dtype, SDPA
  llamacpp      llama.cpp in-process on an f16 GGUF of the same weights (the CPU peer users would pick)
  ollm          oLLM 1.0.3 with the same placement as own-disk: decoder layers streamed from the safetensors, KV in
                its DiskCache (benchmarks/ollm_driver.py under .venv-ollm: `bash scripts/install-ollm.sh` once);
                skipped with a note when .venv-ollm is missing
and for the longest prompt a second question on the same document: TTFT of the second request in the process that
answered the first (prefix cache in memory), and in a new process that finds the document's blocks in
prefix_cache_dir. Ratios are printed against the issue's targets; all figures come from this one run.
With llamacpp, llama.cpp's own `llama-bench` (scripts/install-llama-server.sh builds it, from the same llama.cpp) runs
on the same f16 GGUF with the same threads and batch: its prompt and generation speeds, turned into a TTFT and a
decode time per token, cross-check our in-process llama.cpp numbers (a line beside them; a note when it is missing).
Greedy, ignore EOS; each process answers a 16-token warm-up prompt first. own, own-disk, hf and ollm run --repeats
times (default 3), each run a process of its own, in alternating order: the table gives their medians, and each ratio
the spread of its per-run ratios (runs paired in order), as memory bandwidth moves from one process to the next. Not
part of the test suite.
Each own configuration also compares its decode with its memory bound: the bytes of weights and KV one decoded token
read (the engine's count) over the memory bandwidth its threads read at (a sum over 256 MiB, measured after it in the
same process). The own configurations run with the own backend's OpenMP wait environment (--omp-wait-policy, its
default: bounded spinning), the others as they come (libgomp's default: spinning for a while, ~300,000 spins).
"""
import argparse
import hashlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from backends.own_backend import WAIT_ENVIRONMENT

_LLAMA = dict(model_type="llama", max_position_embeddings=16384, rope_theta=500000.0, rms_norm_eps=1e-5,
              tie_word_embeddings=False, torch_dtype="bfloat16")
SIZES = {  # shaped like harness.inputs.models.PRESETS entries
    # 12 layers of 11.3M + embed and lm_head of 32.8M each: 201M parameters, 402 MB in bf16
    "default": dict(_LLAMA, hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
                    num_key_value_heads=4, vocab_size=32000, bpe_vocab=4096),
    "small": dict(_LLAMA, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=2048, bpe_vocab=1024),
}
CONFIGS = ("own", "own-disk", "hf", "llamacpp", "ollm")
# Run --repeats times, in alternating order: memory bandwidth moves ±15% from one process to the next on a shared
# machine, and the targets' ratios with it (oLLM's TTFT at 2,048 tokens read 0.81 to 1.07 s in runs of different
# days, where one run decided own-disk / ollm). llama.cpp runs once: a minute's prefill at 8,192 tokens.
REPEATED = ("own", "own-disk", "hf", "ollm")
ROOT = Path(__file__).resolve().parent.parent
OLLM_PYTHON = ROOT / ".venv-ollm" / "bin" / "python"
QUESTION = 32  # tokens of each question asked after the document


def prompt_ids(n: int, vocab: int, seed: int = 1) -> list[int]:
    return torch.randint(10, vocab - 10, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run_child(args) -> dict:
    """One configuration in this process: load, answer, report timings and peak memory."""
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    doc = prompt_ids(args.prompt_len - QUESTION, vocab)
    questions = [prompt_ids(QUESTION, vocab, seed) for seed in (2, 3)]
    start = time.perf_counter()
    if args.child == "hf":
        generate = hf_generator(args.model)
    elif args.child == "llamacpp":
        generate = llamacpp_generator(args.model, args.prompt_len + args.new_tokens)
    else:
        from own_engine import Engine

        options = dict(weights="gpu", kv="gpu") if args.child == "own" else dict(
            weights="disk", kv="disk", offload_dir=args.offload_dir)
        engine = Engine.from_pretrained(args.model, max_context=args.prompt_len + args.new_tokens,
                                        prefix_cache_dir=args.prefix_dir, **options)

        def generate(prompt):
            read, decoded = engine.stats.read_bytes["decode"], engine.stats.tokens["decode"]
            times = []
            tokens = engine.generate(prompt, max_new_tokens=args.new_tokens, ignore_eos=True,
                                     on_token=lambda i, t: times.append(time.perf_counter()))
            bytes_per_token[0] = ((engine.stats.read_bytes["decode"] - read)
                                  / max(1, engine.stats.tokens["decode"] - decoded))
            return tokens, times
    loaded = time.perf_counter()
    out = {"load_s": loaded - start}
    bytes_per_token = [0.0]  # what the last own generation read per decoded token
    generate(prompt_ids(16, vocab, seed=9))  # warm-up: first-call allocations, on a prompt sharing no block
    for name, question in zip(("first", "second"), questions[:1 + args.second]):
        if args.child == "own" and args.second_only and name == "first":
            continue
        begin = time.perf_counter()
        tokens, times = generate(doc + question)
        out[name] = {"tokens": tokens, "ttft_s": times[0] - begin,
                     "decode_s_per_token": (times[-1] - times[0]) / max(1, len(times) - 1),
                     "bytes_per_token": bytes_per_token[0]}
    if args.child.startswith("own"):
        from own_engine.bandwidth import probe_memory

        out["plan"] = engine.plan.explain()
        out["prefix_cache"] = engine.stats.prefix
        engine.close()
        out["memory_bytes_per_s"] = probe_memory().bytes_per_s
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def hf_generator(model):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16, attn_implementation="sdpa").eval()

    def generate(prompt):
        tokens, times = [], []
        # transformers' own forward and cache, greedy, as generate() does: logits of the last position only (all
        # 2,048 rows' logits, float32, added ~0.1 s to its TTFT that no user of generate() pays)
        with torch.inference_mode():
            out = hf(torch.tensor([prompt]), use_cache=True, logits_to_keep=1)
            while True:
                tokens.append(int(out.logits[0, -1].argmax()))
                times.append(time.perf_counter())
                if len(tokens) == ARGS.new_tokens:
                    return tokens, times
                out = hf(torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True,
                         logits_to_keep=1)
    return generate


def llamacpp_generator(model, n_ctx):
    import llama_cpp
    import numpy as np

    from backends.llama_cpp.gguf import cached_gguf

    llm = llama_cpp.Llama(str(cached_gguf(model, "f16")), n_ctx=n_ctx, n_threads=torch.get_num_threads(),
                          n_batch=512, verbose=False)

    def generate(prompt):
        llm.reset()
        tokens, times = [], []
        llm.eval(prompt)
        while True:  # greedy on the last token's raw logits
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),))
            tokens.append(int(logits.argmax()))
            times.append(time.perf_counter())
            if len(tokens) == ARGS.new_tokens:
                return tokens, times
            llm.eval([tokens[-1]])
    return generate


def ollm_child(args, prompt_len: int, tmp: Path) -> dict:
    """oLLM through transformers' generate() (benchmarks/ollm_driver.py), on the same document + first question."""
    vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    ids = tmp / f"ollm_prompt{prompt_len}.json"
    ids.write_text(json.dumps(prompt_ids(prompt_len - QUESTION, vocab) + prompt_ids(QUESTION, vocab, 2)))
    cmd = [str(OLLM_PYTHON), str(Path(__file__).parent / "ollm_driver.py"), "--model",
           str(args.model), "--prompt-ids", str(ids), "--new-tokens", str(args.new_tokens),
           "--threads", str(torch.get_num_threads()), "--kv-dir", str(tmp / f"ollm_kv{prompt_len}")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"ollm (prompt {prompt_len}) failed:\n{done.stderr[-3000:]}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    return {"load_s": r["load_s"], "peak_rss": r["peak_rss_self"],
            "first": {k: r[k] for k in ("tokens", "ttft_s", "decode_s_per_token")}}


def child(args, name: str, prompt_len: int, tmp: Path, **extra) -> dict:
    if name == "ollm":
        return ollm_child(args, prompt_len, tmp)
    cmd = [sys.executable, __file__, "--child", name, "--model", str(args.model), "--prompt-len", str(prompt_len),
           "--new-tokens", str(args.new_tokens), "--offload-dir", str(tmp / "offload"),
           "--threads", str(torch.get_num_threads())]
    for key, value in extra.items():
        cmd += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    # The own backend's OpenMP wait environment, read when the child's libgomp loads.
    env = {**os.environ, **WAIT_ENVIRONMENT[args.omp_wait_policy]} if name.startswith("own") else None
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{name} (prompt {prompt_len}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def llama_bench(model: Path, prompt_len: int, new_tokens: int) -> dict | None:
    """llama-bench on the f16 GGUF the llamacpp configuration read: prefill of prompt_len tokens from an empty
    context, and generation after prompt_len tokens (-d), 3 repetitions each; None when it is not built."""
    from backends.llama_cpp.gguf import cached_gguf
    from backends.llama_cpp.server import binary_version, find_binary

    binary = find_binary(tool="llama-bench")
    if binary is None:
        return None
    common = [str(binary), "-m", str(cached_gguf(model, "f16")), "-t", str(torch.get_num_threads()), "-b", "512",
              "-ub", "512", "-fa", "off", "-r", "3", "-o", "json"]
    out = {"version": binary_version(binary)}
    for key, test in (("pp", ["-p", str(prompt_len), "-n", "0"]),
                      ("tg", ["-p", "0", "-n", str(new_tokens), "-d", str(prompt_len)])):
        done = subprocess.run(common + test, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"llama-bench failed:\n{done.stderr[-3000:]}")
        (row,) = json.loads(done.stdout)
        out[key] = (row["avg_ts"], row["stddev_ts"])
    return out


def warm(path: Path):
    """Read every file of the model once, so the disk configuration streams from the page cache."""
    for f in path.iterdir():
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def build_model(size: str) -> Path:
    from harness.core.files import cache_root
    from harness.inputs.models import synth_model

    key = json.dumps([SIZES[size], torch.__version__], sort_keys=True)
    path = cache_root() / "benchmarks" / f"engine_cpu-{size}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not (path / "config.json").is_file():
        start = time.perf_counter()
        synth_model(SIZES[size], path)
        print(f"built {path} in {time.perf_counter() - start:.0f} s")
    return path


def timed(r: dict) -> str:
    """The key of a run's timed question: "first", or "second" in a run that asked only that (own-new-process)."""
    return "first" if "first" in r else "second"


def median_run(runs: list[dict]) -> dict:
    """The first run (its tokens, plan, second question) with the median TTFT, decode time and decode/bound over all
    runs of its configuration; `rounds` keeps each run's (TTFT, decode, decode/bound) for the spreads."""
    first = timed(runs[0])

    def bound(r: dict) -> float | None:
        rate = r.get("memory_bytes_per_s")
        return r[first]["decode_s_per_token"] / (r[first]["bytes_per_token"] / rate) if rate else None

    rounds = [(r[first]["ttft_s"], r[first]["decode_s_per_token"], bound(r)) for r in runs]
    med = [statistics.median(x for x in column if x is not None) if column[0] is not None else None
           for column in zip(*rounds)]
    return {**runs[0], first: {**runs[0][first], "ttft_s": med[0], "decode_s_per_token": med[1]},
            "bound_ratio": med[2], "rounds": rounds}


def spread(values: list[float]) -> str:
    return f" (runs {min(values):.2f}-{max(values):.2f})" if len(values) > 1 else ""


def ratio(a: float, b: float, target: str, runs: list[float] | None = None) -> str:
    return f"{a / b:6.2f}x{spread(runs or [])}   (target {target})"


def speeds(label: str, a: dict, b: dict, decode_target: str, ttft_target: str) -> str:
    """Configuration a's median decode time per token and TTFT over b's, each against its target, with the spread
    of the ratios run by run (runs paired in order)."""
    pa, pb = a.get("rounds", []), b.get("rounds", [])
    paired = list(zip(pa, pb))
    first_a, first_b = a[timed(a)], b[timed(b)]
    decode = ratio(first_a["decode_s_per_token"], first_b["decode_s_per_token"], decode_target,
                   [x[1] / y[1] for x, y in paired])
    ttft = ratio(first_a["ttft_s"], first_b["ttft_s"], ttft_target, [x[0] / y[0] for x, y in paired])
    return f"{label} decode {decode}   TTFT {ttft}"


def main():
    global ARGS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF Llama-family folder (default: build the synthetic bf16 one, cached)")
    parser.add_argument("--small", action="store_true", help="tiny model, prompts of 128 and 512: a smoke run")
    parser.add_argument("--prompts", help="comma-separated prompt lengths (default 2048,8192; 128,512 with --small)")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--skip", default="", help=f"comma-separated configurations to leave out ({', '.join(CONFIGS)})")
    parser.add_argument("--repeats", type=int, default=3,
                        help=f"runs of {', '.join(REPEATED)} per prompt length, alternating (figures: medians)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, one per core)")
    parser.add_argument("--omp-wait-policy", choices=sorted(WAIT_ENVIRONMENT), default="bounded",
                        help="the OpenMP wait environment of the own configurations (the own backend's option)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--offload-dir", help=argparse.SUPPRESS)
    parser.add_argument("--prefix-dir", help=argparse.SUPPRESS)
    parser.add_argument("--second", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--second-only", action="store_true", help=argparse.SUPPRESS)
    ARGS = args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(run_child(args)))
        return

    args.model = Path(args.model) if args.model else build_model("small" if args.small else "default")
    lengths = [int(n) for n in (args.prompts or ("128,512" if args.small else "2048,8192")).split(",")]
    configs = [c for c in CONFIGS if c not in args.skip.split(",")]
    if "ollm" in configs and not OLLM_PYTHON.is_file():
        print(f"ollm skipped: {OLLM_PYTHON} not found (bash scripts/install-ollm.sh)")
        configs.remove("ollm")
    size = sum(f.stat().st_size for f in args.model.glob("*.safetensors"))
    print(f"model {args.model}: {size / 2**20:.0f} MiB of safetensors; prompts {lengths}, {args.new_tokens} new "
          f"tokens, greedy; {torch.get_num_threads()} threads; own's OpenMP {WAIT_ENVIRONMENT[args.omp_wait_policy]}; "
          f"load average {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(prefix="engine_bench_") as tmp:
        tmp = Path(tmp)
        for n in lengths:
            last = n == lengths[-1]
            runs: dict[str, list[dict]] = {name: [] for name in configs}
            for round_ in range(max(1, args.repeats)):
                again = [c for c in REPEATED if c in configs]
                for name in configs if round_ == 0 else again[::-1] if round_ % 2 else again:
                    warm(args.model)
                    second = name == "own" and last and round_ == 0  # the document's blocks go to prefix_dir
                    extra = {"second": True, "prefix_dir": tmp / f"prefix{n}"} if second else {}
                    runs[name].append(child(args, name, n, tmp, **extra))
                    print(f"  {name} done; load average {os.getloadavg()[0]:.2f}", flush=True)
            results = {name: median_run(r) for name, r in runs.items()}
            if "llamacpp" in results:
                results["llama-bench"] = llama_bench(args.model, n, args.new_tokens)
            if "own" in results and last:  # the document's blocks, found on disk by a new process
                results["own-new-process"] = child(args, "own", n, tmp, second=True, second_only=True,
                                                   prefix_dir=tmp / f"prefix{n}")
            report(n, results)


def report(n: int, results: dict):
    repeats = max(len(r.get("rounds", [])) for r in results.values() if r)
    print(f"\nprompt {n} tokens ({', '.join(c for c in REPEATED if c in results)}: medians of {repeats} runs)\n"
          f"{'configuration':18} {'load s':>7} {'TTFT s':>8} {'decode s/token':>15} {'peak RSS':>10}")
    for name, r in results.items():
        if name == "llama-bench":
            continue
        first = r[timed(r)]
        print(f"{name:18} {r['load_s']:7.2f} {first['ttft_s']:8.2f} {first['decode_s_per_token']:15.4f} "
              f"{r['peak_rss'] / 2**30:8.2f} G")
    get = results.get
    if get("own") and get("hf"):
        a, h = results["own"]["first"]["tokens"], results["hf"]["first"]["tokens"]
        print(speeds("own / hf      ", results["own"], results["hf"], "<= 0.6", "<= 0.6"))
        same = next((i for i, (x, y) in enumerate(zip(a, h)) if x != y), len(a))
        print(f"own and hf share the first {same} of {len(a)} greedy tokens")
    for name in ("own", "own-disk"):
        if get(name) and results[name].get("bound_ratio") is not None:
            r = results[name]
            first = r[timed(r)]
            print(f"{name} decode / memory bound {r['bound_ratio']:6.2f}x{spread([x[2] for x in r['rounds']])}   "
                  f"(target <= 1.5)   ({first['bytes_per_token'] / 2**20:.0f} MiB per token; each run against the "
                  f"memory bandwidth its process read after it, first run {r['memory_bytes_per_s'] / 1e9:.1f} GB/s)")
    if get("own") and get("own-disk"):
        tokens = results["own-disk"]["first"]["tokens"] == results["own"]["first"]["tokens"]
        print(speeds("own-disk / own", results["own-disk"], results["own"], "<= 1.1", "<= 1.1") +
              f";  tokens identical: {tokens}")
    if get("own") and get("llamacpp"):
        shared = results["own"]["first"]["tokens"][0] == results["llamacpp"]["first"]["tokens"][0]
        print(speeds("own / llama.cpp f16", results["own"], results["llamacpp"], "<= 1.0", "none") +
              f";  first greedy token shared: {shared}")
    if "llama-bench" in results:
        bench = results["llama-bench"]
        if bench is None:
            print("llama-bench cross-check skipped: not built (scripts/install-llama-server.sh)")
        else:
            (pp, pp_sd), (tg, tg_sd) = bench["pp"], bench["tg"]
            c = results["llamacpp"]["first"]
            print(f"llama-bench {bench['version']}, same GGUF: prefill {pp:.1f} ± {pp_sd:.1f} tok/s (TTFT "
                  f"{n / pp:.2f} s), generation after {n} tokens {tg:.1f} ± {tg_sd:.1f} tok/s ({1 / tg:.4f} "
                  f"s/token); in-process llamacpp / llama-bench: TTFT {c['ttft_s'] / (n / pp):.2f}x, decode "
                  f"{c['decode_s_per_token'] * tg:.2f}x")
    if get("own-disk") and get("ollm"):
        print(speeds("own-disk / ollm (same placement)", results["own-disk"], results["ollm"], "<= 0.4", "<= 0.4"))
    if get("own") and "second" in results["own"]:
        first_ttft, second = results["own"]["rounds"][0][0], results["own"]["second"]  # both in the first run
        print(f"second question, same process: TTFT {ratio(second['ttft_s'], first_ttft, '<= 0.1')}  "
              f"prefix cache {results['own']['prefix_cache']}")
    if get("own-new-process"):
        fresh = results["own-new-process"]
        print(f"second question, new process (prefix_cache_dir): TTFT "
              f"{ratio(fresh['second']['ttft_s'], results['own']['first']['ttft_s'], '<= 0.1')}  "
              f"prefix cache {fresh['prefix_cache']};  tokens as in the first process: "
              f"{fresh['second']['tokens'] == results['own']['second']['tokens']}")
    if get("own-disk"):
        print(f"plan of own-disk:\n{results['own-disk']['plan']}")


if __name__ == "__main__":
    main()
