"""The generation API: load a model under a memory plan, prefill prompts, decode tokens."""
import shutil
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

from .block_manager import BlockManager
from .config import DTYPES, EngineError, ModelConfig
from .kv_cache import KVCache
from .model import Piece, Transformer
from .placement import Globals, LayerWeights
from .planner import Plan, make_plan
from .sampling import sample
from .stats import EngineStats
from .weights import Checkpoint, LayerLayout


def _release(closers: list, directory: Path | None, created: bool, keep: bool):
    for close in closers:
        close()
    if directory is not None and not keep:
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        else:  # a folder the user gave us: remove only what we put there
            shutil.rmtree(directory / "kv", ignore_errors=True)
            shutil.rmtree(directory / "weights", ignore_errors=True)


class Engine:
    """An offloading paged-attention engine for one Llama-family model.

    Everything that can fail for a fixable reason (unsupported model, missing or corrupt files, budget or disk
    too small) raises EngineError from the constructor, before any weight is loaded.
    """

    def __init__(self, path, *, device="cpu", dtype=None, vram_budget=None, weights="auto", kv="auto",
                 offload_dir=None, keep_offload=False, max_context=None, max_batch=1, block_size=None,
                 prefill_chunk=None, pack_weights=None):
        self.stats = EngineStats()
        self.device = torch.device(device)
        self.config = cfg = ModelConfig.load(path)
        if isinstance(dtype, str) and dtype not in DTYPES:
            raise EngineError(f"dtype '{dtype}' not supported ({', '.join(DTYPES)})")
        self.dtype = DTYPES[dtype] if isinstance(dtype, str) else dtype or cfg.dtype
        ckpt = Checkpoint(path, cfg, self.stats)
        layout = LayerLayout.of(cfg, self.dtype)
        # The disk tier reads the safetensors in place unless their dtype differs or packing is asked for.
        converts = any(e.dtype != self.dtype for e in ckpt.entries.values())
        pack = converts if pack_weights is None else pack_weights or converts
        self.plan: Plan = make_plan(cfg, device=self.device, dtype=self.dtype, vram_budget=vram_budget,
                                    context=max_context or min(cfg.max_position_embeddings, 4096),
                                    batch=max_batch, weights=weights, kv=kv, offload_dir=offload_dir,
                                    block_size=block_size, prefill_chunk=prefill_chunk, pack_weights=pack)
        plan = self.plan
        if self.device.type == "cuda" and plan.budget:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, plan.budget / total), self.device)

        disk_layers = [i for i, t in enumerate(plan.layer_tiers) if t == "disk"]
        created, self.offload_dir = False, None
        if plan.disk_bytes:
            created = offload_dir is None or not Path(offload_dir).exists()
            self.offload_dir = Path(offload_dir or tempfile.mkdtemp(prefix="own_engine_"))
            self.offload_dir.mkdir(parents=True, exist_ok=True)
        closers = [ckpt.close]
        self._finalizer = weakref.finalize(self, _release, closers, self.offload_dir, created, keep_offload)

        with self.stats.in_phase("load"):
            packed = ckpt.pack_layers(disk_layers, layout, self.offload_dir / "weights") if pack and disk_layers else {}
            layers = LayerWeights(ckpt, layout, plan.layer_tiers, plan.n_slots, self.device, self.stats, packed)
            closers.insert(0, layers.close)
            globals_ = Globals(ckpt, plan.embed_tier, cfg.tie_word_embeddings, self.dtype, self.device, self.stats)
            kv = KVCache(cfg, plan.kv_blocks, plan.block_size, plan.kv_chunk_blocks, self.dtype, self.device,
                         self.offload_dir and self.offload_dir / "kv", self.stats)
        self.blocks = BlockManager(kv.num_blocks, plan.block_size)
        self.model = Transformer(cfg, layers, globals_, kv, self.blocks, plan.mlp_rows, self.device, self.dtype)

    @classmethod
    def from_pretrained(cls, path, **options) -> "Engine":
        """Engine(path, **options), named as in transformers."""
        return cls(path, **options)

    def close(self):
        """Stop prefetching, close files, remove the offload files unless keep_offload."""
        self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """Start one sequence per prompt and run all prompts in one pass over the weights, in chunks of
        plan.prefill_chunk rows. Returns the sequence ids and the logits [len(prompts), vocab] of each prompt's
        last token."""
        seqs = [self.blocks.add_sequence() for _ in prompts]
        try:
            chunks, ends, row, room = [[]], [], 0, self.plan.prefill_chunk
            for seq, prompt in zip(seqs, prompts):
                self.blocks.reserve(seq, len(prompt))
                pos = 0
                while pos < len(prompt):
                    n = min(len(prompt) - pos, room)
                    chunks[-1].append(Piece(seq, pos, slice(row, row + n)))
                    row, pos, room = row + n, pos + n, room - n
                    if room == 0:
                        chunks.append([])
                        room = self.plan.prefill_chunk
                ends.append(row - 1)
            tokens = torch.tensor([t for p in prompts for t in p])
            with self.stats.in_phase("prefill", tokens=row):
                return seqs, self.model.forward(tokens, [c for c in chunks if c], ends)
        except BaseException:
            self.release(seqs)
            raise

    def decode_one_token(self, seqs: list[int], tokens: list[int]) -> torch.Tensor:
        """Append one token to each sequence; all of them share one pass over the weights. Logits [B, vocab]."""
        chunk = []
        for row, seq in enumerate(seqs):
            start = self.blocks.lengths[seq]
            self.blocks.reserve(seq, start + 1)
            chunk.append(Piece(seq, start, slice(row, row + 1)))
        with self.stats.in_phase("decode", tokens=len(seqs)):
            return self.model.forward(torch.tensor(tokens), [chunk], list(range(len(seqs))))

    def release(self, seqs: list[int]):
        for seq in seqs:
            self.blocks.free_sequence(seq)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                 on_token: Callable[[int, int], None] | None = None):
        """Generate for one prompt (a list of token ids) or several (a list of lists, one static batch).

        Stops a sequence at an EOS token unless ignore_eos, or after max_new_tokens. on_token(seq_index, token_id)
        is called for every token as soon as it is chosen. Returns the new tokens (a list, or a list per prompt).
        """
        single = bool(prompts) and isinstance(prompts[0], int)
        batch = [list(prompts)] if single else [list(p) for p in prompts]
        if not batch or not all(batch) or max_new_tokens < 1:
            raise EngineError("generate needs non-empty prompts and max_new_tokens >= 1")
        need = sum(self.blocks.blocks_for(len(p) + max_new_tokens) for p in batch)
        if need > self.blocks.num_free:
            raise EngineError(f"{len(batch)} prompt(s) + {max_new_tokens} new tokens need {need} KV blocks, "
                              f"{self.blocks.num_free} are free (raise max_context or max_batch)")
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        eos = set() if ignore_eos else set(self.config.eos_token_ids)

        out = [[] for _ in batch]
        seqs, logits = self.prefill(batch)
        try:
            active = list(range(len(batch)))
            while True:
                for i, token in zip(active, sample(logits, temperature, top_k, top_p, generator).tolist()):
                    out[i].append(token)
                    if on_token:
                        on_token(i, token)
                active = [i for i in active if len(out[i]) < max_new_tokens and out[i][-1] not in eos]
                if not active:
                    break
                logits = self.decode_one_token([seqs[i] for i in active], [out[i][-1] for i in active])
        finally:
            self.release(seqs)
        return out[0] if single else out
