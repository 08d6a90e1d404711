"""GPUs through NVML (nvidia-ml-py): the inventory, the VRAM a budget is a share of, and the samples the resource
monitor takes; torch's allocator for in-process engines. What cannot be measured is named with its reason in
`unavailable`, never reported as 0."""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Sequence
from typing import Any, NamedTuple

import psutil

# Result keys (harness/measure/monitor.py) that NVML feeds.
NVML_MEASURES = ("max_global_vram_bytes", "max_process_vram_bytes", "gpu_util_mean", "power_w_mean", "energy_j")


class GpuReading(NamedTuple):
    global_used: int | None  # bytes used on the selected devices, by anyone
    process_used: int | None  # bytes used by the given pids
    util: float | None  # % busy, mean over devices
    power_w: float | None  # summed over devices
    energy_mj: int | None  # cumulative counter since the driver loaded, summed over devices


class Nvml:
    """Reads the GPUs a cell uses: `indices` (NVML order), else those CUDA_VISIBLE_DEVICES names, else all."""

    def __init__(self, indices: Sequence[int] | None = None):
        self.unavailable: dict[str, str] = {}
        self.handles: list[Any] = []
        self._nv: Any = None  # the pynvml module once nvmlInit() succeeded
        self._foreign_pids = False  # NVML listed a pid that does not exist in our PID namespace
        self._matched_pids = False
        try:
            import pynvml
        except ImportError:
            self._lose(NVML_MEASURES, "nvidia-ml-py is not installed")
            return
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as e:
            self._lose(NVML_MEASURES, f"NVML: {e}")
            return
        self._nv = pynvml
        try:
            self.handles = self._select(indices)
        except (pynvml.NVMLError, ValueError) as e:  # e.g. CUDA_VISIBLE_DEVICES=-1 to hide every GPU
            self._lose(NVML_MEASURES, f"NVML: selecting GPUs (indices {indices}, CUDA_VISIBLE_DEVICES="
                                      f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): {e}")
        if not self.handles:
            self._lose(NVML_MEASURES, "NVML: no GPU selected")
        # Older GPUs and drivers lack some counters: find out once, before sampling.
        for measure, probe in (("gpu_util_mean", self._util), ("power_w_mean", self._power),
                               ("energy_j", self._energy), ("max_process_vram_bytes", lambda: self._process(set()))):
            if measure not in self.unavailable:
                try:
                    probe()
                except pynvml.NVMLError as e:
                    self._lose((measure,), f"NVML: {e}")

    def _select(self, indices: Sequence[int] | None) -> list[Any]:
        nv = self._nv
        if indices is None:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
            if not visible:
                return [nv.nvmlDeviceGetHandleByIndex(i) for i in range(nv.nvmlDeviceGetCount())]
            # Integers are taken as NVML indices, which holds with CUDA_DEVICE_ORDER=PCI_BUS_ID; UUIDs always hold.
            return [nv.nvmlDeviceGetHandleByUUID(v) if v.startswith(("GPU-", "MIG-"))
                    else nv.nvmlDeviceGetHandleByIndex(int(v)) for v in (s.strip() for s in visible.split(","))]
        return [nv.nvmlDeviceGetHandleByIndex(i) for i in indices]

    def _lose(self, measures: Sequence[str], reason: str) -> None:
        for m in measures:
            self.unavailable.setdefault(m, reason)

    def _util(self) -> float:
        return float(sum(self._nv.nvmlDeviceGetUtilizationRates(h).gpu for h in self.handles) / len(self.handles))

    def _power(self) -> float:
        return float(sum(self._nv.nvmlDeviceGetPowerUsage(h) for h in self.handles) / 1000)

    def _energy(self) -> int:
        return int(sum(self._nv.nvmlDeviceGetTotalEnergyConsumption(h) for h in self.handles))

    def _process(self, pids: Collection[int]) -> int:
        used = 0
        for h in self.handles:
            for p in self._nv.nvmlDeviceGetComputeRunningProcesses(h):
                if p.pid in pids:
                    if p.usedGpuMemory is None:  # e.g. MIG, or a driver that withholds it
                        raise self._nv.NVMLError(self._nv.NVML_ERROR_NOT_SUPPORTED)
                    used += p.usedGpuMemory
                    self._matched_pids = True
                elif not self._foreign_pids and not psutil.pid_exists(p.pid):
                    self._foreign_pids = True
        return used

    def read(self, pids: Collection[int]) -> GpuReading:
        """One sample; a measure that fails mid-run is marked unavailable from then on."""
        def get(measure: str, fn: Callable[[], Any]) -> Any:
            if measure in self.unavailable:
                return None
            try:
                return fn()
            except self._nv.NVMLError as e:
                self._lose((measure,), f"NVML: {e}")
                return None

        return GpuReading(
            get("max_global_vram_bytes", lambda: sum(self._nv.nvmlDeviceGetMemoryInfo(h).used for h in self.handles)),
            get("max_process_vram_bytes", lambda: self._process(pids)),
            get("gpu_util_mean", self._util), get("power_w_mean", self._power), get("energy_j", self._energy))

    def close(self) -> None:
        if self._nv is not None:
            self._nv.nvmlShutdown()
            self._nv = None
        # In a container with its own PID namespace NVML reports host pids, which match none of ours: 0 would lie.
        if self._foreign_pids and not self._matched_pids:
            self._lose(("max_process_vram_bytes",), "NVML lists GPU processes by pids that do not exist in this PID "
                       "namespace (a container?), so the process tree's VRAM cannot be attributed")


def torch_peak_reader(device: int | None = None) -> Callable[[], tuple[int, int]] | None:
    """For in-process torch engines: a callable returning (max allocated, max reserved) bytes since its previous
    call, summed over `device` or every visible GPU; None when torch has no CUDA. It resets torch's peak
    counters at every call (so each sample holds the true peak of its interval): do not combine it with an
    engine that reads those counters itself (vLLM's in-process memory profiling does)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    devices = [device] if device is not None else list(range(torch.cuda.device_count()))

    def read() -> tuple[int, int]:
        # touching the counters would create a CUDA context here; torch leaves is_initialized unannotated
        if not torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
            return 0, 0
        a = sum(torch.cuda.max_memory_allocated(d) for d in devices)
        r = sum(torch.cuda.max_memory_reserved(d) for d in devices)
        for d in devices:
            torch.cuda.reset_peak_memory_stats(d)
        return a, r

    return read


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
