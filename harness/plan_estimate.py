"""What `bench engine plan` adds to the engine's plan: how long a decoded token and a prompt would take, which link
bounds them, and the host RAM the plan was made against.

From the plan's own fields (own_engine.planner.Plan): the bytes one decoded token reads from each tier at full
context (weights and KV, one sequence), divided by that tier's bandwidth measured here and now (memory: a read over
a buffer; disk: own_engine.bandwidth's file probe in the offload folder; a GPU's link: its pinned-copy probe), summed
as if nothing overlapped (so an upper estimate: the engine overlaps streaming with compute where it can). The prompt
adds its multiply-adds (2 × parameters × tokens, attention left out) at the matrix speed measured in the compute
dtype. An estimate to size a run by; `bench run` measures the real one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llmbench.units import fmt_bytes
from own_engine.bandwidth import probe_bandwidth, probe_memory
from own_engine.planner import RAM_SHARE, Machine, Plan


@dataclass
class Link:
    tier: str
    name: str
    bytes_per_token: float
    bytes_per_s: float | None
    why_unmeasured: str | None = None

    @property
    def seconds(self) -> float | None:
        return self.bytes_per_token / self.bytes_per_s if self.bytes_per_s else None


def matmul_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Multiply-adds ×2 per second of a prefill-shaped matrix product in `dtype`, the best of three."""
    a = torch.randn(512, 1024, dtype=dtype, device=device)
    b = torch.randn(1024, 2816, dtype=dtype, device=device)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        (a @ b).sum().item()
        best = min(best, time.perf_counter() - start)
    return 2 * 512 * 1024 * 2816 / best


def links(plan: Plan, machine: Machine) -> list[Link]:
    """Each tier one decoded token reads from, with its bytes (one sequence at full context) and bandwidth."""
    blocks = max(1, -(-plan.context // plan.block_size))  # one sequence's
    all_blocks = max(1, sum(plan.kv_blocks.values()))
    out = []
    memory = None  # one probe of the device's memory: on a CPU, the device and host tiers are the same RAM
    for tier in ("device", "host", "disk"):
        weights = plan.count(tier) * plan.layer_bytes + (plan.globals_bytes if tier == "device" else 0)
        kv = blocks * plan.block_bytes * plan.kv_blocks.get(tier, 0) / all_blocks
        if not weights + kv:
            continue
        if tier == "disk":
            probe = probe_bandwidth("cpu", 64 << 20, directory=machine.disk_at)
            out.append(Link(tier, f"disk ({machine.disk_at})", weights + kv, probe.bytes_per_s, probe.error))
        elif tier == "host" and plan.device.type == "cuda":
            probe = probe_bandwidth(plan.device, 64 << 20)
            out.append(Link(tier, "host→GPU link", weights + kv, probe.bytes_per_s, probe.error))
        else:
            name = "GPU memory" if plan.device.type == "cuda" else "RAM"
            memory = memory or probe_memory(device=plan.device)
            out.append(Link(tier, name, weights + kv, memory.bytes_per_s, memory.error))
    return out


def estimate(plan: Plan, machine: Machine) -> list[str]:
    """Lines for `bench engine plan`: decode and prefill time, their bottleneck, and the RAM assumed."""
    if plan.device.type == "cuda" and not torch.cuda.is_available():
        # Planning for a GPU this machine lacks (sizing a run elsewhere): the placement holds, no time can be measured.
        return [f"host RAM assumed: {fmt_bytes(machine.ram)} available when planned, of which the plan lets "
                f"host-memory tiers take {RAM_SHARE:.0%}",
                "no time estimate: this machine has no CUDA device to measure the GPU's memory, link and matmul speed"]
    measured = links(plan, machine)
    lines = [f"host RAM assumed: {fmt_bytes(machine.ram)} available when planned, of which the plan lets host-memory "
             f"tiers take {RAM_SHARE:.0%} ({fmt_bytes(machine.ram * RAM_SHARE)}); less RAM at run "
             f"time moves layers and KV to disk"]
    unmeasured = [f"{link.name}: {link.why_unmeasured}" for link in measured if link.seconds is None]
    timed = [link for link in measured if link.seconds is not None]
    decode = sum(link.seconds for link in timed)
    if timed:
        worst = max(timed, key=lambda link: link.seconds)
        lines.append(
            f"estimated decode at full context ({plan.context} tokens, one sequence): {decode * 1e3:.1f} ms/token, "
            f"bound by {worst.name} ({worst.seconds / decode:.0%} of it): "
            + "; ".join(f"{link.name} {fmt_bytes(link.bytes_per_token)}/token at {fmt_bytes(link.bytes_per_s)}/s"
                        for link in timed)
            + " (measured here; streaming not overlapped with compute, so an upper estimate)")
    params = (len(plan.layer_tiers) * plan.layer_bytes + plan.globals_bytes) / plan.dtype.itemsize
    flops = matmul_flops(plan.device, plan.compute_dtype)
    compute = 2 * params * plan.context / flops
    passes = -(-plan.context // plan.step_tokens)  # each pass over the weights reads every streamed layer once
    streamed = sum(link.seconds or 0 for link in timed if link.tier != "device") * passes
    bound = "compute" if compute >= streamed else "streaming the weights"
    lines.append(f"estimated prefill of {plan.context} tokens: {compute + streamed:.1f} s, bound by {bound} "
                 f"({2 * params * plan.context / 1e12:.2f} TFLOP at {flops / 1e9:.0f} GFLOP/s measured in "
                 f"{str(plan.compute_dtype).removeprefix('torch.')}, attention left out; {passes} pass(es) over the "
                 f"streamed weights)")
    if unmeasured:
        lines.append("not measured: " + "; ".join(unmeasured))
    return lines
