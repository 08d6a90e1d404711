"""Files memory-mapped as torch byte tensors: compute reads them in place, from the page cache when warm."""
import mmap
import sys

import torch

from .errors import EngineError


class Mapped:
    """A whole file mapped: read-only ones copy-on-write (never written: pages stay shared with the page cache, and
    torch gets the writable buffer it wants), writable ones shared, so writes reach the file and not our memory."""

    def __init__(self, fd: int, writable: bool = False):
        self.map = mmap.mmap(fd, 0, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_COPY)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def view(self, offset: int, nbytes: int, dtype: torch.dtype) -> torch.Tensor:
        if offset % dtype.itemsize:
            raise EngineError(f"tensor at byte {offset} is not aligned to its {dtype} elements: cannot map it")
        return self.bytes[offset:offset + nbytes].view(dtype)

    def populate(self) -> bool:
        """Fault every page in writable now (MADV_POPULATE_WRITE, Linux 5.14+), so that the first writes to a new
        file do not each fault inside a request; False where the kernel cannot."""
        if sys.platform != "linux":
            return False
        try:
            self.map.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
            return True
        except (OSError, ValueError):
            return False

    def will_need(self, start: int, end: int) -> None:
        """Ask the kernel to read a byte range ahead (it returns at once; a warm page cache makes it a no-op)."""
        start -= start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_WILLNEED, start, end - start)
