"""The resource monitor against real processes, real files and the real disk of this machine.

Byte counts need a filesystem that accounts block I/O per process (ext4, xfs; not tmpfs or overlay upper
layers): the `io_dir` fixture finds one or skips with the reason.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import types
from pathlib import Path

import psutil
import pytest

from harness.measure import disk
from harness.core.gpu import NVML_MEASURES, torch_peak_reader
from harness.measure.monitor import ResourceMonitor, over_budget
from tests.diskio import MiB, read_cold, write_file

ROOT = Path(__file__).resolve().parents[2]  # children import tests.diskio from here


def close(value, expected, rel=0.03):
    return abs(value - expected) <= rel * expected


def accounts_block_io(folder: str) -> bool:
    me = psutil.Process()
    before = me.io_counters().write_bytes
    write_file(Path(folder) / "probe", MiB)
    return me.io_counters().write_bytes - before >= MiB


@pytest.fixture(scope="module")
def io_dir(tmp_path_factory):
    for parent in filter(None, [os.environ.get("LLMBENCH_IO_TEST_DIR"), str(tmp_path_factory.mktemp("io")),
                                "/var/tmp"]):
        folder = tempfile.mkdtemp(prefix="llmbench-io-", dir=parent)
        if accounts_block_io(folder):
            yield Path(folder)
            shutil.rmtree(folder)
            return
        shutil.rmtree(folder)
    pytest.skip("no folder here on a filesystem that shows writes in /proc/self/io (tmpfs/overlay?); "
                "set LLMBENCH_IO_TEST_DIR to a folder on a real disk")


def child(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, **kw)


def wait_tracked(mon: ResourceMonitor, pid: int) -> None:
    """Until the monitor's periodic tree scan has found `pid` (0.2 s apart, later on a loaded machine)."""
    deadline = time.monotonic() + 10
    while pid not in mon.tree.pids():
        assert time.monotonic() < deadline, f"the monitor never found pid {pid}"
        time.sleep(0.02)


def test_child_disk_io_counts_in_the_tree(io_dir):
    # The child writes 64 MiB (two files), then reads 48 MiB back from the disk, and is reaped inside the phase:
    # its bytes must count once, not be lost when it exits nor counted again when they fold into its parent.
    with ResourceMonitor(os.getpid()) as mon:
        proc = child(f"""
            import sys
            from pathlib import Path
            from tests.diskio import write_file, read_cold, MiB
            print("ready", flush=True); sys.stdin.readline()
            d = Path({str(io_dir)!r})
            write_file(d / "a", 48 * MiB); write_file(d / "b", 16 * MiB)
            assert read_cold(d / "a") == 48 * MiB
        """)
        assert proc.stdout.readline() == "ready\n"
        wait_tracked(mon, proc.pid)
        mon.mark("io")
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=60) == 0
        time.sleep(0.1)
        mon.mark("idle")
    io = mon.result()["phases"]["io"]
    assert close(io["disk_write_bytes"], 64 * MiB), io
    assert close(io["disk_read_bytes"], 48 * MiB), io
    # The device counters see the same traffic (plus anything else on the machine's disks).
    assert io["device_write_bytes"] >= 0.97 * 64 * MiB, io
    assert io["device_read_bytes"] >= 0.97 * 48 * MiB, io


def test_orphan_io_is_kept_when_it_is_reaped_outside_the_tree(io_dir):
    # Tree: root R -> child C -> grandchild G. C exits first, so G is reparented to the nearest subreaper:
    # this test process, outside the monitored tree. G writes, and is reaped here, so its bytes fold into no
    # process of the tree: only the monitor's memory of G keeps them. R writes afterwards, so a lost G would show
    # (the tree's totals never go backwards, which alone would hide it).
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_CHILD_SUBREAPER = 36
    grandchild = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from tests.diskio import write_file, MiB
        time.sleep(0.6); write_file(Path({str(io_dir)!r}) / "orphan", 16 * MiB); time.sleep(0.3)
    """)
    flag = io_dir / "g-tracked"
    middle = (f"import os, subprocess, sys, time; print(subprocess.Popen([sys.executable, '-c', {grandchild!r}]).pid, "
              f"flush=True)\nwhile not os.path.exists({str(flag)!r}): time.sleep(0.01)")
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    try:
        root = child(f"""
            import subprocess, sys, time
            from pathlib import Path
            from tests.diskio import write_file, MiB
            subprocess.run([sys.executable, '-c', {middle!r}]); sys.stdin.readline()
            write_file(Path({str(io_dir)!r}) / "after", 8 * MiB); time.sleep(0.2)
        """)
        with ResourceMonitor(root.pid) as mon:
            g = int(root.stdout.readline())
            wait_tracked(mon, g)
            flag.touch()  # C may exit now
            while psutil.Process(g).ppid() != os.getpid():  # until C exits and G is handed to us
                time.sleep(0.02)
            assert os.waitpid(g, 0)[0] == g
            time.sleep(0.1)
            root.communicate("go\n", timeout=30)
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)
    assert close(mon.result()["whole"]["disk_write_bytes"], 24 * MiB)


def test_rss_of_a_child_allocation():
    # Peak minus the peak just before: the child's interpreter is already counted in "before", so the
    # difference is the 200 MiB it touches (bytearray * n writes every byte, so every page is resident).
    with ResourceMonitor(os.getpid()) as mon:
        proc = child("""
            import sys
            print("ready", flush=True); sys.stdin.readline()
            block = bytearray(b"\\x01") * (200 << 20)
            print("allocated", flush=True); sys.stdin.readline()
        """)
        assert proc.stdout.readline() == "ready\n"
        wait_tracked(mon, proc.pid)
        mon.mark("before")
        time.sleep(0.2)
        mon.mark("alloc")
        time.sleep(0.05)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "allocated\n"
        time.sleep(0.2)
        proc.stdin.write("end\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    r = mon.result()
    grown = r["phases"]["alloc"]["max_rss_bytes"] - r["phases"]["before"]["max_rss_bytes"]
    assert close(grown, 200 * MiB), grown / MiB
    assert r["baseline"]["rss_bytes"] < r["phases"]["before"]["max_rss_bytes"]  # the child came after the baseline


def phase_io(io_dir: Path, mark) -> None:
    """Writes 32 MiB in prefill, reads 32 MiB in decode, with quiet gaps so no sample interval straddles both."""
    mark("prefill")
    time.sleep(0.1)
    write_file(io_dir / "kv", 32 * MiB)
    time.sleep(0.1)
    mark("decode")
    time.sleep(0.1)
    assert read_cold(io_dir / "kv") == 32 * MiB
    time.sleep(0.1)
    mark("idle")
    time.sleep(0.1)


@pytest.mark.parametrize("live", [True, False], ids=["mark", "intervals_after"])
def test_bytes_land_in_their_phase(io_dir, live):
    marks: list[tuple[str, float]] = []  # the same perf_counter clock as the requests' stamps
    with ResourceMonitor(os.getpid()) as mon:
        phase_io(io_dir, mon.mark if live else (lambda p: marks.append((p, time.perf_counter()))))
    # Given afterwards as intervals (as the worker derives them from the requests), the rest of the time is idle.
    phases = None if live else {"prefill": [(marks[0][1], marks[1][1])], "decode": [(marks[1][1], marks[2][1])]}
    r = mon.result(phases)
    prefill, decode = r["phases"]["prefill"], r["phases"]["decode"]
    assert close(prefill["disk_write_bytes"], 32 * MiB) and prefill["disk_read_bytes"] < MiB, prefill
    assert close(decode["disk_read_bytes"], 32 * MiB) and decode["disk_write_bytes"] < MiB, decode
    assert close(prefill["duration_s"] + decode["duration_s"] + r["phases"]["idle"]["duration_s"],
                 r["whole"]["duration_s"], rel=0.2)
    tl = mon.timeline(phases)
    names = [p[0] for p in tl["phases"]]
    assert [n for n in names if n != "idle"] == ["prefill", "decode"] and names[-1] == "idle"
    # The timeline's rates integrate back to the counted bytes.
    width = r["whole"]["duration_s"] / len(tl["t"])
    assert close(sum(tl["disk_write_bps"]) * width, r["whole"]["disk_write_bytes"], rel=0.01)
    assert close(sum(tl["disk_read_bps"]) * width, r["whole"]["disk_read_bytes"], rel=0.01)


def run_briefly(**kw) -> tuple[dict, dict]:
    with ResourceMonitor(os.getpid(), **kw) as mon:
        mon.mark("decode")
        time.sleep(0.1)
    return mon.result(), mon.timeline()


def test_missing_gpu_is_unavailable_with_a_reason_not_zero(monkeypatch):
    try:
        import pynvml
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        pytest.skip("this machine has an NVIDIA GPU")
    except ImportError:
        pass
    except pynvml.NVMLError:
        pass
    r, tl = run_briefly()
    for key in NVML_MEASURES:
        assert r["unavailable"][key].startswith(("NVML: ", "nvidia-ml-py")), r["unavailable"]
        assert r["whole"][key] is None and r["phases"]["decode"][key] is None
    assert r["baseline"]["global_vram_bytes"] is None
    assert tl["global_vram_bytes"] is None and tl["process_vram_bytes"] is None
    assert over_budget(r, 8 << 30) is None
    assert torch_peak_reader() is None  # torch without CUDA here: no allocator to read
    assert r["whole"]["max_allocated_bytes"] is None and "max_allocated_bytes" in r["unavailable"]

    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    r, _ = run_briefly()
    assert r["unavailable"]["max_global_vram_bytes"] == "nvidia-ml-py is not installed"


def fake_nvml(state: dict, *, energy: bool = True, pids=None) -> types.ModuleType:
    """NVML cannot run without an NVIDIA driver: this stands in for it, scripted by `state`, to check how the
    monitor attributes, subtracts and integrates what NVML reports."""
    nv = types.ModuleType("pynvml")

    class NVMLError(Exception):
        def __init__(self, value):
            self.value = value

        def __str__(self):
            return "Not Supported"

    def processes(h):
        return [types.SimpleNamespace(pid=p, usedGpuMemory=m)
                for p, m in (pids or [(os.getpid(), state["proc"]), (1, 5 << 30)])]

    def total_energy(h):
        if not energy:
            raise NVMLError(3)
        state["energy_mj"] = state.get("energy_mj", 10**9) + 1500  # 1.5 J more at every reading
        return state["energy_mj"]

    nv.NVMLError, nv.NVML_ERROR_NOT_SUPPORTED = NVMLError, 3
    nv.nvmlInit = nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 1
    nv.nvmlDeviceGetHandleByIndex = lambda i: i
    nv.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=(2 << 30) + state["proc"])
    nv.nvmlDeviceGetComputeRunningProcesses = processes
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=50)
    nv.nvmlDeviceGetPowerUsage = lambda h: 300_000
    nv.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return nv


def test_gpu_measures_are_attributed_per_phase_above_the_baseline(monkeypatch):
    state = {"proc": 100 * MiB, "alloc": (0, 0)}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(state))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with ResourceMonitor(os.getpid(), torch_allocator=lambda: state["alloc"]) as mon:
        mon.mark("load")
        time.sleep(0.05)
        state["proc"], state["alloc"] = (1 << 30) + 100 * MiB, (700 * MiB, 900 * MiB)
        time.sleep(0.15)
        state["proc"], state["alloc"] = 100 * MiB, (0, 0)
        time.sleep(0.05)
        mon.mark("decode")
        time.sleep(0.2)
    r = mon.result()
    assert r["unavailable"].keys() == {"page_cache", "max_offload_dir_bytes"}
    assert r["baseline"]["process_vram_bytes"] == 100 * MiB and r["baseline"]["global_vram_bytes"] == 2148 * MiB
    load, decode = r["phases"]["load"], r["phases"]["decode"]
    # pid 1 is on the GPU too but outside the tree: only the tree's memory, above its baseline, counts.
    assert load["max_process_vram_bytes"] == 1 << 30 and load["max_global_vram_bytes"] == 1 << 30
    assert decode["max_process_vram_bytes"] == 0
    assert load["max_allocated_bytes"] == 700 * MiB and load["max_reserved_bytes"] == 900 * MiB
    assert decode["max_reserved_bytes"] == 0
    assert r["whole"]["energy_j"] == 1.5 * (r["samples"] - 1)  # counter delta between first and last sample
    assert r["whole"]["power_w_mean"] == 300.0 and r["whole"]["gpu_util_mean"] == 50.0
    # The budget holds the absolute footprint: 1.1 GiB at the peak.
    assert over_budget(r, 1 << 30) is True and over_budget(r, 2 << 30) is False and over_budget(r, None) is None
    assert max(mon.timeline()["process_vram_bytes"]) == (1 << 30) + 100 * MiB


def test_gpu_measures_nvml_cannot_give_are_named(monkeypatch):
    # A GPU without an energy counter, and NVML listing pids of another PID namespace (a container).
    state = {"proc": 0}
    monkeypatch.setitem(sys.modules, "pynvml", fake_nvml(state, energy=False, pids=[(2**22 + 7, 1 << 30)]))
    r, _ = run_briefly()
    assert r["whole"]["energy_j"] is None and r["unavailable"]["energy_j"] == "NVML: Not Supported"
    assert r["whole"]["max_process_vram_bytes"] is None and "PID namespace" in r["unavailable"]["max_process_vram_bytes"]
    assert r["whole"]["max_global_vram_bytes"] == 0 and r["whole"]["power_w_mean"] == 300.0


def test_offload_folder_size_is_tracked(tmp_path):
    offload = tmp_path / "offload"
    with ResourceMonitor(os.getpid(), offload_dirs=[offload]) as mon:
        time.sleep(0.1)
        offload.mkdir()
        (offload / "layer0.bin").write_bytes(b"\0" * (8 * MiB))
        time.sleep(0.7)  # folders are sized every 0.5 s
    r = mon.result()
    assert r["whole"]["max_offload_dir_bytes"] >= 8 * MiB and "max_offload_dir_bytes" not in r["unavailable"]


def test_drop_page_cache_makes_the_next_read_hit_the_disk(io_dir):
    model = io_dir / "model"
    model.mkdir()
    write_file(model / "weights.bin", 16 * MiB)
    (model / "weights.bin").read_bytes()
    assert disk.page_cache_state([model]) == "warm"
    me = psutil.Process()
    before = me.io_counters().read_bytes
    (model / "weights.bin").read_bytes()
    assert me.io_counters().read_bytes - before < MiB  # warm: served from memory

    assert disk.drop_page_cache([model]) == 1
    assert disk.page_cache_state([model]) == "cold"
    with ResourceMonitor(os.getpid(), cache_paths=[model]) as mon:
        before = me.io_counters().read_bytes
        (model / "weights.bin").read_bytes()
        assert me.io_counters().read_bytes - before >= 16 * MiB
    r = mon.result()
    assert r["page_cache"] == "cold" and r["page_cache_resident"] <= 0.1  # measured when the run started
    assert disk.page_cache_state([model]) == "warm"


def test_check_disk_space_refuses_more_than_free(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    target = tmp_path / "not" / "yet" / "made"
    msg = disk.check_disk_space(target, free + (1 << 40))
    assert msg is not None and str(target) in msg and "free" in msg
    assert disk.check_disk_space(target, 1 * MiB) is None


def test_cpu_used_outside_the_cell_is_recorded_per_repetition():
    """A busy process outside the monitored tree counts as other processes' CPU, in the repetition it ran in; the
    tree's own work does not. (Other jobs may load this machine too: the neighbour's CPU time is a lower bound.)"""
    import resource

    quiet = child("import sys; sys.stdin.readline()")  # the monitored tree: idle
    spin = "import time\nend = time.perf_counter() + 0.8\nwhile time.perf_counter() < end: pass\n"
    try:
        with ResourceMonitor(quiet.pid, interval_ms=20) as mon:
            t0 = time.perf_counter()
            time.sleep(0.3)
            t1 = time.perf_counter()
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            subprocess.run([sys.executable, "-c", spin], check=True)  # the neighbour, outside the tree
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            t2 = time.perf_counter()
        res = mon.result(repetitions=[(t0, t1), (t1, t2)])
    finally:
        quiet.stdin.write("\n")
        quiet.stdin.flush()
        quiet.wait()
    neighbour = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / (t2 - t1) * 100
    assert neighbour > 30, neighbour
    _, second = res["repetitions"]
    assert second["other_cpu_percent"] >= neighbour - 10, (second, neighbour)
    assert res["whole"]["cpu_percent_mean"] < 5  # none of it is the tree's
    assert second["load_avg_max"] is not None and second["steal_percent"] >= 0
    assert "other_cpu_percent" in mon.timeline()


def test_the_trees_own_cpu_is_not_counted_as_others():
    busy = child("import sys, time\nend = time.perf_counter() + 1.0\nwhile time.perf_counter() < end: pass\n")
    with ResourceMonitor(busy.pid, interval_ms=20) as mon:
        busy.wait()
    whole = mon.result()["whole"]
    assert whole["cpu_percent_mean"] > 30
    # Tree plus others is the machine's busy time: at most every core, so the tree's share is not in both.
    assert whole["cpu_percent_mean"] + whole["other_cpu_percent"] <= 100 * psutil.cpu_count() + 15, whole
