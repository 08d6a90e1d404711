"""One timed greedy generation through oLLM's generate(): its disk-offloading Llama streams every decoder layer from
the safetensors on each forward and keeps the prompt's KV in per-layer files under --kv-dir.

Run by benchmarks/engine_cpu.py under .venv-ollm/bin/python (oLLM pins transformers 4.57).
Prints one JSON line last: tokens, load_s, ttft_s, decode_s_per_token, peak_rss_self.
"""
import argparse
import json
import resource
import time

import torch


class TokenTimes:
    """A generate() streamer that stamps each new token; generate's first put() is the prompt itself."""

    def __init__(self):
        self.prompt_seen, self.times, self.tokens = False, [], []

    def put(self, ids: torch.Tensor):
        if self.prompt_seen:
            self.times.append(time.perf_counter())
            self.tokens += ids.view(-1).tolist()
        self.prompt_seen = True

    def end(self):
        pass


def load(model: str, kv_dir: str):
    """The model and the extra generate() arguments it needs."""
    # AutoInference takes a local HF folder; Inference(model_id).ini_model() would download by name.
    from ollm import AutoInference

    inference = AutoInference(model, device="cpu", logging=False)
    return inference.model, {"past_key_values": inference.DiskCache(cache_dir=kv_dir)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="HF Llama folder, bf16 safetensors")
    parser.add_argument("--prompt-ids", required=True, help="JSON file with a list of token ids")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--kv-dir", required=True, help="where oLLM writes its KV files")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.prompt_ids) as f:
        ids = torch.tensor([json.load(f)])

    start = time.perf_counter()
    model, extra = load(args.model, args.kv_dir)
    loaded = time.perf_counter()
    stream = TokenTimes()
    # min_new_tokens = max_new_tokens masks EOS: a fixed output length, like ignore_eos. generate() runs under
    # no_grad by itself.
    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.new_tokens,
                   min_new_tokens=args.new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
                   pad_token_id=model.config.eos_token_id, streamer=stream, **extra)
    times = stream.times
    print(json.dumps({"tokens": stream.tokens, "load_s": loaded - start, "ttft_s": times[0] - loaded,
                      "decode_s_per_token": (times[-1] - times[0]) / (len(times) - 1),
                      "peak_rss_self": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))


if __name__ == "__main__":
    main()
