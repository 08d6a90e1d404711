"""The storage side of a cell: device counters, offload-folder sizes, the page cache, and free space.

Per-process disk bytes live in harness/measure/monitor.py (they need the process tree); this file holds what is
per device, per folder or per file.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

from llmbench.units import fmt_bytes

SECTOR = 512  # /proc/diskstats counts 512-byte sectors whatever the device's real sector size


def physical_disks() -> list[str]:
    """Whole disks backed by hardware (or a hypervisor): /sys/block entries with a `device` link.

    Partitions are not in /sys/block, and loop, ram, zram, dm-* and md* have no `device`, so each byte is
    counted once, at the device that really moved it.
    """
    root = Path("/sys/block")
    return sorted(p.name for p in root.iterdir() if (p / "device").exists()) if root.is_dir() else []


def device_bytes(disks: Iterable[str]) -> tuple[int, int]:
    """(bytes read, bytes written) since boot, summed over `disks`, from /proc/diskstats."""
    wanted, read, written = set(disks), 0, 0
    with open("/proc/diskstats") as f:
        for line in f:
            fields = line.split()
            if fields[2] in wanted:
                read += int(fields[5]) * SECTOR
                written += int(fields[9]) * SECTOR
    return read, written


def _walk_files(paths: Iterable[str | os.PathLike], file_links: bool) -> Iterator[str]:
    """Regular files under `paths` (each a file or a folder). Links to folders are never followed; links to
    files are when `file_links` (a Hugging Face snapshot is a folder of links to blobs)."""
    stack = [os.fspath(p) for p in paths]
    while stack:
        path = stack.pop()
        try:
            with os.scandir(path) as it:
                for e in it:
                    if e.is_dir(follow_symlinks=False):
                        stack.append(e.path)
                    elif e.is_file(follow_symlinks=file_links):
                        yield e.path
        except NotADirectoryError:
            yield path
        except FileNotFoundError:  # not created yet, or an engine deleted it while we walked
            continue


def dir_bytes(paths: Iterable[str | os.PathLike]) -> int:
    """Disk space allocated to the files under `paths` (st_blocks, so sparse files count what they use)."""
    total = 0
    for path in _walk_files(paths, file_links=False):
        try:
            total += os.lstat(path).st_blocks * 512
        except FileNotFoundError:
            pass
    return total


def drop_page_cache(paths: Iterable[str | os.PathLike]) -> int:
    """Evict the files under `paths` from the page cache; returns how many files were dropped.

    Dirty pages cannot be dropped, so each file is fsynced first. Pages that a live process has mapped stay
    resident: check the outcome with page_cache_state() rather than assuming it.
    """
    n = 0
    for path in _walk_files(paths, file_links=True):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            n += 1
        finally:
            os.close(fd)
    return n


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_MAP_FAILED = ctypes.c_void_p(-1).value


def _resident_pages(path: str, size: int) -> int:
    # Python's mmap module has no mincore(2): map the file with libc directly and ask which pages are cached.
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr == _MAP_FAILED:
            raise OSError(ctypes.get_errno(), f"mmap {path}: {os.strerror(ctypes.get_errno())}")
        try:
            vec = (ctypes.c_ubyte * ((size + mmap.PAGESIZE - 1) // mmap.PAGESIZE))()
            if _libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore {path}: {os.strerror(ctypes.get_errno())}")
            return sum(b & 1 for b in bytes(vec))
        finally:
            _libc.munmap(addr, size)
    finally:
        os.close(fd)


def resident_fraction(paths: Iterable[str | os.PathLike]) -> float | None:
    """Share of the bytes of the files under `paths` that sit in the page cache (mincore), or None when
    there are no non-empty files or the kernel refuses to say."""
    pages = resident = 0
    try:
        for path in _walk_files(paths, file_links=True):
            size = os.stat(path).st_size
            if size:
                pages += (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                resident += _resident_pages(path, size)
    except OSError:
        return None
    return resident / pages if pages else None


def cache_label(fraction: float | None) -> str:
    """'warm' (≥ 90 % of the bytes cached), 'cold' (≤ 10 %), 'partial' in between, 'unknown' without a reading."""
    if fraction is None:
        return "unknown"
    return "warm" if fraction >= 0.9 else "cold" if fraction <= 0.1 else "partial"


def page_cache_state(paths: Iterable[str | os.PathLike]) -> str:
    """cache_label() of the files under `paths`, measured now."""
    return cache_label(resident_fraction(paths))


def check_disk_space(path: str | os.PathLike, need_bytes: int) -> str | None:
    """A message when the filesystem that holds (or will hold) `path` has less than `need_bytes` free."""
    p = Path(path).absolute()
    while not p.exists():  # the folder may not exist yet: its nearest existing parent is on the same filesystem
        p = p.parent
    free = shutil.disk_usage(p).free
    if free < need_bytes:
        return f"{path}: needs {fmt_bytes(need_bytes)} of free disk space, but its filesystem has {fmt_bytes(free)} free"
    return None
