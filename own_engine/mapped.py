"""Files memory-mapped as torch byte tensors: compute reads them in place, from the page cache when warm."""
import contextlib
import functools
import mmap
import sys

import torch

from .errors import EngineError

MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14+; Python 3.11's mmap does not name it


@functools.cache
def can_populate() -> bool:
    """Whether this kernel faults a mapping's pages in when asked (Mapped.populate), asked of one page of anonymous
    memory: older kernels (RHEL 8's 4.18, Ubuntu 20.04's 5.4) refuse the advice."""
    if sys.platform != "linux":
        return False
    probe = mmap.mmap(-1, mmap.PAGESIZE)
    try:
        probe.madvise(MADV_POPULATE_WRITE)
        return True
    except OSError:
        return False
    finally:
        probe.close()


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

    def populate(self) -> None:
        """Fault every page in writable now, so that the first writes to a new file do not each fault inside a
        request; where the kernel can (can_populate: the plan asks only then). A refusal all the same (out of
        memory) leaves the pages to fault in as they are written."""
        with contextlib.suppress(OSError):
            self.map.madvise(MADV_POPULATE_WRITE)

    def will_need(self, start: int, end: int) -> None:
        """Ask the kernel to read a byte range ahead (it returns at once; a warm page cache makes it a no-op)."""
        start -= start % mmap.PAGESIZE
        self.map.madvise(mmap.MADV_WILLNEED, start, end - start)
