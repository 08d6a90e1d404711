"""The engine computes what transformers computes, in every placement of weights and KV."""
import pytest
import torch

from own_engine import Engine, ModelConfig

from .conftest import MODELS, plan_here

PLACEMENTS = {
    "resident": dict(weights="gpu", kv="gpu"),
    "weights_disk": dict(weights="disk", kv="gpu"),  # packed into aligned per-layer files (the CPU's default)
    "weights_disk_in_place": dict(weights="disk", kv="gpu", pack_weights=False),  # the safetensors mapped
    "kv_disk": dict(weights="gpu", kv="disk"),
    "both_disk": dict(weights="disk", kv="disk"),
    "host": dict(weights="cpu", kv="cpu"),
}
# Small blocks and chunks so 100 tokens cross several KV block and prefill chunk boundaries.
SHAPE = dict(block_size=16, prefill_chunk=24, max_context=160, dtype="float32")


def random_ids(n, seed=1):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def assert_logits_match(engine, hf, ids, prompt_len):
    """Prefill the first prompt_len tokens, then feed the rest one by one, comparing logits at every step."""
    with torch.no_grad():
        ref = hf(ids[None]).logits[0, prompt_len - 1:]
    seqs, logits = engine.prefill([ids[:prompt_len].tolist()])
    got = [logits[0]]
    for t in ids[prompt_len:].tolist():
        got.append(engine.decode_one_token(seqs, [t])[0])
    engine.release(seqs)
    torch.testing.assert_close(torch.stack(got), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", MODELS)
def test_logits_match_hf(tiny_model, name, placement, tmp_path):
    path, hf = tiny_model(name)
    with Engine.from_pretrained(path, **PLACEMENTS[placement], **SHAPE, offload_dir=tmp_path / "off") as engine:
        assert_logits_match(engine, hf, random_ids(100), prompt_len=70)


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("name", ["llama_gqa2", "llama3_gqa4", "qwen2_bias_tied", "mistral_window"])
def test_greedy_generation_matches_hf(tiny_model, name, placement, tmp_path):
    path, hf = tiny_model(name)
    prompt = random_ids(37, seed=2)
    expected = hf.generate(prompt[None], attention_mask=torch.ones(1, 37, dtype=torch.long), max_new_tokens=64,
                           min_new_tokens=64, do_sample=False)[0, 37:].tolist()
    with Engine.from_pretrained(path, **PLACEMENTS[placement], **SHAPE, offload_dir=tmp_path / "off") as engine:
        assert engine.generate(prompt.tolist(), max_new_tokens=64) == expected
    assert len(set(expected)) > 5  # the random model does not just repeat one token


def mixed_budget(path, **shape):
    """The smallest budget whose auto plan has resident and streamed layers and KV on the device and on disk."""
    cfg = ModelConfig.load(path)
    full = plan_here(cfg, **shape)
    for budget in range(full.device_bytes // 2, full.device_bytes, full.block_bytes):
        plan = plan_here(cfg, vram_budget=budget, **shape)
        if 0 < plan.count("device") < cfg.num_layers and plan.kv_blocks["device"] >= 3:
            return budget, plan
    raise AssertionError("no mixed plan found")


def test_auto_plan_with_mixed_tiers_matches_hf(tiny_model, tmp_path):
    path, hf = tiny_model("llama_gqa2")
    budget, plan = mixed_budget(path, **SHAPE)
    assert plan.kv_blocks["disk"] > 0 and plan.embed_tier == "disk" and plan.count("disk") > 0
    with Engine.from_pretrained(path, vram_budget=budget, **SHAPE, offload_dir=tmp_path / "off") as engine:
        assert engine.plan.layer_tiers == plan.layer_tiers
        assert_logits_match(engine, hf, random_ids(100), prompt_len=60)


def test_bfloat16_checkpoint_packed_for_float32(tiny_model, tmp_path):
    """A bf16 checkpoint run in fp32 with weights on disk is converted once into per-layer packed files."""
    path, hf = tiny_model("llama_bf16")
    off = tmp_path / "off"
    with Engine.from_pretrained(path, weights="disk", kv="disk", **SHAPE, offload_dir=off) as engine:
        assert sorted(p.name for p in (off / "weights").iterdir()) == ["layer_000.bin", "layer_001.bin",
                                                                         "manifest.json"]
        assert_logits_match(engine, hf, random_ids(100), prompt_len=70)


@pytest.fixture(scope="module")
def hf_bfloat16(tiny_model):
    """(path, HF logits in bf16 compute with SDPA, HF logits in fp32 compute) on the bf16 checkpoint, prompt of 70
    then 30 tokens fed one by one."""
    from transformers import AutoModelForCausalLM

    path, hf32 = tiny_model("llama_bf16")
    hf16 = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="sdpa").eval()
    ids = random_ids(100)
    with torch.no_grad():
        return path, ids, hf16(ids[None]).logits[0, 69:].float(), hf32(ids[None]).logits[0, 69:]


@pytest.mark.parametrize("placement", PLACEMENTS)
@pytest.mark.parametrize("compute", [None, "bfloat16"])
def test_bfloat16_logits_match_hf_bfloat16(hf_bfloat16, placement, compute, tmp_path):
    """Weights stored in bf16. Compute in the plan's choice (float32 on a CPU without bf16 instructions, decode
    matmuls on the bf16 weights as stored) or forced to bf16 (what CUDA runs): logits within twice HF bf16's own
    distance from fp32 compute, not tokens."""
    path, ids, ref16, ref32 = hf_bfloat16
    bf16_error = (ref16 - ref32).abs().max()
    shape = {**SHAPE, "dtype": None}
    with Engine.from_pretrained(path, **PLACEMENTS[placement], **shape, compute_dtype=compute,
                                offload_dir=tmp_path / "off") as engine:
        seqs, logits = engine.prefill([ids[:70].tolist()])
        got = torch.stack([logits[0]] + [engine.decode_one_token(seqs, [t])[0] for t in ids[70:].tolist()])
    assert engine.dtype == torch.bfloat16
    assert (got - ref16).abs().max() <= 2 * bf16_error
