"""The Ray cluster's nodes and what each offers, for `bench doctor --address`: what `placement:` can ask for."""

from __future__ import annotations

from typing import Any

from harness.run.ray_executor import connect, import_ray


def cluster_nodes(address: str | None) -> list[dict[str, Any]]:
    """Every node the cluster knows (ray.nodes(): Alive, NodeManagerHostname, NodeManagerAddress, NodeID,
    Resources, Labels)."""
    ray = import_ray()
    connected = connect(ray, address)
    try:
        return ray.nodes()
    finally:
        if connected:
            ray.shutdown()


def describe_resources(resources: dict[str, float]) -> str:
    """CPU 8, GPU 1, memory 31.2 GiB, accelerator A10G, custom node_a: 1 (Ray's per-node bookkeeping left out)."""
    parts = []
    for key in ("CPU", "GPU"):
        if key in resources:
            parts.append(f"{key} {resources[key]:g}")
    if "memory" in resources:
        parts.append(f"memory {resources['memory'] / 2**30:.1f} GiB")
    parts += [f"accelerator {k.removeprefix('accelerator_type:')}" for k in sorted(resources)
              if k.startswith("accelerator_type:")]
    custom = [f"{k}: {v:g}" for k, v in sorted(resources.items())
              if k not in ("CPU", "GPU", "memory", "object_store_memory") and not k.startswith(("node:",
                                                                                                "accelerator_type:"))]
    if custom:
        parts.append("custom " + ", ".join(custom))
    return ", ".join(parts)
