"""The generation API: load a model under a memory plan, prefill prompts, decode tokens."""
import hashlib
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
from .prefix_store import PrefixStore
from .scheduler import GenerationRequest, Scheduler
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

    def __init__(self, path, *, device="cpu", dtype=None, compute_dtype=None, kv_dtype=None, vram_budget=None,
                 weights="auto", kv="auto", offload_dir=None, keep_offload=False, max_context=None, max_batch=1,
                 block_size=None, prefill_chunk=None, pack_weights=None, prefix_cache=True, prefix_cache_dir=None):
        """dtype: weights as stored and streamed (default: the checkpoint's); compute_dtype: default the plan's
        choice for the device (Plan.compute_reason says why); kv_dtype: default the compute dtype. max_batch:
        sequences decoded together (the scheduler's limit). prefix_cache: reuse the KV of full blocks a sequence
        shares with earlier ones; prefix_cache_dir: also keep those blocks on disk, for later runs."""
        self.stats = EngineStats()
        self.device = torch.device(device)
        self.config = cfg = ModelConfig.load(path)
        for name, value in (("dtype", dtype), ("compute_dtype", compute_dtype), ("kv_dtype", kv_dtype)):
            if isinstance(value, str) and value not in DTYPES:
                raise EngineError(f"{name} '{value}' not supported ({', '.join(DTYPES)})")
        dtype, compute_dtype, kv_dtype = (DTYPES[d] if isinstance(d, str) else d for d in (dtype, compute_dtype, kv_dtype))
        self.dtype = dtype or cfg.dtype
        ckpt = Checkpoint(path, cfg, self.stats)
        layout = LayerLayout.of(cfg, self.dtype)
        # The disk tier reads the safetensors in place unless their dtype differs or packing is asked for.
        converts = any(e.dtype != self.dtype for e in ckpt.entries.values())
        pack = converts if pack_weights is None else pack_weights or converts
        self.plan: Plan = make_plan(cfg, device=self.device, dtype=self.dtype, vram_budget=vram_budget,
                                    context=max_context or min(cfg.max_position_embeddings, 4096),
                                    batch=max_batch, weights=weights, kv=kv, offload_dir=offload_dir,
                                    block_size=block_size, prefill_chunk=prefill_chunk, pack_weights=pack,
                                    compute_dtype=compute_dtype, kv_dtype=kv_dtype)
        plan = self.plan
        if prefix_cache_dir is not None and not prefix_cache:
            raise EngineError("prefix_cache_dir needs prefix_cache")
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
            layers = LayerWeights(ckpt, layout, LayerLayout.of(cfg, plan.compute_dtype), plan.layer_tiers,
                                  plan.n_slots, self.device, self.stats, packed)
            closers.insert(0, layers.close)
            globals_ = Globals(ckpt, plan.embed_tier, cfg.tie_word_embeddings, self.dtype, plan.compute_dtype,
                               self.device, self.stats)
            kv = KVCache(cfg, plan.kv_blocks, plan.block_size, plan.kv_chunk_blocks, plan.kv_dtype, plan.compute_dtype,
                         self.device, self.offload_dir and self.offload_dir / "kv", self.stats)
            closers.insert(0, kv.close)
        self.kv, self.max_batch = kv, max_batch
        self.blocks = BlockManager(kv.num_blocks, plan.block_size, [n for _, n, _ in kv.tiers.values()],
                                   cache_prefixes=prefix_cache)
        self.model = Transformer(cfg, layers, globals_, kv, self.blocks, plan.mlp_rows, self.device,
                                 plan.compute_dtype)
        self.store = None
        if prefix_cache_dir is not None:
            key = {"config": hashlib.sha256((Path(path) / "config.json").read_bytes()).hexdigest(),
                   "weights": {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in ckpt.files},
                   **{name: str(d).removeprefix("torch.") for name, d in (
                       ("dtype", self.dtype), ("compute_dtype", plan.compute_dtype), ("kv_dtype", plan.kv_dtype))},
                   "block_size": plan.block_size}
            shape = (cfg.num_layers, 2, plan.block_size, cfg.num_kv_heads, cfg.head_dim)
            try:
                self.store = PrefixStore(prefix_cache_dir, key, shape, plan.kv_dtype)
            except OSError as e:
                raise EngineError(f"prefix_cache_dir {prefix_cache_dir}: {e}") from None
            self.stats.prefix["store_rebuilt"] = self.store.rebuilt

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

    def admit(self, tokens: list[int]) -> int:
        """Start a sequence for `tokens` with the KV of its longest cached prefix (blocks in memory, then blocks in
        prefix_cache_dir) and room reserved for all of them; EngineError when the blocks are not there. At least
        the last token is left to compute (its logits are wanted)."""
        seq, bs = self.blocks.add_sequence(tokens), self.plan.block_size
        limit = len(tokens) - 1 if self.blocks.cache_prefixes else 0
        hits = self.blocks.match(seq, limit) // bs
        from_disk = 0
        while (self.store is not None and (hits + from_disk + 1) * bs <= limit and self.blocks.num_free
               and (h := self.blocks.next_hash(seq)) in self.store and (data := self.store.get(h)) is not None):
            self.kv.load_block(self.blocks.adopt(seq), data)
            from_disk += 1
        try:
            self.blocks.reserve(seq, len(tokens))
        except EngineError:
            self.blocks.free_sequence(seq)  # what it found stays cached for the next try
            raise
        self.stats.count_prefix(hits, from_disk, limit // bs - hits - from_disk, self.plan.block_bytes)
        return seq

    def forward(self, work: list[tuple[int, int]], phase: str) -> torch.Tensor:
        """One pass over the weights computing, for each (seq, n), seq's next n tokens (known to the block manager,
        their blocks reserved), in chunks of at most plan.prefill_chunk rows. Returns the float32 logits
        [len(work), vocab] of each item's last token. Its time and bytes count in `phase` (prefill or decode)."""
        chunks, ends, row, room, ids = [[]], [], 0, self.plan.prefill_chunk, []
        for seq, n in work:
            start = self.blocks.computed[seq]
            ids += self.blocks.tokens[seq][start:start + n]
            pos = start
            while pos < start + n:
                take = min(start + n - pos, room)
                chunks[-1].append(Piece(seq, pos, slice(row, row + take)))
                row, pos, room = row + take, pos + take, room - take
                if room == 0:
                    chunks.append([])
                    room = self.plan.prefill_chunk
            ends.append(row - 1)
        with self.stats.in_phase(phase, tokens=row):
            logits = self.model.forward(torch.tensor(ids), [c for c in chunks if c], ends)
            for seq, n in work:
                self._commit(seq, n)
        return logits

    def _commit(self, seq: int, n: int):
        new = self.blocks.commit(seq, n)
        if self.store is None or not new:
            return
        try:
            for block, h in new:
                self.store.put(h, self.kv.block_data(block))
            self.store.flush()
        except OSError as e:  # persisting is a bonus: a full disk stops it, not the request
            self.store, self.stats.prefix["store_error"] = None, str(e)
            return
        self.stats.prefix["stored_blocks"] += len(new)

    def prefill(self, prompts: list[list[int]]) -> tuple[list[int], torch.Tensor]:
        """Start one sequence per prompt and run all prompts in one pass over the weights. Returns the sequence ids
        and the logits [len(prompts), vocab] of each prompt's last token."""
        seqs = []
        try:
            for prompt in prompts:
                seqs.append(self.admit(prompt))
            return seqs, self.forward([(seq, len(p) - self.blocks.computed[seq]) for seq, p in zip(seqs, prompts)],
                                      "prefill")
        except BaseException:
            self.release(seqs)
            raise

    def decode_one_token(self, seqs: list[int], tokens: list[int]) -> torch.Tensor:
        """Append one token to each sequence; all of them share one pass over the weights. Logits [B, vocab]."""
        for seq, token in zip(seqs, tokens):
            self.blocks.tokens[seq].append(token)
            self.blocks.reserve(seq, len(self.blocks.tokens[seq]))
        return self.forward([(seq, 1) for seq in seqs], "decode")

    def release(self, seqs: list[int]):
        for seq in seqs:
            self.blocks.free_sequence(seq)

    def generate(self, prompts, max_new_tokens: int = 128, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None, ignore_eos: bool = False,
                 on_token: Callable[[int, int], None] | None = None):
        """Generate for one prompt (a list of token ids) or several (a list of lists, batched continuously).

        Stops a sequence at an EOS token unless ignore_eos, or after max_new_tokens. on_token(prompt_index,
        token_id) is called for every token as soon as it is chosen. Returns the new tokens (a list, or a list per
        prompt)."""
        single = bool(prompts) and isinstance(prompts[0], int)
        batch = [list(prompts)] if single else [list(p) for p in prompts]
        if not batch or not all(batch) or max_new_tokens < 1:
            raise EngineError("generate needs non-empty prompts and max_new_tokens >= 1")
        scheduler = Scheduler(self)
        requests = [GenerationRequest(p, max_new_tokens, temperature, top_k, top_p, seed, ignore_eos,
                                      on_token=on_token and (lambda token, i=i: on_token(i, token)))
                    for i, p in enumerate(batch)]
        for request in requests:
            scheduler.add(request)
        while scheduler.busy:
            scheduler.step()
        for request in requests:
            if request.error is not None:
                raise request.error
        return requests[0].output if single else [r.output for r in requests]
