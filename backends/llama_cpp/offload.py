"""Layers on a GPU under a VRAM budget: the cell's `resources.vram_budget` becomes llama.cpp's `n_gpu_layers` and
`offload_kqv`, by `plan_offload`, a pure function of the budget and the GGUF file's layout."""

from __future__ import annotations

from dataclasses import dataclass

from backends.llama_cpp.gguf import GGUFLayout

KV_BYTES_PER_ELEMENT = 2  # llama.cpp's default KV cache type is f16
GPU_RESERVE_BYTES = 512 * 2**20  # CUDA context and llama.cpp's fixed buffers (an estimate)


@dataclass
class OffloadPlan:
    n_gpu_layers: int
    offload_kqv: bool
    gpu_bytes: int  # estimated VRAM use of the plan, reserve included


def plan_offload(budget: int, layout: GGUFLayout, n_ctx: int, n_batch: int) -> OffloadPlan:
    """The placement that fits in `budget` bytes of VRAM and leaves the CPU the fewest bytes to read per token.

    reserve = GPU_RESERVE_BYTES + n_batch × n_vocab × 4   (context, fixed buffers, one batch of f32 logits)
    a layer costs its tensor bytes, plus kv = n_ctx × (n_embd_k_gqa + n_embd_v_gqa) × 2 bytes of f16 KV when
    offload_kqv (otherwise every layer's KV stays in host memory); llama.cpp offloads the last layers first, and
    n_gpu_layers = n_layers + 1 also places the output head. Batch-1 decode is memory-bound and host memory is the
    slow side, so of the most layers that fit with and without KV on the GPU, the plan whose CPU reads fewer bytes
    per token at full context wins (weights of CPU layers and the head if left there, plus the KV the CPU attends
    over); a tie keeps KV with its layers.
    """
    kv_per_layer = n_ctx * (layout.n_embd_k_gqa + layout.n_embd_v_gqa) * KV_BYTES_PER_ELEMENT
    reserve = GPU_RESERVE_BYTES + n_batch * layout.n_vocab * 4
    room = budget - reserve
    n_layers = layout.n_layers

    def fit(kv: int) -> tuple[int, int]:
        used = n = 0
        for size in reversed(layout.layer_bytes):
            if used + size + kv > room:
                return n, used
            used, n = used + size + kv, n + 1
        if used + layout.output_bytes <= room:
            return n + 1, used + layout.output_bytes
        return n, used

    def cpu_reads(n_gpu: int, kv_on_gpu: bool) -> int:
        n_cpu = n_layers - min(n_gpu, n_layers)
        head = layout.output_bytes if n_gpu <= n_layers else 0
        return sum(layout.layer_bytes[:n_cpu]) + head + kv_per_layer * (n_cpu if kv_on_gpu else n_layers)

    (n_kv, used_kv), (n_host_kv, used_host_kv) = fit(kv_per_layer), fit(0)
    if cpu_reads(n_host_kv, False) < cpu_reads(n_kv, True):
        return OffloadPlan(n_host_kv, False, used_host_kv + reserve)
    return OffloadPlan(n_kv, True, used_kv + reserve)
