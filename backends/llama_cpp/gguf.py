"""HF model folder → GGUF file for llama.cpp, written with the `gguf` package's GGUFWriter.

The pip wheel of llama-cpp-python ships no `convert_hf_to_gguf.py`, so this is the part of it we need: the llama
architecture (HF `llama` and `mistral` folders) with a byte-level BPE tokenizer from `tokenizer.json`. Tensors are
read, converted and written one at a time, so an 8B model converts without holding it in memory.

Types: f32, f16, bf16 and q8_0 are written here (q8_0 by `gguf.quants`); other llama.cpp types (q4_k_m, q6_k, ...)
are made by llama.cpp's own quantizer (`llama_cpp.llama_model_quantize`) from a lossless GGUF of the checkpoint.
Converted files are cached under `cache_root()/gguf`, keyed by the source folder's path, file sizes and mtimes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness.core.files import cache_root

CONVERTER_VERSION = 1
WRITTEN_TYPES = ("f32", "f16", "bf16", "q8_0")
QUANTIZER_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m",
                   "q5_k_s", "q5_k_m", "q6_k")
GGUF_TYPES = WRITTEN_TYPES + QUANTIZER_TYPES
LLAMA_ARCH_MODEL_TYPES = ("llama", "mistral")  # convert_hf_to_gguf maps both to the llama architecture

# Pre-tokenizer regexes llama.cpp knows by name (llama-vocab.cpp); a plain ByteLevel pre-tokenizer is GPT-2's.
_LLAMA3_REGEX = ("(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*"
                 "|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+")
_PRE_BY_REGEX = {_LLAMA3_REGEX: "llama-bpe"}


class GGUFError(Exception):
    """The folder cannot be converted (unsupported architecture, tokenizer or type): a message for the user."""


ProgressFn = Callable[[int, int], None]


# ---- conversion ---------------------------------------------------------------------------------------------------

def convert(hf_dir: Path | str, out: Path | str, gguf_type: str = "f32", progress: ProgressFn | None = None) -> Path:
    """Write `out` (atomically) from the HF folder `hf_dir` in `gguf_type`."""
    hf_dir, out = Path(hf_dir), Path(out)
    if gguf_type not in GGUF_TYPES:
        raise GGUFError(f"unknown GGUF type {gguf_type!r}; expected one of {', '.join(GGUF_TYPES)}")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        if gguf_type in WRITTEN_TYPES:
            _write(hf_dir, tmp, gguf_type, progress)
        else:
            _quantize(cached_gguf(hf_dir, _lossless_type(hf_dir), progress), tmp, gguf_type)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def cached_gguf(hf_dir: Path | str, gguf_type: str = "f32", progress: ProgressFn | None = None) -> Path:
    """The GGUF of `hf_dir` in `gguf_type`, converted on first use; a changed source file gives a new key."""
    hf_dir = Path(hf_dir).resolve()
    path = cache_root() / "gguf" / f"{hf_dir.name}-{_source_key(hf_dir, gguf_type)}-{gguf_type}.gguf"
    if not path.is_file():
        convert(hf_dir, path, gguf_type, progress)
    return path


def _source_key(hf_dir: Path, gguf_type: str) -> str:
    import gguf

    files = sorted(p for p in hf_dir.iterdir() if p.is_file() and p.suffix in (".json", ".safetensors", ".jinja"))
    stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    key = json.dumps([str(hf_dir), stamp, gguf_type, CONVERTER_VERSION, _gguf_version(gguf)])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _gguf_version(gguf) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return getattr(gguf, "__version__", "unknown")


def _lossless_type(hf_dir: Path) -> str:
    """The GGUF type the quantizer starts from: the checkpoint's own precision, so nothing is rounded twice."""
    dtype = _config(hf_dir).get("torch_dtype") or _config(hf_dir).get("dtype")
    return {"bfloat16": "bf16", "float16": "f16"}.get(dtype, "f32")


def _quantize(src: Path, dst: Path, gguf_type: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{gguf_type.upper()}")
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise GGUFError(f"llama.cpp's quantizer failed to make {gguf_type} from {src}")


def _config(hf_dir: Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not path.is_file():
        raise GGUFError(f"{hf_dir}: expected an HF model folder with config.json")
    return json.loads(path.read_text())


@dataclass
class _Hparams:
    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_vocab: int
    n_ctx_train: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    rms_eps: float
    dtype: str

    @classmethod
    def read(cls, hf_dir: Path) -> _Hparams:
        c = _config(hf_dir)
        if c.get("model_type") not in LLAMA_ARCH_MODEL_TYPES:
            raise GGUFError(f"{hf_dir}/config.json: model_type {c.get('model_type')!r} is not supported by the GGUF "
                            f"converter; expected one of {', '.join(LLAMA_ARCH_MODEL_TYPES)}")
        # transformers 5 folds rope_theta and rope_scaling into rope_parameters.
        rope = c.get("rope_parameters") or {}
        scaling = c.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
        return cls(n_layers=c["num_hidden_layers"], n_embd=c["hidden_size"], n_ff=c["intermediate_size"],
                   n_head=c["num_attention_heads"], n_head_kv=c.get("num_key_value_heads") or c["num_attention_heads"],
                   head_dim=c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"],
                   n_vocab=c["vocab_size"], n_ctx_train=c.get("max_position_embeddings", 4096),
                   rope_theta=float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                   rope_scaling=scaling, rms_eps=float(c.get("rms_norm_eps", 1e-5)),
                   dtype=c.get("torch_dtype") or c.get("dtype") or "float32")


def _write(hf_dir: Path, out: Path, gguf_type: str, progress: ProgressFn | None) -> None:
    import gguf
    import numpy as np

    hp = _Hparams.read(hf_dir)
    w = gguf.GGUFWriter(out, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    w.add_name(hf_dir.name)
    w.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                     "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[gguf_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(hp.n_vocab)
    w.add_context_length(hp.n_ctx_train)
    w.add_embedding_length(hp.n_embd)
    w.add_block_count(hp.n_layers)
    w.add_feed_forward_length(hp.n_ff)
    w.add_head_count(hp.n_head)
    w.add_head_count_kv(hp.n_head_kv)
    w.add_rope_dimension_count(hp.head_dim)
    if hp.head_dim != hp.n_embd // hp.n_head:
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
    w.add_rope_freq_base(hp.rope_theta)
    w.add_layer_norm_rms_eps(hp.rms_eps)
    extra = _rope_tensors(hp, w)
    _write_tokenizer(hf_dir, hp.n_vocab, w)

    # Two passes: tensor infos (shapes, types, sizes) go in the header, then the data, one tensor at a time.
    plan = _tensor_plan(hf_dir, hp, gguf_type)
    for _, gguf_name, shape, qtype in plan:
        # Any dtype but uint8 tells the writer that `shape` is the logical shape, not a byte shape.
        w.add_tensor_info(gguf_name, shape, np.dtype(np.float32), _nbytes(shape, qtype), raw_dtype=qtype)
    for gguf_name, array in extra:
        w.add_tensor_info(gguf_name, array.shape, array.dtype, array.nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    with _SafetensorsFolder(hf_dir) as tensors:
        for i, (name, _, _, qtype) in enumerate(plan):
            w.write_tensor_data(_encode(_prepare(name, tensors.get(name), hp), qtype))
            if progress:
                progress(i + 1, len(plan))
    for _, array in extra:
        w.write_tensor_data(array)
    w.close()


def _target_type(shape: tuple[int, ...], gguf_type: str):
    """1-D tensors (norms) stay f32, as llama.cpp's converter keeps them; q8_0 needs rows of whole 32-blocks."""
    from gguf import GGMLQuantizationType as Q

    if len(shape) == 1 or gguf_type == "f32":
        return Q.F32
    if gguf_type == "q8_0" and shape[-1] % 32:
        return Q.F16
    return {"f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[gguf_type]


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    from gguf import GGML_QUANT_SIZES

    block, type_size = GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * type_size


def _encode(t, qtype):
    """A torch tensor in the file's layout for `qtype` (numpy; bf16 as its raw 16-bit patterns)."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    if qtype == Q.F32:
        return t.to(torch.float32).numpy()
    if qtype == Q.F16:
        return t.to(torch.float16).numpy()
    if qtype == Q.BF16:
        return t.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return quantize(t.to(torch.float32).numpy(), qtype)


def _prepare(name: str, t, hp: _Hparams):
    """HF stores q/k rotary halves split; llama.cpp's llama arch wants them interleaved (convert_hf_to_gguf's permute)."""
    if name.endswith("self_attn.q_proj.weight"):
        return _permute(t, hp.n_head)
    if name.endswith("self_attn.k_proj.weight"):
        return _permute(t, hp.n_head_kv)
    return t


def _permute(w, n_head: int):
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def _tensor_plan(hf_dir: Path, hp: _Hparams, gguf_type: str) -> list[tuple[str, str, tuple[int, ...], Any]]:
    """(HF name, GGUF name, shape, GGML type) of every tensor, in checkpoint order."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, hp.n_layers)
    plan = []
    for name, shape in _shapes(hf_dir).items():
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_freq_base
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"{hf_dir}: tensor {name!r} has no llama.cpp counterpart; the checkpoint is not a plain "
                            "Llama-family model")
        plan.append((name, gguf_name, shape, _target_type(shape, gguf_type)))
    return plan


def _shapes(hf_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from the safetensors headers, in file order, without reading any data."""
    shapes: dict[str, tuple[int, ...]] = {}
    for f in _safetensors_files(hf_dir):
        with f.open("rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                                 key=lambda kv: kv[1]["data_offsets"][0]):
            shapes[name] = tuple(info["shape"])
    return shapes


def _safetensors_files(hf_dir: Path) -> list[Path]:
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise GGUFError(f"{hf_dir}: no *.safetensors files (only safetensors checkpoints are converted)")
    return files


class _SafetensorsFolder:
    """Every tensor of a (possibly sharded) checkpoint by name, loaded one at a time."""

    def __init__(self, hf_dir: Path):
        from safetensors import safe_open

        self.handles = [safe_open(str(f), framework="pt") for f in _safetensors_files(hf_dir)]
        self.where = {k: h for h in self.handles for k in h.keys()}

    def get(self, name: str):
        return self.where[name].get_tensor(name)

    def __enter__(self) -> _SafetensorsFolder:
        return self

    def __exit__(self, *exc) -> None:
        self.handles = []
        self.where = {}


def _rope_tensors(hp: _Hparams, w) -> list[tuple[str, Any]]:
    """Rope scaling: linear as metadata, Llama 3's as per-frequency factors (convert_hf_to_gguf's rope_freqs)."""
    import gguf
    import numpy as np

    s = hp.rope_scaling
    if not s:
        return []
    kind = (s.get("rope_type") or s.get("type") or "").lower()
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(s["factor"]))
        return []
    if kind != "llama3":
        raise GGUFError(f"rope scaling {kind!r} is not supported by the GGUF converter (linear and llama3 are)")
    factor = s.get("factor", 8.0)
    low, high = s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_ctx = s.get("original_max_position_embeddings", 8192)
    freqs = 1.0 / (hp.rope_theta ** (np.arange(0, hp.head_dim, 2, dtype=np.float32) / hp.head_dim))
    factors = []
    for f in freqs:
        wavelen = 2 * math.pi / f
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", np.asarray(factors, dtype=np.float32))]


def _write_tokenizer(hf_dir: Path, n_vocab: int, w) -> None:
    import gguf

    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise GGUFError(f"{hf_dir}: no tokenizer.json; the converter reads byte-level BPE tokenizers from it")
    tok = json.loads(path.read_text())
    if tok.get("model", {}).get("type") != "BPE" or tok["model"].get("byte_fallback"):
        raise GGUFError(f"{path}: only byte-level BPE tokenizers (GPT-2 / Llama 3 style) are supported")
    tokens: list[str | None] = [None] * n_vocab
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in tok["model"]["vocab"].items():
        if i < n_vocab:
            tokens[i], types[i] = text, gguf.TokenType.NORMAL
    for added in tok.get("added_tokens", []):
        if added["id"] < n_vocab:
            tokens[added["id"]] = added["content"]
            types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(_pre_tokenizer(path, tok.get("pre_tokenizer")))
    w.add_token_list([t if t is not None else f"[PAD{i}]" for i, t in enumerate(tokens)])
    w.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=True, n_vocab=n_vocab).add_to_gguf(w, quiet=True)


def _pre_tokenizer(path: Path, pre: dict[str, Any] | None) -> str:
    if pre and pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if pre and pre.get("type") == "Sequence":
        regexes = [p.get("pattern", {}).get("Regex") for p in pre.get("pretokenizers", []) if p.get("type") == "Split"]
        if len(regexes) == 1 and regexes[0] in _PRE_BY_REGEX:
            return _PRE_BY_REGEX[regexes[0]]
    raise GGUFError(f"{path}: pre-tokenizer {json.dumps(pre)[:200]} is not one llama.cpp knows by name "
                    "(supported: GPT-2 ByteLevel, Llama 3)")


# ---- reading back ---------------------------------------------------------------------------------------------------

@dataclass
class GGUFLayout:
    """What placing a GGUF on a GPU needs: bytes per repeating layer and of the output head, and the KV shape."""
    n_layers: int
    layer_bytes: list[int]
    output_bytes: int  # output norm + lm_head (token_embd when tied: llama.cpp then keeps a copy for the output)
    n_embd_k_gqa: int  # K width per token per layer (n_head_kv × head_dim); V is the same for the llama arch
    n_embd_v_gqa: int
    n_vocab: int
    n_ctx_train: int
    file_type: str


def read_layout(path: Path | str) -> GGUFLayout:
    from gguf import GGUFReader

    r = GGUFReader(path)
    arch = r.get_field("general.architecture").contents()

    def field(key: str, default=None):
        f = r.get_field(f"{arch}.{key}")
        return f.contents() if f is not None else default

    n_layers = field("block_count")
    layer_bytes = [0] * n_layers
    output_bytes, tied = 0, True
    for t in r.tensors:
        if t.name.startswith("blk."):
            layer_bytes[int(t.name.split(".")[1])] += int(t.n_bytes)
        elif t.name.startswith(("output.", "output_norm.")):
            output_bytes += int(t.n_bytes)
            tied = tied and not t.name.startswith("output.")
    if tied:
        output_bytes += next(int(t.n_bytes) for t in r.tensors if t.name.startswith("token_embd."))
    n_head, n_embd = field("attention.head_count"), field("embedding_length")
    n_head_kv = field("attention.head_count_kv", n_head)
    head_k = field("attention.key_length", n_embd // n_head)
    head_v = field("attention.value_length", n_embd // n_head)
    ftype = r.get_field("general.file_type")
    return GGUFLayout(n_layers=n_layers, layer_bytes=layer_bytes, output_bytes=output_bytes,
                      n_embd_k_gqa=n_head_kv * head_k, n_embd_v_gqa=n_head_kv * head_v,
                      n_vocab=len(r.get_field("tokenizer.ggml.tokens").contents()),
                      n_ctx_train=field("context_length", 0),
                      file_type=_file_type_name(ftype.contents()) if ftype is not None else "unknown")


def _file_type_name(value: int) -> str:
    from gguf import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_").removeprefix("ALL_").lower()
    except ValueError:
        return str(value)
