"""Random-weight models of real architectures, built locally: no weights can be downloaded here.

A synthetic model is an ordinary HF folder (config.json, safetensors shards, tokenizer.json,
tokenizer_config.json with a chat template), so every engine loads it like a real checkpoint. Weights are drawn
tensor by tensor and written shard by shard, so even an 8B model is built without holding it in memory. The
tokenizer is a byte-level BPE trained offline with `tokenizers`, padded with reserved special tokens to exactly
the architecture's vocabulary size (as Llama 3 does).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import sys
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Any

from harness.core.files import cache_root

BUILDER_VERSION = 2
BOS, EOS, EOT = "<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"
SPECIAL = [BOS, EOS, "<|start_header_id|>", "<|end_header_id|>", EOT]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# What the Llama 3.1 and 3.2 configs share: the 128K-token vocabulary and context, rope, norm, 8 KV heads, bf16.
_LLAMA3: dict[str, Any] = dict(
    model_type="llama", num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
    rope_theta=500000.0, rms_norm_eps=1e-5, torch_dtype="bfloat16", bpe_vocab=16384)

# Hyperparameters of the published configs; `bpe_vocab` is how much of the vocab the BPE learns, the rest is reserved.
PRESETS: dict[str, dict[str, Any]] = {
    "tiny-llama": dict(
        model_type="llama", hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=4, vocab_size=4096, max_position_embeddings=4096, rope_theta=500000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="float32", bpe_vocab=4096),
    "llama-3.2-1b": dict(
        _LLAMA3, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, head_dim=64,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True),
    "llama-3.2-3b": dict(
        _LLAMA3, hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, tie_word_embeddings=True),
    "llama-3.1-8b": dict(
        _LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, tie_word_embeddings=False),
    "llama-2-7b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rope_theta=10000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16", bpe_vocab=16384),
    "qwen2.5-7b": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6, tie_word_embeddings=False, torch_dtype="bfloat16", bpe_vocab=16384,
        use_sliding_window=False, sliding_window=None, max_window_layers=28),
    "mistral-7b": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, tie_word_embeddings=False, torch_dtype="bfloat16", bpe_vocab=16384, sliding_window=None),
}
# A context for 32k-token documents plus their answers (scenarios/documents.yaml), and narrower than tiny-llama
# (2 layers of 2 heads, 64 wide): attention grows with the square of the prompt, and at this width a 32k-token
# prefill takes ~4 s on 2 cores (tiny-llama's 4 layers of 256: ~30 s), so an engine without prefix reuse can answer
# every question about a 32k-token document in minutes.
PRESETS["tiny-llama-40k"] = dict(PRESETS["tiny-llama"], hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=40960)
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
MAX_SHARD_BYTES = 2 * 2**30


def hf_config(preset: str | dict[str, Any]) -> dict[str, Any]:
    """config.json of a preset, given by name or as a dict shaped like a PRESETS entry (for custom sizes)."""
    p = {k: v for k, v in (PRESETS[preset] if isinstance(preset, str) else preset).items() if k != "bpe_vocab"}
    return {"architectures": [ARCHITECTURES[p["model_type"]]], **p, "hidden_act": "silu", "attention_bias": False,
            "bos_token_id": 0, "eos_token_id": 1, "initializer_range": 0.02, "use_cache": True}


def parameter_count(config: dict[str, Any]) -> int:
    return sum(_numel(shape) for _, shape in tensor_shapes(config))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def tensor_shapes(c: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the HF checkpoint, by name, in file order."""
    h, inter, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (q, h)),
                   (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                   (p + "self_attn.o_proj.weight", (h, q)), (p + "post_attention_layernorm.weight", (h,)),
                   (p + "mlp.gate_proj.weight", (inter, h)), (p + "mlp.up_proj.weight", (inter, h)),
                   (p + "mlp.down_proj.weight", (h, inter))]
        if c["model_type"] == "qwen2":
            shapes += [(p + "self_attn.q_proj.bias", (q,)), (p + "self_attn.k_proj.bias", (kv,)),
                       (p + "self_attn.v_proj.bias", (kv,))]
    shapes.append(("model.norm.weight", (h,)))
    if not c["tie_word_embeddings"]:
        shapes.append(("lm_head.weight", (v, h)))
    return shapes


def synth_model(preset: str | dict[str, Any], out_dir: Path, seed: int = 0, progress=None) -> Path:
    """Write a random-weight HF folder for `preset` (a name, or a dict shaped like a PRESETS entry) into out_dir
    (which must not exist or be empty)."""
    import torch
    from safetensors.torch import save_file

    config = hf_config(preset)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = getattr(torch, config["torch_dtype"])
    shapes = tensor_shapes(config)
    shard: dict[str, Any] = {}
    shard_bytes, shards, weight_map = 0, [], {}

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(shards) + 1:05d}.safetensors"
        save_file(shard, out_dir / name, metadata={"format": "pt"})
        shards.append(name)
        weight_map.update({k: name for k in shard})
        shard, shard_bytes = {}, 0

    for i, (name, shape) in enumerate(shapes):
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if name.endswith("norm.weight"):
            t = torch.ones(shape, dtype=dtype)
        else:
            t = (torch.randn(shape, generator=g) * config["initializer_range"]).to(dtype)
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > MAX_SHARD_BYTES:
            flush()
        shard[name], shard_bytes = t, shard_bytes + nbytes
        if progress:
            progress(i + 1, len(shapes))
    flush()
    if len(shards) == 1:
        (out_dir / shards[0]).rename(out_dir / "model.safetensors")
    else:
        total = sum(_numel(s) for _, s in shapes) * torch.finfo(dtype).bits // 8
        (out_dir / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 0, "eos_token_id": 1, "do_sample": False}, indent=2))
    write_tokenizer(out_dir, config["vocab_size"], (PRESETS[preset] if isinstance(preset, str) else preset)["bpe_vocab"], seed)
    return out_dir


def write_tokenizer(out_dir: Path, vocab_size: int, bpe_vocab: int, seed: int) -> None:
    """A byte-level BPE trained on seeded text, padded with reserved special tokens to exactly vocab_size."""
    import numpy as np
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from harness.inputs.exact import WORDS

    rng = np.random.default_rng(seed)
    letters = np.array(list("etaoinshrdlucmfwypvbgkjqxz"))
    pseudo = ["".join(rng.choice(letters, size=rng.integers(3, 11))) for _ in range(max(4 * bpe_vocab, 20000))]
    corpus = [" ".join(rng.choice(WORDS + pseudo, size=64)) for _ in range(2000)]
    # Every common word becomes a single token, with and without its leading space, so prompts have exact lengths.
    corpus += [" ".join(WORDS)] * 200 + WORDS * 200

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    n_learned = min(bpe_vocab, vocab_size)
    trainer = trainers.BpeTrainer(vocab_size=n_learned, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(vocab_size - tok.get_vocab_size())]
    tok.add_special_tokens(reserved)
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, expected {vocab_size}")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    tok.save(str(out_dir / "tokenizer.json"))
    # Classic fields too, so older transformers and llama.cpp's tooling read the folder as well as transformers 5.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS, "pad_token": EOS,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 1 << 20, "chat_template": CHAT_TEMPLATE, "additional_special_tokens": [EOT],
        "model_input_names": ["input_ids", "attention_mask"]}, indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "additional_special_tokens": [EOT]}, indent=2))


def synthetic_dir(preset: str, seed: int = 0) -> Path:
    """Where the folder for (preset, seed) is cached, built or not. Keyed by everything that changes the bytes, torch
    included (random init is reproducible only within one torch version), read without importing torch."""
    key = json.dumps([hf_config(preset), PRESETS[preset]["bpe_vocab"], seed, BUILDER_VERSION,
                      importlib.metadata.version("torch"), importlib.metadata.version("tokenizers")], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{preset}-seed{seed}-{digest}"


def cached_synthetic(preset: str, seed: int = 0, progress=None) -> Path:
    """The folder for (preset, seed), built on first use."""
    final = synthetic_dir(preset, seed)
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        synth_model(preset, tmp, seed, progress)
        tmp.rename(final)  # atomic: a concurrent builder's finished copy wins, ours is dropped below
    except OSError:
        if not (final / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


if __name__ == "__main__":  # `python -m harness.inputs.models PRESET SEED`: the runner builds here, torch stays out of it
    print(cached_synthetic(sys.argv[1], int(sys.argv[2])))
