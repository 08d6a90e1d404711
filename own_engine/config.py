"""Model configuration parsed from a Hugging Face config.json (Llama, Qwen2, Mistral)."""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch

from .errors import EngineError


SUPPORTED = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM"}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class Llama3Rope(TypedDict):
    """The llama3 rope parameters (rope_parameters or rope_scaling in config.json)."""
    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Llama3Rope | None  # None for plain rope
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    sliding_window: int | None
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype  # the checkpoint's dtype

    @staticmethod
    def load(path: str | Path) -> "ModelConfig":
        file = Path(path) / "config.json"
        if not file.is_file():
            raise EngineError(f"{file}: not found (expected a Hugging Face model folder)")
        try:
            raw = json.loads(file.read_text())
        except (OSError, ValueError) as e:
            raise EngineError(f"{file}: cannot parse: {e}") from None
        gen = Path(path) / "generation_config.json"
        if gen.is_file() and "eos_token_id" in (gen_raw := json.loads(gen.read_text())):
            raw = {**raw, "eos_token_id": gen_raw["eos_token_id"]}  # instruct models list extra stop tokens here
        return ModelConfig.from_dict(raw, source=file)

    @staticmethod
    def from_dict(raw: dict[str, Any], source: str | Path = "config.json") -> "ModelConfig":
        """raw: the parsed config.json."""
        def need(key: str) -> Any:
            if key not in raw:
                raise EngineError(f"{source}: missing field '{key}'")
            return raw[key]

        model_type = need("model_type")
        if model_type not in SUPPORTED:
            raise EngineError(f"{source}: model_type '{model_type}' is not supported "
                              f"(supported: {', '.join(SUPPORTED)})")
        archs = raw.get("architectures") or [SUPPORTED[model_type]]
        if archs != [SUPPORTED[model_type]]:
            raise EngineError(f"{source}: architectures {archs} not supported, expected ['{SUPPORTED[model_type]}']")
        if raw.get("hidden_act", "silu") != "silu":
            raise EngineError(f"{source}: hidden_act '{raw['hidden_act']}' not supported (only 'silu')")
        if raw.get("mlp_bias"):
            raise EngineError(f"{source}: mlp_bias=true is not supported")
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise EngineError(f"{source}: use_sliding_window=true is not supported for qwen2")

        # transformers 5 folds rope_theta into rope_parameters; older files use rope_theta + rope_scaling.
        rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
        rope_theta = float(rope.get("rope_theta", raw.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "llama3"):
            raise EngineError(f"{source}: rope type '{rope_type}' not supported (only default and llama3)")
        scaling = None
        if rope_type == "llama3":
            try:
                scaling = Llama3Rope(factor=float(rope["factor"]), low_freq_factor=float(rope["low_freq_factor"]),
                                     high_freq_factor=float(rope["high_freq_factor"]),
                                     original_max_position_embeddings=int(rope["original_max_position_embeddings"]))
            except (KeyError, TypeError, ValueError) as e:
                raise EngineError(f"{source}: llama3 rope needs the numbers factor, low_freq_factor, high_freq_factor "
                                  f"and original_max_position_embeddings ({e!r})") from None

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        eos = raw.get("eos_token_id")
        dtype_name = raw.get("dtype") or raw.get("torch_dtype") or "float32"
        if dtype_name not in DTYPES:
            raise EngineError(f"{source}: dtype '{dtype_name}' not supported ({', '.join(DTYPES)})")
        return ModelConfig(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=need("intermediate_size"),
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or hidden // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=scaling,
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias")),
            o_bias=model_type != "qwen2" and bool(raw.get("attention_bias")),
            sliding_window=raw.get("sliding_window") if model_type == "mistral" else None,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            dtype=DTYPES[dtype_name],
        )

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensor shapes of one decoder layer, by name relative to `model.layers.{i}.`."""
        h, d = self.hidden_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        shapes = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (self.intermediate_size, h),
            "mlp.up_proj.weight": (self.intermediate_size, h),
            "mlp.down_proj.weight": (h, self.intermediate_size),
        }
        if self.qkv_bias:
            shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,),
                           "self_attn.v_proj.bias": (kv,)})
        if self.o_bias:
            shapes["self_attn.o_proj.bias"] = (h,)
        return shapes

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {"model.embed_tokens.weight": (self.vocab_size, self.hidden_size),
                  "model.norm.weight": (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """K and V of one token in one layer."""
        return 2 * self.num_kv_heads * self.head_dim * dtype.itemsize

