import ctypes
import platform

import pytest
import torch

from own_engine import allocator


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_an_engine_on_the_cpu_serves_a_passs_megabytes_from_the_heap(tiny_model):
    from own_engine import Engine

    allocator._done.clear()
    Engine(tiny_model("llama_gqa2")[0])
    assert allocator._done == [True]  # glibc took both thresholds, once for the process
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    mapped = libc.mallinfo2().hblkhd
    activations = torch.empty(512, 2816, dtype=torch.bfloat16)  # one prefill chunk's MLP activations: 2.9 MB
    assert libc.mallinfo2().hblkhd == mapped, "a block of this size was given its own mmap: fresh pages each pass"
    del activations
