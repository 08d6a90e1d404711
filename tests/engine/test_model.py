"""The decoder's small pieces compute transformers' numbers: rope from tables that grow with the positions, RMSNorm."""
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from own_engine import ModelConfig
from own_engine.model import Rope, apply_rope, rms_norm

CFG = ModelConfig.from_dict({"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 64,
                             "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                             "rope_theta": 500000.0})


def test_rope_tables_grow_with_the_positions_and_rotate_as_transformers_does():
    rope = Rope(CFG, torch.device("cpu"), torch.float32)
    gen = torch.Generator().manual_seed(0)
    for positions in (torch.arange(5), torch.tensor([3, 700, 701]), torch.arange(2000, 2003)):
        before = len(rope.cos)
        cos, sin = rope.tables(positions, int(positions.max()) + 1)
        assert len(rope.cos) >= max(before, int(positions.max()) + 1)  # grown only when a position is past them
        angles = positions[:, None].float() * rope.inv_freq[None, :]
        ref_cos, ref_sin = torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin()
        q, k = torch.randn(len(positions), 4, 16, generator=gen), torch.randn(len(positions), 2, 16, generator=gen)
        ref_q, ref_k = apply_rotary_pos_emb(q, k, ref_cos, ref_sin, unsqueeze_dim=1)
        assert torch.equal(apply_rope(q, cos, sin), ref_q)  # the same products, bit for bit
        assert torch.equal(apply_rope(k, cos, sin), ref_k)


def test_rms_norm_is_transformers_in_both_dtypes():
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.rand(64, generator=gen) + 0.5)
        x = torch.randn(7, 64, generator=gen).to(dtype)
        assert torch.equal(rms_norm(x, norm.weight.detach(), 1e-5), norm(x).detach())
