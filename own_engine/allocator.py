"""glibc's allocator, told to keep the memory a pass frees for the next pass.

A prefill chunk's activations are megabytes ([512, 2816] bf16: 2.9 MB). By default glibc serves blocks that size with
mmap once its dynamic threshold says so and gives freed heap tops back to the OS (trim), so every pass page-faults
fresh zeroed pages for each of its ~500 outputs. Loading a resident model moves that threshold (large buffers freed
at load), which is how the resident placement came out slower than the disk one. Measured on an Intel Xeon (AMX,
avx512_bf16), 2 threads, 201M bf16 model, 2,048-token prompt, 3 prompts in each of 2 processes: TTFT 0.70-0.86 s
as glibc decides, 0.61-0.66 s with the thresholds below; decode 22.5-23 ms either way.

It is a process-wide setting, made once by the first engine on a CPU, where glibc is the allocator (elsewhere:
nothing to do). The cost: freed memory stays with the process up to its peak, which it reaches again next pass.
Threads started after it allocate from the main arena too (one arena): a thread's own arena gives back each heap a
pass leaves empty, whatever the thresholds, so passes run on a thread made after the engine page-faulted 30,000-60,000
times a 2,048-token prefill of the 201M model and took 445-490 ms (one 1,364), against none and ~400 ms. A thread
that allocated before the engine keeps its arena: the own backend's worker starts with MALLOC_ARENA_MAX=1 instead.
A process's first pass still page-faults its working buffers in (~20,000 faults, ~20 ms, in a 2,048-token prefill of
that model): touch_heap maps them at load, as the kernels for a full chunk are built there.
"""
import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
MMAP_THRESHOLD = 32 << 20  # glibc's largest (64-bit): blocks up to it come from the heap and are reused
TRIM_THRESHOLD = 1 << 30  # free heap tops above this are given back

_done: list[bool] = []
_libc: list[ctypes.CDLL] = []


def keep_freed_memory() -> bool:
    """Set the thresholds once per process; whether glibc took them."""
    if _done:
        return _done[0]
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
        libc.free.argtypes = [ctypes.c_void_p]
        _libc.append(libc)
        ok = all(libc.mallopt(option, value) == 1 for option, value in ((M_MMAP_THRESHOLD, MMAP_THRESHOLD),
                                                                         (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
                                                                         (M_ARENA_MAX, 1)))
    except (OSError, AttributeError):  # not glibc (musl, macOS): its own allocator decides
        ok = False
    _done.append(ok)
    return ok


def touch_heap(nbytes: int) -> None:
    """Fault in `nbytes` of the heap and free them to it, where keep_freed_memory's thresholds hold (elsewhere
    nothing): the heap keeps the pages, and the passes' buffers are carved from them."""
    if not keep_freed_memory():
        return
    libc, block, blocks = _libc[0], MMAP_THRESHOLD // 2, []  # each block below the threshold: from the heap
    try:
        for _ in range(-(-nbytes // block)):
            if not (p := libc.malloc(block)):
                break
            blocks.append(p)
            ctypes.memset(p, 0, block)
    finally:
        for p in reversed(blocks):
            libc.free(p)
