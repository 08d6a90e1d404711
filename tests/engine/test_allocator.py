import ctypes
import platform
import subprocess
import sys

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


TOUCHED = """
import ctypes, resource, sys, torch
from own_engine import allocator
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages, whatever the machine's THP setting
allocator.keep_freed_memory()
if sys.argv[1] == "touched":
    allocator.touch_heap(64 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
pass_ = [torch.ones(512, 2816, dtype=torch.bfloat16) for _ in range(16)]  # 46 MB of a pass's activations
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the thresholds are glibc's")
def test_a_heap_touched_at_load_serves_the_first_pass_without_page_faults(tiny_model, monkeypatch):
    """An engine on the CPU maps its working buffers' pages at load (allocator.touch_heap), so that a process's
    first pass does not fault them in one by one (~20,000 faults in a 2,048-token prefill of a 201M model)."""
    faults = {how: int(subprocess.run([sys.executable, "-c", TOUCHED, how], capture_output=True, text=True,
                                      check=True).stdout) for how in ("touched", "fresh")}
    assert faults["fresh"] > 8_000  # 46 MB of fresh 4 KiB pages
    assert faults["touched"] < 1_000
    from own_engine import Engine, engine

    touched: list[int] = []
    monkeypatch.setattr(engine, "touch_heap", touched.append)
    e = Engine(tiny_model("llama_gqa2")[0])
    assert touched == [e.plan.working_bytes] and "(their pages faulted in at load)" in e.plan.explain()
    e.close()
