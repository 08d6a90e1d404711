"""Safetensors checkpoints read a tensor or a layer at a time (never the whole model), and per-layer packing."""
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import ModelConfig
from .errors import EngineError
from .mapped import Mapped
from .stats import EngineStats

ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
ALIGN = 256  # byte alignment of each tensor inside a flat layer buffer, enough for any GPU kernel


@dataclass(frozen=True)
class TensorEntry:
    file: Path
    offset: int  # absolute byte offset of the data in the file
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_into(fd: int, offset: int, out: torch.Tensor) -> None:
    """Fill a contiguous CPU tensor from a file; the kernel copies straight into it and the GIL is released."""
    view = out.view(-1).view(torch.uint8).numpy().data
    done = 0
    while done < len(view):  # preadv may return short counts (at most ~2 GiB per call on Linux)
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise EngineError(f"unexpected end of file (fd {fd}) at byte {offset + done}")
        done += n


def read_header(file: Path) -> dict[str, TensorEntry]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 0 or n > size - 8:
            raise EngineError(f"{file}: truncated or corrupt safetensors header ({size} bytes on disk)")
        try:
            meta = json.loads(f.read(n))
            entries = {}
            for name, info in meta.items():
                if name == "__metadata__":
                    continue
                if info["dtype"] not in ST_DTYPES:
                    raise EngineError(f"{file}: tensor {name} has unsupported dtype {info['dtype']}")
                start, end = info["data_offsets"]
                entries[name] = TensorEntry(file, 8 + n + start, end - start, ST_DTYPES[info["dtype"]],
                                            tuple(info["shape"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise EngineError(f"{file}: corrupt safetensors header ({e!r})") from None
    for name, entry in entries.items():
        if entry.offset + entry.nbytes > size:
            raise EngineError(f"{file}: truncated: tensor {name} ends at byte {entry.offset + entry.nbytes}, "
                              f"the file has {size}")
    return entries


@dataclass(frozen=True)
class LayerLayout:
    """Where each tensor of a decoder layer sits inside one flat byte buffer (the same for every layer)."""
    dtype: torch.dtype
    tensors: dict[str, tuple[int, tuple[int, ...]]]  # name -> (byte offset, shape)
    nbytes: int

    @staticmethod
    def of(cfg: ModelConfig, dtype: torch.dtype) -> "LayerLayout":
        offset, tensors = 0, {}
        for name, shape in cfg.layer_shapes().items():
            tensors[name] = (offset, shape)
            offset += -(-math.prod(shape) * dtype.itemsize // ALIGN) * ALIGN
        return LayerLayout(dtype, tensors, offset)

    def views(self, buf: torch.Tensor) -> dict[str, torch.Tensor]:
        size = self.dtype.itemsize
        return {name: buf[off:off + math.prod(shape) * size].view(self.dtype).view(shape)
                for name, (off, shape) in self.tensors.items()}


# Tensors that are multiplied by the same input, in the order the model splits their product.
GROUPS = {"qkv": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
          "qkv_bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
          "gate_up": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.device == b.device and a.is_contiguous() and b.is_contiguous()
            and a.shape[1:] == b.shape[1:] and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
            and b.data_ptr() == a.data_ptr() + a.nbytes)


def fused(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A layer's views plus, for each group of tensors lying back to back in one buffer (q, k and v and their
    biases; gate and up), one view of the group: one product where there were several, no copy. Our layer layout
    lays them out so; a checkpoint mapped in place may not (safetensors orders by name: gate and up adjacent, q, k
    and v not), and then the model multiplies them one by one."""
    out = dict(views)
    for name, members in GROUPS.items():
        parts = [views[m] for m in members if m in views]
        if len(parts) == len(members) and all(_adjacent(a, b) for a, b in zip(parts, parts[1:])):
            first = parts[0]
            out[name] = torch.as_strided(first, (sum(len(t) for t in parts), *first.shape[1:]), first.stride())
    if "qkv" in out and "self_attn.q_proj.bias" in views and "qkv_bias" not in out:
        del out["qkv"]  # biases apart: the model adds them one by one
    return out


# One read of a streamed layer: (file descriptor, file offset, byte count, offset in the layer buffer).
Extent = tuple[int, int, int, int]
# The bytes of a memory-mapped file a layer spans: (map, first byte, end byte).
Span = tuple[Mapped, int, int]


def read_extents(extents: list[Extent], out: torch.Tensor) -> None:
    for fd, offset, nbytes, dest in extents:
        read_into(fd, offset, out[dest:dest + nbytes])


class Checkpoint:
    """A Hugging Face safetensors folder, validated up front: all files present, headers intact, every tensor
    the config needs present with the right shape. Owns the open file descriptors of the engine's reads."""

    def __init__(self, path: str | Path, cfg: ModelConfig, stats: EngineStats) -> None:
        self.path, self.stats = Path(path), stats
        index, single = self.path / "model.safetensors.index.json", self.path / "model.safetensors"
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError) as e:
                raise EngineError(f"{index}: cannot read weight_map ({e!r})") from None
            missing = [n for n in names if not (self.path / n).is_file()]
            if missing:
                raise EngineError(f"{index}: missing shard file(s): {', '.join(missing)}")
        elif single.is_file():
            names = [single.name]
        else:
            raise EngineError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        self.files = [self.path / n for n in names]
        self.entries: dict[str, TensorEntry] = {}
        for file in self.files:
            self.entries.update(read_header(file))

        expected = dict(cfg.global_shapes())
        for i in range(cfg.num_layers):
            expected.update({f"model.layers.{i}.{n}": s for n, s in cfg.layer_shapes().items()})
        missing = [n for n in expected if n not in self.entries]
        if missing:
            raise EngineError(f"{self.path}: {len(missing)} tensor(s) missing from the checkpoint, "
                              f"e.g. {', '.join(missing[:5])}")
        wrong = [f"{n} {self.entries[n].shape} != {s}" for n, s in expected.items() if self.entries[n].shape != s]
        if wrong:
            raise EngineError(f"{self.path}: tensor shapes do not match config.json: {'; '.join(wrong[:5])}")
        self._fds: dict[Path, int] = {}
        self._maps: dict[Path, Mapped] = {}

    def fd(self, file: Path) -> int:
        if file not in self._fds:
            self._fds[file] = os.open(file, os.O_RDONLY)
        return self._fds[file]

    def mapped(self, file: Path) -> Mapped:
        if file not in self._maps:
            self._maps[file] = Mapped(self.fd(file))
        return self._maps[file]

    def mapped_tensor(self, name: str) -> torch.Tensor:
        """A tensor of the checkpoint as a view of its file's memory map (read from disk, or the page cache, on use)."""
        e = self.entries[name]
        return self.mapped(e.file).view(e.offset, e.nbytes, e.dtype).view(e.shape)

    def mapped_layer(self, i: int, layout: LayerLayout,
                     packed: Path | None) -> tuple[dict[str, torch.Tensor], list[Span]]:
        """Layer i's tensors as views of memory maps (its packed file, or the safetensors when the dtype matches):
        ({name: view}, [(map, first byte, end byte) of each file the layer spans])."""
        if packed is not None:
            m = self.mapped(packed)
            return layout.views(m.view(0, layout.nbytes, torch.uint8)), [(m, 0, layout.nbytes)]
        entries = {n: self.entries[f"model.layers.{i}.{n}"] for n in layout.tensors}
        assert all(e.dtype == layout.dtype for e in entries.values())
        spans = []
        for file in {e.file for e in entries.values()}:
            mine = [e for e in entries.values() if e.file == file]
            spans.append((self.mapped(file), min(e.offset for e in mine), max(e.offset + e.nbytes for e in mine)))
        return {n: self.mapped(e.file).view(e.offset, e.nbytes, e.dtype).view(e.shape) for n, e in entries.items()}, spans

    def read(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        e = self.entries[name]
        raw = torch.empty(e.nbytes, dtype=torch.uint8)
        with self.stats.transfer("disk->host", e.nbytes):
            read_into(self.fd(e.file), e.offset, raw)
        return raw.view(e.dtype).view(e.shape).to(dtype)

    def read_layer(self, i: int, layout: LayerLayout, out: torch.Tensor) -> None:
        """Fill a CPU layer buffer, converting dtype where the checkpoint's differs."""
        for name, view in layout.views(out).items():
            view.copy_(self.read(f"model.layers.{i}.{name}", layout.dtype))

    def layer_extents(self, i: int, layout: LayerLayout) -> list[Extent]:
        """Reads that fill layer i's buffer straight from the safetensors files (dtype must match)."""
        entries = [(self.entries[f"model.layers.{i}.{n}"], off) for n, (off, _) in layout.tensors.items()]
        assert all(e.dtype == layout.dtype for e, _ in entries)
        return [(self.fd(e.file), e.offset, e.nbytes, off) for e, off in entries]

    def pack_layers(self, layers: list[int], layout: LayerLayout, directory: Path) -> dict[int, Path]:
        """Write each layer as one contiguous file in the engine dtype, so streaming it is one read.

        Files from an earlier run (keep_offload) are reused when the manifest matches this checkpoint and layout.
        """
        directory.mkdir(parents=True, exist_ok=True)
        manifest = directory / "manifest.json"
        key = {"dtype": str(layout.dtype), "nbytes": layout.nbytes,
               "tensors": {n: [o, list(s)] for n, (o, s) in layout.tensors.items()},
               "sources": {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in self.files}}
        old = json.loads(manifest.read_text()) if manifest.is_file() else {}
        done = set(old.get("layers", [])) if old.get("key") == key else set()
        buf = torch.empty(layout.nbytes, dtype=torch.uint8)
        files = {}
        for i in layers:
            file = directory / f"layer_{i:03d}.bin"
            if i not in done or not file.is_file() or file.stat().st_size != layout.nbytes:
                self.read_layer(i, layout, buf)
                with self.stats.transfer("host->disk", layout.nbytes):
                    buf.numpy().tofile(file)
                done.add(i)
            files[i] = file
        tmp = manifest.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": key, "layers": sorted(done)}))
        tmp.replace(manifest)
        return files

    def packed_extents(self, file: Path, layout: LayerLayout) -> list[Extent]:
        return [(self.fd(file), 0, layout.nbytes, 0)]

    def close(self) -> None:
        self._maps.clear()  # each map closes when the last tensor viewing it goes
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

