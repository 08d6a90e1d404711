"""Tiny random Hugging Face models, each built and saved once per test session."""
import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

COMMON = dict(vocab_size=512, hidden_size=64, intermediate_size=160, max_position_embeddings=1024,
              initializer_range=0.1, bos_token_id=None, eos_token_id=None)

# name -> (config, model class, save options). The mix covers GQA ratios 1, 2 and 4, odd layer counts,
# tied and untied embeddings, llama3 rope scaling with an explicit head_dim, qwen2 qkv bias, mistral's
# sliding window, llama's attention_bias (q, k, v and o), a sharded checkpoint and a bfloat16 one.
MODELS = {
    "llama_gqa2": (LlamaConfig(**COMMON, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2),
                   LlamaForCausalLM, {}),
    "llama_mha_tied_sharded": (LlamaConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4,
                                           num_key_value_heads=4, tie_word_embeddings=True),
                               LlamaForCausalLM, {"max_shard_size": "100KB"}),
    "llama3_gqa4": (LlamaConfig(**COMMON, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2,
                                head_dim=32, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                           "original_max_position_embeddings": 32}),
                    LlamaForCausalLM, {}),
    "qwen2_bias_tied": (Qwen2Config(**COMMON, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                    tie_word_embeddings=True), Qwen2ForCausalLM, {}),
    "qwen2_untied": (Qwen2Config(**COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1),
                     Qwen2ForCausalLM, {}),
    "mistral_window": (MistralConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1,
                                     sliding_window=40), MistralForCausalLM, {}),
    "llama_attention_bias": (LlamaConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         attention_bias=True), LlamaForCausalLM, {}),
    "llama_bf16": (LlamaConfig(**COMMON, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
                   LlamaForCausalLM, {"dtype": torch.bfloat16}),
    # Llama-3's attention shape (4 query heads per KV head of 64), the one our decode kernel takes (native.py)
    "llama_bf16_gqa4": (LlamaConfig(**{**COMMON, "hidden_size": 128}, num_hidden_layers=2, num_attention_heads=8,
                                    num_key_value_heads=2, head_dim=64), LlamaForCausalLM, {"dtype": torch.bfloat16}),
}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name) -> (path, HF model in float32, eval mode)."""
    built = {}

    def get(name):
        if name not in built:
            config, cls, options = MODELS[name]
            torch.manual_seed(sum(map(ord, name)))
            model = cls(config).eval()
            with torch.no_grad():  # transformers initialises biases to 0 and norms to 1: make them count
                for param_name, param in model.named_parameters():
                    if param_name.endswith("bias"):
                        param.normal_(0, 0.1)
                    elif "norm" in param_name:
                        param.uniform_(0.5, 1.5)
            path = tmp_path_factory.mktemp(name)
            if "dtype" in options:
                model.to(options["dtype"]).save_pretrained(path, safe_serialization=True)
                model = cls.from_pretrained(path, dtype=torch.float32).eval()  # the rounded weights, in fp32
            else:
                model.save_pretrained(path, safe_serialization=True, max_shard_size=options.get("max_shard_size",
                                                                                               "50GB"))
            built[name] = (path, model)
        return built[name]

    return get


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy shared machine the threads wait on each
    other for every small op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plan_here(cfg, **options):
    """make_plan for these options on this machine, as Engine plans."""
    from own_engine import EngineConfig, Machine, make_plan

    config = EngineConfig(**options)
    return make_plan(cfg, config, Machine.here(cfg, config))


# Instruction-set flags of the kinds of CPU this engine meets (as /proc/cpuinfo lists them, abridged).
AVX2 = frozenset({"sse4_2", "avx", "avx2", "fma", "f16c"})  # no bf16 instructions
EPYC = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"}  # AMD EPYC (Zen 4)
XEON_AMX = EPYC | {"avx512_fp16", "amx_tile", "amx_bf16", "amx_int8"}  # Intel Xeon (Sapphire Rapids)


@pytest.fixture
def fake_cpu(monkeypatch):
    """fake_cpu(flags, narrow_rows=8): the compute policy sees a CPU with these flags, and its micro-benchmarks
    answer as measured on the AVX2 CPU (a decode step of the 201M benchmark model: 4 rows 118 ms reading bf16 as
    stored vs 190 ms upcast, 8 rows 191 vs 186) and, for the products' forms, as on the Xeon (torch.mv for 1 row,
    (w @ x.T).T for 2 to 63). Returns the list of (stored, compute) crossovers it was asked to measure; the forms
    it was asked for are in its `.forms` (dtypes, in order)."""
    from own_engine.compute import Crossover, MatmulForms, dtype_name

    asked, forms = [], []

    def fake(flags, narrow_rows=8):
        def crossover(stored, compute):
            asked.append((stored, compute))
            return Crossover(narrow_rows, (4, 8), (0.118, 0.191), (0.190, 0.186), None, False)

        def matmul_forms(dtype):
            forms.append(dtype)
            return MatmulForms(dtype_name(dtype), (1, 2, 64), ("gemv", "wxt", "linear"),
                               {"linear": (4e-4, 4e-4, 5e-4), "gemv": (3e-4, None, None), "wxt": (4e-4, 3e-4, 6e-4)},
                               None, False)

        monkeypatch.setattr("own_engine.compute.cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr("own_engine.compute.crossover", crossover)
        monkeypatch.setattr("own_engine.compute.matmul_forms", matmul_forms)
        return asked

    fake.forms = forms
    return fake


def slots(table: list[int], block_size: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(block id, offset in block) of each of a sequence's positions, as a pass prepares them (batch.prepare)."""
    return torch.tensor(table)[positions // block_size], positions % block_size
