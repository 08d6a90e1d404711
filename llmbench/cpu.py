"""This CPU as /proc/cpuinfo describes it: its model name and feature flags, read in one place for the results'
environment and the engine's compute policy."""
import platform
from functools import lru_cache
from pathlib import Path


def cpuinfo(*keys: str) -> str | None:
    """The first /proc/cpuinfo line named one of `keys`, its value; None where there is none or no such file."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in keys:
                return value.strip()
    except OSError:
        pass
    return None


@lru_cache(maxsize=1)
def cpu_model() -> str:
    return cpuinfo("model name") or platform.processor() or platform.machine()


def cpuinfo_flags() -> frozenset[str] | None:
    """The feature flags: the `flags` line (x86) or the `Features` line (aarch64); None where neither can be read."""
    line = cpuinfo("flags", "Features")
    return None if line is None else frozenset(line.split())
