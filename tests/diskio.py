"""File I/O that reaches the disk, for the monitor's tests and the child processes they start."""

import os
from pathlib import Path

MiB = 1 << 20


def write_file(path: Path, nbytes: int) -> None:
    with open(path, "wb") as f:
        for _ in range(nbytes // MiB):
            f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())


def read_cold(path: Path) -> int:
    """Read a whole file from the disk: evicted first, and whole so that readahead adds nothing past EOF."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        n = 0
        while chunk := os.read(fd, MiB):
            n += len(chunk)
        return n
    finally:
        os.close(fd)
