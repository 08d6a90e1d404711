"""Decides where weights and KV live, and the chunk sizes, from a memory budget; explains the decision.

On CUDA the budget is device memory. On the CPU device it is the memory for resident weights, device-tier KV
and working buffers; "host" there is the same RAM, so auto placement streams from disk instead (memory-mapped:
the page cache the kernel may reclaim, not the budget).

Weights and KV are stored in the checkpoint's dtype (or the one asked for); compute runs in the dtype the compute
policy picks (compute.py). make_plan is a function of its inputs: the model, the options and the Machine (free
RAM and disk, the compute policy), which the caller reads with Machine.here.
"""
import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from llmbench.units import fmt_bytes, parse_size

from . import compute as policy
from .compute import Compute, MatmulForms, choose
from .config import DTYPES, ModelConfig
from .engine_config import EngineConfig
from .errors import EngineError
from .mapped import can_populate
from .native import Native, build, layer_ops_support, prefill_support, support
from .placement import LOGIT_ROWS
from .weights import LayerLayout

RAM_SHARE = 0.8  # of the RAM available, the most host-memory tiers may take
# A new KV file's pages fault at their first write, inside the request that writes them: a 2,048-token prompt of the
# 201M bf16 model on disk (Intel Xeon, ext4) paid ~7 ms of its ~0.4 s TTFT, 8,192 tokens ~35 ms (96 MiB), where KV in
# host memory is zeroed at load. Disk KV files up to this share of the RAM available are faulted in at load too; a
# larger tier is on disk because memory cannot hold it, and its pages come as requests write them.
PREFAULT_SHARE = 0.25
TIER_OF_MODE = {"gpu": "device", "cpu": "host", "disk": "disk"}


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype  # weights as stored and streamed
    compute_dtype: torch.dtype
    compute_reason: str
    narrow_rows: int  # passes of fewer rows multiply by the weights as stored (compute.Compute)
    matmul_forms: tuple[MatmulForms, ...]  # how products of few rows are computed, per dtype (compute.Compute)
    kv_dtype: torch.dtype
    budget: int | None
    context: int
    batch: int
    block_size: int
    prefill_chunk: int
    step_tokens: int  # rows of a pass over the weights while sequences decode (chunks of prefill_chunk rows)
    kv_chunk_blocks: int
    mlp_rows: int
    pad_rows: int  # a chunk's products through F.linear run on rows padded to a multiple of this (0: none)
    n_slots: int
    slot_bytes: int  # one ring slot: a layer in the compute dtype
    layer_tiers: list[str]
    embed_tier: str
    kv_blocks: dict[str, int]
    layer_bytes: int
    globals_bytes: int  # on the device: lm_head, norm, embedding table if resident
    working_bytes: int
    block_bytes: int  # one block in all layers
    disk_bytes: int  # to be written under the offload dir
    prefault_disk_kv: bool  # the disk tier's KV files get their pages at load (PREFAULT_SHARE, Machine.populate)
    offload_dir: Path | None
    library: Path | None  # our kernels' (native.py), where any of them runs
    attention_reason: str | None  # why decode attention is not ours (None: it is)
    layer_ops_reason: str | None  # why a layer's elementwise steps are not ours (None: they are)
    prefill_reason: str | None  # why a prefill chunk's attention is not ours (None: it is)

    def count(self, tier: str) -> int:
        return self.layer_tiers.count(tier)

    def form(self, dtype: torch.dtype, rows: int) -> str:
        """How a product of `rows` rows with weights in `dtype` is computed (matmul.linear's `form`)."""
        return Compute(self.compute_dtype, self.narrow_rows, self.compute_reason, self.matmul_forms).form(dtype, rows)

    @property
    def decode_layer(self) -> bool:
        """Whether a layer of decoding rows may run in our two calls (native.DecodeLayer): bf16 compute with our
        decode attention and layer ops, and our tile kernel among the forms of bf16 products (not on a CPU without
        AMX, an AMD EPYC with avx512_bf16 say); model.Transformer.decodes_natively decides per pass."""
        tiles = any(f.dtype == "bfloat16" and "tiles" in f.best for f in self.matmul_forms)
        return (tiles and self.compute_dtype == torch.bfloat16 and self.attention_reason is None
                and self.layer_ops_reason is None)

    @property
    def device_bytes(self) -> int:
        return (self.globals_bytes + self.count("device") * self.layer_bytes + self.n_slots * self.slot_bytes
                + self.kv_blocks.get("device", 0) * self.block_bytes + self.working_bytes)

    def explain(self) -> str:
        budget = fmt_bytes(self.budget) if self.budget else "unlimited"
        streamed = len(self.layer_tiers) - self.count("device")
        blocks = ", ".join(f"{n} on {t}" for t, n in self.kv_blocks.items() if n)
        kv_offloaded = sum(n for t, n in self.kv_blocks.items() if t != "device") * self.block_bytes
        stored, compute, kv = (str(d).removeprefix("torch.") for d in (self.dtype, self.compute_dtype, self.kv_dtype))
        lines = [
            f"device {self.device}, weights stored in {stored}, budget {budget}, "
            f"context {self.context} tokens x batch {self.batch}",
            f"compute in {compute}: {self.compute_reason}",
            *(f"products by the weights: {f.explain()}" for f in self.matmul_forms),
            f"KV cache in {kv}" + (" (the compute dtype: attention reads it in place)" if kv == compute else
                                   " (upcast as each chunk is read)"),
            "decode attention: " + ("our kernel, keys read where they lie in the pool" if self.attention_reason is None
                                    else f"torch's ({self.attention_reason})"),
            "prefill attention: " + ("our AMX kernel" if self.prefill_reason is None
                                     else f"torch's ({self.prefill_reason})"),
            "RMSNorm, rotary, SiLU-and-multiply: " + ("ours, one pass each" if self.layer_ops_reason is None
                                                       else f"torch's ({self.layer_ops_reason})"),
            *(["a layer of decoding rows: two calls of ours around its KV write, where our AMX tile kernel takes its "
               "products"] if self.decode_layer else []),
            *([f"our kernels: {self.library}"] if self.library else []),
            f"weights: {self.count('device')} of {len(self.layer_tiers)} layers resident, "
            f"{self.count('host')} streamed from host memory, {self.count('disk')} from disk "
            f"({fmt_bytes(self.layer_bytes)} per layer, {self.n_slots} "
            f"{'upcast buffer' if self.device.type == 'cpu' else 'ring slot'}(s) of {fmt_bytes(self.slot_bytes)})",
            f"lm_head and final norm on the device, embed_tokens on {self.embed_tier}",
            f"KV cache: {blocks} blocks of {self.block_size} tokens ({fmt_bytes(self.block_bytes)} per block, all layers)"
            + (" (the disk files' pages faulted in at load)" if self.prefault_disk_kv else ""),
            f"chunks: prefill {self.prefill_chunk} tokens, attention KV {self.kv_chunk_blocks * self.block_size} "
            f"tokens, MLP {self.mlp_rows} rows; working buffers {fmt_bytes(self.working_bytes)}"
            + (" (their pages faulted in at load)" if self.device.type == "cpu" else ""),
            *([f"prefill products: rows padded with zeros to a multiple of {self.pad_rows} (oneDNN builds F.linear's "
               f"kernels for each row count it meets), those of a full chunk built at load"] if self.pad_rows else []),
            f"scheduler: up to {self.step_tokens} tokens per pass over the weights "
            + ("(whole prompts: each pass streams every layer once)" if self.count("device") < len(self.layer_tiers)
               else "(decodes wait at most that)" + (f", {self.prefill_chunk} in a pass with no decode"
                                                     if self.prefill_chunk > self.step_tokens else "")),
            f"device memory planned: {fmt_bytes(self.device_bytes)} of {budget}",
            f"streamed per decoded token at full context: weights {fmt_bytes(streamed * self.layer_bytes)}, "
            f"KV {fmt_bytes(kv_offloaded)}",
        ]
        if self.disk_bytes:
            where = self.offload_dir or "a new temporary folder"
            lines.append(f"offload dir {where}: {fmt_bytes(self.disk_bytes)} written")
        return "\n".join(lines)


@dataclass(frozen=True)
class Machine:
    """What a plan depends on besides the model and the options, read once by the caller (Machine.here), so
    that one input gives one plan."""
    ram: int  # bytes of RAM available
    disk: int  # bytes free on the filesystem of disk_at
    disk_at: Path  # the offload dir, or the folder a temporary one would be made in
    compute: Compute  # the compute policy's choice for the model's stored dtype on the device
    native: Native | None = None  # our kernels, on a CPU (native.build)
    populate: bool = True  # the kernel faults a mapping's pages in when asked (mapped.can_populate)

    @classmethod
    def here(cls, cfg: ModelConfig, config: EngineConfig) -> "Machine":
        where = Path(config.offload_dir or tempfile.gettempdir()).absolute()
        probe = where
        while not probe.exists():
            probe = probe.parent
        stored = DTYPES[config.dtype] if config.dtype else cfg.dtype
        compute = choose(torch.device(config.device), stored, config.compute_dtype and DTYPES[config.compute_dtype])
        native = build(policy.cpu_flags()) if torch.device(config.device).type == "cpu" else None
        return cls(psutil.virtual_memory().available, shutil.disk_usage(probe).free, where, compute, native,
                   can_populate())


DECODE_WAIT_ROWS = 512  # rows of a pass that running decodes wait behind, unless prefill_chunk says otherwise
# On a CPU F.linear in bfloat16 is oneDNN's, which builds kernels for each row count it meets: 4-25 ms a product
# (the 201M benchmark model, 300 to 2,048 rows; ~60 ms a prompt of a new length at 2,000 tokens, in transformers
# too). A chunk's products padded to a multiple of 64 rows leave at most 32 widths per product in a 2,048-row
# chunk, and cost no more than the rows they add (a 2,000-token prompt 401-407 ms padded, 412-429 ms not).
PAD_ROWS = 64


def padded(rows: int, multiple: int) -> int:
    """rows rounded up to a multiple of `multiple` (0: rows as they are)."""
    return -(-rows // multiple) * multiple if multiple else rows


def default_chunk(device: torch.device) -> int:
    """Rows per prefill chunk unless asked. On a CPU 2,048: wider products and fewer attention merges (201M bf16
    model, 2,048-token prompt, Intel Xeon (AMX) 2 threads: TTFT 0.73 -> 0.64 s; 8,192 tokens 4.57 -> 4.43 s), in
    passes that no decode waits behind (step_rows). On CUDA its working buffers would come out of the VRAM budget
    that layers and KV use: 512 there (not measured wider)."""
    return 2048 if device.type == "cpu" else DECODE_WAIT_ROWS


def step_rows(chunk: int, asked: bool, batch: int, resident: bool, context: int) -> int:
    """Rows of one pass while sequences decode (they wait behind it): whole prompts when layers stream (each pass
    streams every layer once); one chunk when all are resident, of at most DECODE_WAIT_ROWS where other sequences
    may be decoding and the chunk was not asked for. A pass with no decode in it may take a whole chunk."""
    if not resident:
        return batch * context
    return chunk if asked or batch == 1 else min(chunk, DECODE_WAIT_ROWS)


def working_bytes(cfg: ModelConfig, compute: torch.dtype, rows: int, chunk: int, kv_tokens: int, mlp_rows: int,
                  batch: int, device: torch.device, upcast: bool) -> int:
    """Activation memory of one forward pass: hidden states and rope tables of every row; one chunk's projections,
    attention output and merge (the fused kernels keep no score matrix); the buffer a KV chunk is read into, on
    CUDA its heads expanded for the kernel, and a sliding window's mask; one MLP row chunk; the logits, and the
    slice of lm_head upcast at a time."""
    e, h, d, heads = compute.itemsize, cfg.hidden_size, cfg.head_dim, cfg.num_heads
    whole = rows * (h * e + 2 * d * e + 16)
    qkv = chunk * (heads + 2 * cfg.num_kv_heads) * d * e + 4 * chunk * h * e
    attention = 4 * chunk * heads * (d + 1) * 4 + 2 * kv_tokens * cfg.num_kv_heads * d * e
    if device.type == "cuda":
        attention += 2 * kv_tokens * heads * d * e
    if cfg.sliding_window:
        attention += chunk * kv_tokens * e
    head = min(LOGIT_ROWS, cfg.vocab_size) * h * e if upcast else 0
    return whole + qkv + attention + 3 * mlp_rows * cfg.intermediate_size * e + batch * cfg.vocab_size * 4 + head


def make_plan(cfg: ModelConfig, config: EngineConfig, machine: Machine) -> Plan:
    """Place weights and KV within the budget. Priority for device memory under "auto": decoder layers (each
    resident layer is one less to stream per token), then KV blocks, then the embedding table (a lookup reads
    only a few rows from disk). Raises EngineError when even the minimum does not fit."""
    device, budget = torch.device(config.device), _budget(config.vram_budget)
    dtype = DTYPES[config.dtype] if config.dtype else cfg.dtype
    compute, kv_dtype = machine.compute.dtype, DTYPES[config.kv_dtype] if config.kv_dtype else machine.compute.dtype
    context, batch = config.context_for(cfg.max_position_embeddings), config.max_batch
    weights, kv, prefill_chunk = config.weights, config.kv, config.prefill_chunk
    if device.type == "cuda" and compute != dtype:
        raise EngineError(f"on CUDA compute runs in the stored dtype ({dtype}), not {compute}: pass dtype instead")
    # Streamed data lives in pinned host memory on CUDA when RAM allows; on CPU host memory *is* the budget.
    slow = "host" if device.type == "cuda" else "disk"
    ram = machine.ram * RAM_SHARE
    limit = math.inf if budget is None else budget

    block_size = config.block_size
    L, layer, slot = cfg.num_layers, LayerLayout.of(cfg, dtype).nbytes, LayerLayout.of(cfg, compute).nbytes
    # A CPU reads every tier in place (host memory, mapped files) and upcasts through one buffer; on CUDA a layer
    # needs a ring slot unless it is resident in the compute dtype.
    upcast = compute != dtype

    def ring(resident: int) -> int:
        if device.type == "cpu":
            return int(upcast)
        return min(2, L if upcast else L - resident)

    block_bytes = L * block_size * cfg.kv_bytes_per_token(kv_dtype)
    need_blocks = batch * -(-context // block_size)
    lm_head = (cfg.vocab_size + 1) * cfg.hidden_size * dtype.itemsize  # + the final norm
    embed = 0 if cfg.tie_word_embeddings else cfg.vocab_size * cfg.hidden_size * dtype.itemsize
    kv_forced = need_blocks * block_bytes if kv == "gpu" else 0
    forced = L if weights == "gpu" else 0  # resident layers the mode asks for
    weights_min = forced * layer + (embed if forced else 0) + min(1, ring(forced)) * slot

    pad_rows = PAD_ROWS if device.type == "cpu" and compute == torch.bfloat16 else 0
    # Shrink the chunks until the minimum configuration fits.
    chunk = min(prefill_chunk or default_chunk(device), batch * context)
    kv_chunk = max(1, min(4096, context) // block_size)
    while True:
        # The MLP of a chunk in parts of at most 512 rows bounds its activations on a GPU; on a CPU one part per
        # chunk, as each part reads the MLP's weights again in calls of its own: a 2,048-token prefill of the 201M
        # model took 0.39-0.40 s in one part, 0.44 s in four.
        mlp_rows = padded(chunk, pad_rows) if device.type == "cpu" else min(chunk, 512)
        work = working_bytes(cfg, compute, batch * context, chunk, kv_chunk * block_size, mlp_rows, batch, device,
                             upcast)
        minimum = lm_head + work + weights_min + kv_forced
        if minimum <= limit:
            break
        if kv_chunk == 1 and (prefill_chunk or chunk <= 16):
            raise EngineError(
                f"vram_budget {fmt_bytes(budget)} is too small: needs at least {fmt_bytes(minimum)} (lm_head and norm "
                f"{fmt_bytes(lm_head)}, {'all layers' if weights == 'gpu' else 'one layer'} {fmt_bytes(weights_min)}, "
                f"working buffers {fmt_bytes(work)} with prefill chunk {chunk}, forced KV {fmt_bytes(kv_forced)})")
        chunk, kv_chunk = chunk if prefill_chunk else max(16, chunk // 2), max(1, kv_chunk // 2)

    free = limit - lm_head - work - kv_forced
    if weights == "auto" and L * layer + ring(L) * slot <= free:
        resident, tiers = L, ["device"] * L
    elif weights == "auto":
        # Two slots let layer i+1 load while layer i computes: worth more than one more resident layer.
        reserve = ring(0) * slot if free >= ring(0) * slot else slot
        resident = min(L - 1, int((free - reserve) // layer))
        tiers = ["device"] * resident + [slow if (L - resident) * layer < ram else "disk"] * (L - resident)
    else:
        tiers = [TIER_OF_MODE[weights]] * L
        resident = L if weights == "gpu" else 0
    slots = ring(resident)
    if slots == 2 and free - resident * layer < 2 * slot:
        slots = 1
    free -= resident * layer + slots * slot

    kv_wanted = need_blocks * block_bytes if kv == "auto" else 0
    embed_tier = "device" if cfg.tie_word_embeddings or embed + kv_wanted <= free else "disk"
    if embed_tier == "device":
        free -= embed
    if kv == "auto":
        on_device = need_blocks if free == math.inf else min(need_blocks, max(0, int(free // block_bytes)))
        rest = need_blocks - on_device
        host_ram = ram - tiers.count("host") * layer
        kv_blocks = {"device": on_device, slow if rest * block_bytes < host_ram else "disk": rest}
    else:
        kv_blocks = {TIER_OF_MODE[kv]: need_blocks}

    disk_bytes = kv_blocks.get("disk", 0) * block_bytes + (tiers.count("disk") * layer if config.pack_weights else 0)
    if disk_bytes and machine.disk < disk_bytes * 1.05:
        raise EngineError(f"offload dir {machine.disk_at}: needs {fmt_bytes(disk_bytes)} on disk, "
                          f"only {fmt_bytes(machine.disk)} free on its filesystem")
    native = machine.native
    heads = (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)
    attention = support(native, device, compute, kv_dtype, *heads, block_size)
    layer_ops = layer_ops_support(native, device, compute, cfg.head_dim)
    prefill = prefill_support(native, device, compute, cfg.head_dim)
    ours = attention is None or layer_ops is None or prefill is None
    library = native.library if native is not None and ours else None
    prefault = machine.populate and 0 < kv_blocks.get("disk", 0) * block_bytes <= machine.ram * PREFAULT_SHARE
    return Plan(device=device, dtype=dtype, compute_dtype=compute, compute_reason=machine.compute.reason,
                narrow_rows=machine.compute.narrow_rows, matmul_forms=machine.compute.forms, kv_dtype=kv_dtype,
                budget=budget, context=context, batch=batch, block_size=block_size, prefill_chunk=chunk,
                step_tokens=step_rows(chunk, bool(prefill_chunk), batch, resident == L, context),
                kv_chunk_blocks=kv_chunk, mlp_rows=mlp_rows, pad_rows=pad_rows, n_slots=slots, slot_bytes=slot,
                layer_tiers=tiers, embed_tier=embed_tier, kv_blocks=kv_blocks, layer_bytes=layer,
                globals_bytes=lm_head + (embed if embed_tier == "device" else 0),
                working_bytes=work, block_bytes=block_bytes, disk_bytes=disk_bytes,
                prefault_disk_kv=prefault,
                offload_dir=config.offload_dir, library=library,
                attention_reason=attention, layer_ops_reason=layer_ops, prefill_reason=prefill)


def _budget(size: str | int | None) -> int | None:
    try:
        return parse_size(size)
    except ValueError as e:
        raise EngineError(f"vram_budget: {e}") from None
