"""The generation API: load a model under a memory plan, prefill prompts, decode tokens, serve sequences."""
import hashlib
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import torch
from typing_extensions import TypeIs

from . import owned
from .allocator import keep_freed_memory, touch_heap
from .batch import prepare
from .block_manager import BlockManager
from .config import DTYPES, ModelConfig
from .engine_config import EngineConfig
from .errors import EngineError
from .kv_cache import KVCache
from .model import Transformer
from .placement import Globals, LayerWeights
from .native import DecodeLayer, LayerOps, PagedAttention, PrefillAttention
from .planner import Machine, Plan, make_plan, padded
from .prefix_store import PrefixStore
from .scheduler import Scheduler
from .sequence import SamplingParams, Sequence, Status
from .serving import ServingLoop
from .stats import EngineStats
from .weights import Checkpoint, LayerLayout

# How long full blocks wait for an idle engine before they go to prefix_cache_dir anyway (persist): a server that
# is never idle still persists. Longer than a long prompt's prefill (an 8,192-token one took 2.8 s on a 2-core CPU),
# whose blocks would otherwise be written while it decodes.
PERSIST_AFTER_S = 30.0


def _one_prompt(prompts: list[int] | list[list[int]]) -> TypeIs[list[int]]:
    """Whether generate was given one prompt (token ids) rather than a list of them."""
    return bool(prompts) and isinstance(prompts[0], int)


def _release(closers: list[Callable[[], None]], directory: Path | None, keep: bool) -> None:
    for close in closers:
        close()
    if directory is not None and not keep:
        owned.release(directory, "offload_dir", ("kv", "weights"))  # what the engine wrote, in a folder it made


class Engine:
    """An offloading paged-attention engine for one Llama-family model.

    Everything that can fail for a fixable reason (unsupported model, missing or corrupt files, budget or disk
    too small) raises EngineError from the constructor, before any weight is loaded.
    """

    def __init__(self, path: str | Path, base: EngineConfig | None = None, **options: Any) -> None:
        """The options as an EngineConfig (`base`), or as its fields' names (which win over base's): what each
        means, and its default, is written there. self.options keeps them; self.plan (Plan.explain()) says what
        became of them on this machine."""
        o = EngineConfig.of(base, **options)
        offload_dir, keep_offload, prefix_cache_dir = o.offload_dir, o.keep_offload, o.prefix_cache_dir
        self.stats = EngineStats()
        self.device = torch.device(o.device)
        if self.device.type == "cpu":
            keep_freed_memory()
        self.config = cfg = ModelConfig.load(path)
        self.dtype = DTYPES[o.dtype] if o.dtype else cfg.dtype
        ckpt = Checkpoint(path, cfg, self.stats)
        layout = LayerLayout.of(cfg, self.dtype)
        # The disk tier is packed (our layout, one file per layer) where the dtype differs, and by default on the
        # CPU, which reads it in place: the safetensors' tensors sit at 8-byte offsets, misaligned for 64-byte
        # vector loads, and q, k and v apart (201M bf16 model, 2,048 tokens: 37.5 ms per decoded token read in
        # place, 28.0 packed, 27.6 resident). Elsewhere, and with pack_weights false, it reads the safetensors.
        converted = any(e.dtype != self.dtype for e in ckpt.entries.values())
        pack = converted or (o.pack_weights if o.pack_weights is not None else self.device.type == "cpu")
        self.options = o = o.model_copy(update={"pack_weights": pack})
        self.plan: Plan = make_plan(cfg, o, Machine.here(cfg, o))
        plan = self.plan
        if prefix_cache_dir is not None and not o.prefix_cache:
            raise EngineError("prefix_cache_dir needs prefix_cache")
        if self.device.type == "cuda" and plan.budget:
            total = torch.cuda.get_device_properties(self.device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, plan.budget / total), self.device)

        disk_layers = [i for i, t in enumerate(plan.layer_tiers) if t == "disk"]
        self.offload_dir: Path | None = None
        if plan.disk_bytes and offload_dir is None:
            self.offload_dir = Path(tempfile.mkdtemp(prefix="own_engine_"))
            owned.mark(self.offload_dir, "offload_dir")
        elif plan.disk_bytes and offload_dir is not None:
            self.offload_dir = owned.claim(offload_dir, "offload_dir")
        closers = [ckpt.close]
        self._finalizer = weakref.finalize(self, _release, closers, self.offload_dir, keep_offload)

        with self.stats.in_phase("load"):
            packed: dict[int, Path] = {}
            if pack and disk_layers:
                assert self.offload_dir is not None  # the plan counts packed layers in disk_bytes
                packed = ckpt.pack_layers(disk_layers, layout, self.offload_dir / "weights")
            layers = LayerWeights(ckpt, layout, LayerLayout.of(cfg, plan.compute_dtype), plan.layer_tiers,
                                  plan.n_slots, self.device, self.stats, packed)
            closers.insert(0, layers.close)
            globals_ = Globals(ckpt, plan.embed_tier, cfg.tie_word_embeddings, self.dtype, plan.compute_dtype,
                               self.device, self.stats)
            kv = KVCache(cfg, plan.kv_blocks, plan.block_size, plan.kv_chunk_blocks, plan.kv_dtype, plan.compute_dtype,
                         self.device, self.offload_dir and self.offload_dir / "kv", self.stats, plan.prefault_disk_kv)
            closers.insert(0, kv.close)
        self.kv, self.max_batch = kv, o.max_batch
        self.blocks = BlockManager(kv.num_blocks, plan.block_size, [n for _, n, _ in kv.tiers.values()],
                                   cache_prefixes=o.prefix_cache)
        # What a pass reads besides the KV: every layer and lm_head (and the final norm), in the stored dtype.
        self.pass_bytes = cfg.num_layers * layout.nbytes + globals_.lm_head.nbytes + globals_.norm.nbytes
        self.kv_bytes_per_token = cfg.num_layers * cfg.kv_bytes_per_token(plan.kv_dtype)
        ours = plan.library
        self.model = Transformer(cfg, layers, globals_, kv, plan.mlp_rows, plan.narrow_rows, self.device,
                                 plan.compute_dtype, plan.form,
                                 PagedAttention(ours) if ours and plan.attention_reason is None else None,
                                 LayerOps(ours) if ours and plan.layer_ops_reason is None else None,
                                 PrefillAttention(ours) if ours and plan.prefill_reason is None else None,
                                 plan.pad_rows,
                                 DecodeLayer(ours) if ours and plan.decode_layer else None)
        if plan.pad_rows:
            self.model.build_products(padded(plan.prefill_chunk, plan.pad_rows))
        if self.device.type == "cpu":
            touch_heap(plan.working_bytes)
        self.store: PrefixStore | None = None
        self.unsaved: list[tuple[int, bytes]] = []  # full blocks committed, not yet in the store (persist)
        self.unsaved_since = 0.0  # time.monotonic() when the first of them was
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
            closers.insert(0, self.store.close)
            self.stats.prefix["store_rebuilt"] = self.store.rebuilt

    @classmethod
    def from_pretrained(cls, path: str | Path, **options: Any) -> "Engine":
        """Engine(path, **options), named as in transformers."""
        return cls(path, **options)

    def close(self) -> None:
        """Write the full blocks still waiting for prefix_cache_dir, stop prefetching, close files, remove the
        offload files unless keep_offload."""
        if self._finalizer.alive:
            self.persist(wait=True)
        self._finalizer()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def admit(self, seq: Sequence) -> None:
        """Start seq (holding no block) with the KV of its longest cached prefix (blocks in memory, then blocks in
        prefix_cache_dir) and room reserved for all its tokens; EngineError when the blocks are not there. At least
        the last token is left to compute (its logits are wanted)."""
        bs = self.plan.block_size
        limit = len(seq.tokens) - 1 if self.blocks.cache_prefixes else 0
        hits = self.blocks.match(seq, limit) // bs
        from_disk = 0
        while (self.store is not None and (hits + from_disk + 1) * bs <= limit and self.blocks.num_free
               and (h := self.blocks.next_hash(seq)) is not None and h in self.store
               and (data := self.store.get(h)) is not None):
            self.kv.load_block(self.blocks.adopt(seq), data)
            from_disk += 1
        try:
            self.blocks.reserve(seq, len(seq.tokens))
        except EngineError:
            self.blocks.free_sequence(seq)  # what it found stays cached for the next try
            raise
        seq.status = Status.RUNNING
        self.stats.count_prefix(hits, from_disk, limit // bs - hits - from_disk, self.plan.block_bytes)

    def forward(self, work: list[tuple[Sequence, int]], phase: str) -> torch.Tensor:
        """One pass over the weights computing, for each (seq, n), seq's next n tokens (their blocks reserved), in
        chunks of at most plan.prefill_chunk rows. Returns the float32 logits [len(work), vocab] of each item's
        last token. Its time and bytes count in `phase` (prefill or decode)."""
        with self.stats.in_phase(phase, tokens=sum(n for _, n in work)):
            logits = self.model.forward(prepare(work, self.plan.prefill_chunk, self.plan.block_size, self.kv.chunks))
            kv_tokens = sum(seq.computed + n for seq, n in work)  # each sequence's KV up to its new tokens
            self.stats.count_read(self.pass_bytes + kv_tokens * self.kv_bytes_per_token)
            for seq, n in work:
                new = self.blocks.commit(seq, n)
                if self.store is not None and new:
                    if not self.unsaved:
                        self.unsaved_since = time.monotonic()
                    self.unsaved += new
        return logits

    def persist(self, wait: bool = False, idle: bool = True) -> None:
        """Hand the full blocks passes filled to prefix_cache_dir's writer (PrefixStore.save), copied now, once the
        engine is idle (the scheduler says when no sequence runs or waits), or they have waited PERSIST_AFTER_S, or
        `wait`: return once they are written. Written while the first question decodes, a 2,048-token document's
        65 blocks (25 MB) cost its next 16 tokens ~2 ms each on a 2-core CPU (the writer thread's copies beside
        the decode's), though the writer runs at the lowest priority. Blocks another sequence took meanwhile are
        skipped (not stored: a cache). A store whose writing failed is dropped."""
        store = self.store
        if store is None:
            return
        if not (wait or idle) and time.monotonic() - self.unsaved_since < PERSIST_AFTER_S:
            return
        new, self.unsaved = [(b, h) for b, h in self.unsaved if self.blocks.hash_of.get(b) == h], []
        if new:
            data = self.kv.blocks_data([block for block, _ in new])
            # the writer thread is handed the stats, not the engine: it must not keep the engine from its finalizer
            store.save([(h, block) for (_, h), block in zip(new, data)], self.stats.count_stored)
        if wait:
            store.wait()
        if store.error is not None:
            self.stats.prefix["store_error"] = store.error
            store.close()
            self.store = None

    def prefill(self, prompts: list[list[int]]) -> tuple[list[Sequence], torch.Tensor]:
        """Start one sequence per prompt and run all prompts in one pass over the weights. Returns the sequences
        and the logits [len(prompts), vocab] of each prompt's last token."""
        seqs = [Sequence(prompt) for prompt in prompts]
        try:
            for seq in seqs:
                self.admit(seq)
            logits = self.forward([(seq, seq.left) for seq in seqs], "prefill")
            self.persist(wait=True)
            return seqs, logits
        except BaseException:
            self.release(seqs)
            raise

    def decode_one_token(self, seqs: list[Sequence], tokens: list[int]) -> torch.Tensor:
        """Append one token to each sequence; all of them share one pass over the weights. Logits [B, vocab]."""
        for seq, token in zip(seqs, tokens):
            seq.tokens.append(token)
            self.blocks.reserve(seq, len(seq.tokens))
        logits = self.forward([(seq, 1) for seq in seqs], "decode")
        self.persist(wait=True)
        return logits

    def release(self, seqs: list[Sequence]) -> None:
        """Take back the sequences' blocks (their full ones stay cached); they hold none and wait after."""
        for seq in seqs:
            self.blocks.free_sequence(seq)
            seq.status = Status.WAITING

    def serve(self) -> ServingLoop:
        """The scheduler stepped on a thread of its own: submit sequences from any thread, close() when done. An engine
        built on another thread that stays alive runs slower there (own_engine.serving says why): a server builds it
        on the loop, with ServingLoop(lambda: Engine(...))."""
        return ServingLoop(lambda: self)

    def generate(self, prompts: list[int] | list[list[int]], max_new_tokens: int = 128, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                 ignore_eos: bool = False, on_token: Callable[[int, int], None] | None = None
                 ) -> list[int] | list[list[int]]:
        """Generate for one prompt (a list of token ids) or several (a list of lists, batched continuously).

        Stops a sequence at an EOS token unless ignore_eos, or after max_new_tokens. on_token(prompt_index,
        token_id) is called for every token as soon as it is chosen. Returns the new tokens (a list, or a list per
        prompt)."""
        batch = [list(prompts)] if (single := _one_prompt(prompts)) else [list(p) for p in prompts]
        if not batch or not all(batch) or max_new_tokens < 1:
            raise EngineError("generate needs non-empty prompts and max_new_tokens >= 1")
        scheduler, params = Scheduler(self), SamplingParams(max_new_tokens, temperature, top_k, top_p, seed, ignore_eos)
        seqs = [Sequence(p, params, on_token=on_token and (lambda token, i=i: on_token(i, token)))
                for i, p in enumerate(batch)]
        for seq in seqs:
            scheduler.add(seq)
        while scheduler.busy:
            scheduler.step()
        self.persist(wait=True)  # what this call's passes filled is on disk when it returns
        for seq in seqs:
            if seq.error is not None:
                raise seq.error
        return seqs[0].output if single else [seq.output for seq in seqs]
