"""The compute policy: decided by the CPU's instruction set where that is enough (faked here as each kind of CPU the
engine meets), else by a micro-benchmark measured once per machine and kept in a cache file."""
import json
from types import SimpleNamespace

import pytest
import torch

from own_engine import compute, matmul
from own_engine.compute import (Crossover, MatmulForms, choose, cpu_flags, crossover, matmul_forms, measure,
                                measure_forms)

from .conftest import AVX2, EPYC, XEON_AMX

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags,stored,asked,expected,narrow,why", [
    # bf16 instructions: bf16 weights compute as stored, nothing measured
    (EPYC, torch.bfloat16, None, torch.bfloat16, 0, "this CPU has bfloat16 instructions: avx512_bf16"),
    (XEON_AMX, torch.bfloat16, None, torch.bfloat16, 0, "bfloat16 instructions: amx_bf16, avx512_bf16"),
    # none: float32, each layer upcast per use; decode passes read bf16 as stored below the measured crossover
    (AVX2, torch.bfloat16, None, torch.float32, 8, "no bfloat16 instructions"),
    (XEON_AMX, torch.float16, None, torch.float32, 8, "no float16 instructions (none of amx_fp16"),
    # float32 weights: float32, whatever the CPU
    (EPYC, torch.float32, None, torch.float32, 0, "the stored dtype"),
    (AVX2, torch.float32, None, torch.float32, 0, "the stored dtype"),
    # asked: what was asked, with the crossover measured where compute is wider than storage
    (EPYC, torch.bfloat16, torch.float32, torch.float32, 8, "asked for; passes of fewer than 8 rows"),
    (AVX2, torch.bfloat16, torch.bfloat16, torch.bfloat16, 0, "asked for"),
], ids=["epyc-bf16", "xeon-amx-bf16", "avx2-bf16", "xeon-fp16", "epyc-fp32", "avx2-fp32", "epyc-asked-fp32",
        "avx2-asked-bf16"])
def test_the_policy_on_each_kind_of_cpu(fake_cpu, flags, stored, asked, expected, narrow, why):
    measured = fake_cpu(flags)
    c = choose(CPU, stored, asked)
    assert (c.dtype, c.narrow_rows) == (expected, narrow) and why in c.reason
    assert measured == ([(stored, expected)] if narrow else [])  # the benchmark only where flags do not decide
    # the products' forms, for every dtype they run in: the compute dtype, and the stored one for narrow passes
    assert fake_cpu.forms == [expected] + ([stored] if narrow else [])
    assert [f.dtype for f in c.forms] == [compute.dtype_name(d) for d in fake_cpu.forms]
    if narrow:
        assert "191.00 ms as stored, 186.00 ms converted" in c.reason  # the figures it decided on, at 8 rows


def test_cuda_computes_in_the_stored_dtype(fake_cpu):
    measured = fake_cpu(AVX2)
    c = choose(torch.device("cuda"), torch.bfloat16)
    assert (c.dtype, c.narrow_rows) == (torch.bfloat16, 0) and "cuda multiplies bfloat16 natively" in c.reason
    assert not measured and not fake_cpu.forms and c.form(torch.bfloat16, 1) == "linear"


def test_the_crossover_is_measured_once_per_machine_and_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path / "cache"))
    runs = []

    def fake_measure(stored, compute_dtype):
        runs.append(torch.get_num_threads())
        return Crossover(4, (2, 4), (0.001, 0.003), (0.002, 0.002), None, False)

    monkeypatch.setattr(compute, "measure", fake_measure)
    first = crossover(torch.bfloat16, torch.float32)
    again = crossover(torch.bfloat16, torch.float32)
    file = tmp_path / "cache" / "own_engine" / "compute.json"
    assert runs == [1] and not first.cached and again.cached and first.cache == again.cache == str(file)
    assert (again.narrow_rows, again.as_stored_s) == (4, (0.001, 0.003))
    [key] = [json.loads(k) for k in json.loads(file.read_text())]
    assert key["torch"] == torch.__version__ and key["flags"] == sorted(cpu_flags()) and key["threads"] == 1
    assert key["cpu"] == compute.cpu_model() and (key["stored"], key["compute"]) == ("bfloat16", "float32")

    torch.set_num_threads(2)  # another thread count is another machine, as far as timings go
    crossover(torch.bfloat16, torch.float32)
    assert runs == [1, 2] and len(json.loads(file.read_text())) == 2

    file.write_text("{not json")  # a damaged cache is measured over, and rewritten whole
    assert not crossover(torch.bfloat16, torch.float32).cached and len(runs) == 3
    assert len(json.loads(file.read_text())) == 1

    monkeypatch.setenv("LLMBENCH_CACHE", str(file))  # a cache that cannot be written: measured, not kept
    unkept = crossover(torch.bfloat16, torch.float32)
    assert unkept.cache is None and not unkept.cached and len(runs) == 4


def test_the_micro_benchmark_times_both_paths():
    c = measure(torch.bfloat16, torch.float32)
    assert c.rows == compute.ROWS and len(c.as_stored_s) == len(c.converted_s) == len(c.rows)
    assert all(0 < t < 1 for t in c.as_stored_s + c.converted_s)
    faster = [r for r, stored, converted in zip(c.rows, c.as_stored_s, c.converted_s) if converted < stored]
    assert c.narrow_rows == (faster[0] if faster else 2 * c.rows[-1])


def test_the_flags_are_those_the_harness_records():
    from harness.measure.environment import cpu_isa

    assert set(cpu_isa()) <= cpu_flags()


def test_each_width_takes_the_form_measured_for_the_widest_width_not_above_it(fake_cpu):
    fake_cpu(XEON_AMX)
    c = choose(CPU, torch.bfloat16)
    assert [c.form(torch.bfloat16, rows) for rows in (1, 2, 3, 63, 64, 65, 512)] == (
        ["gemv", "wxt", "wxt", "wxt", "linear", "linear", "linear"])
    assert c.form(torch.float16, 1) == "linear"  # no product runs in a dtype that was not measured
    line = c.forms[0].explain()
    assert line.startswith("bfloat16: 1 row torch.mv; 2-63 rows (w @ x.T).T; 64 rows F.linear; more F.linear")
    assert "torch.mv 0.30 ms" in line


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("bias", [False, True])
def test_every_form_computes_the_same_product(dtype, rows, bias):
    from own_engine.matmul import FORMS, linear

    gen = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 64, generator=gen).to(dtype), torch.randn(48, 64, generator=gen).to(dtype)
    b = torch.randn(48, generator=gen).to(dtype) if bias else None
    ref = torch.nn.functional.linear(x.float(), w.float(), None if b is None else b.float())
    for form in FORMS:
        got = linear(x, w, b, form)
        assert got.shape == (rows, 48) and got.dtype == dtype and got.is_contiguous()
        torch.testing.assert_close(got.float(), ref, rtol=2e-2 if dtype == torch.bfloat16 else 1e-5,
                                   atol=5e-2 if dtype == torch.bfloat16 else 1e-5)


def test_the_forms_micro_benchmark_times_each_candidate(monkeypatch):
    monkeypatch.setattr(compute, "FORM_ROWS", (1, 4))
    monkeypatch.setattr(compute, "WORKING_SET", 1 << 20)
    f = measure_forms(torch.float32)
    assert f.rows == (1, 4) and f.dtype == "float32" and not f.cached
    assert f.seconds["gemv"][1] is None and all(0 < t < 1 for t in f.seconds["linear"] + f.seconds["wxt"])
    assert f.best[1] != "gemv"  # torch.mv multiplies one row
    for at, best in enumerate(f.best):  # F.linear unless another form beat it by the margin
        assert best == "linear" or f.seconds[best][at] * compute.MARGIN < f.seconds["linear"][at]


def test_a_burst_of_load_as_long_as_one_runs_timings_decides_no_timing(monkeypatch):
    """The micro-benchmarks take the best of REPEATS timings of each run in rounds over all runs: a burst that
    spans as many consecutive calls as one run's timings (which, taken in a row, it would all slow) costs each run
    one or two of them."""
    clock, calls = [0.0], [0]

    def run():
        calls[0] += 1
        clock[0] += 10.0 if 8 <= calls[0] < 8 + compute.REPEATS else 1.0  # calls 8-12: the second run's 5, in a row

    monkeypatch.setattr(compute, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    assert compute._fastest({key: run for key in "abc"}) == {"a": 1.0, "b": 1.0, "c": 1.0}
    assert calls[0] == 3 * (compute.REPEATS + 1)


def test_without_the_tile_kernel_its_form_is_no_candidate_and_falls_back(monkeypatch):
    """A CPU without AMX (or no compiler): "tiles" is not timed, not in the cache's key, and a product asked in
    that form (a cache from elsewhere) is computed by torch."""
    monkeypatch.setattr(matmul, "tile_matmul", lambda: None)
    monkeypatch.setattr(compute, "FORM_ROWS", (1, 4))
    monkeypatch.setattr(compute, "WORKING_SET", 1 << 20)
    assert matmul.forms_here(torch.bfloat16) == ("linear", "gemv", "wxt")
    f = measure_forms(torch.bfloat16)
    assert f.seconds["tiles"] == (None, None) and "tiles" not in f.best
    x, w = torch.randn(4, 64).bfloat16(), torch.randn(32, 64).bfloat16()
    assert torch.equal(matmul.linear(x, w, None, "tiles"), matmul.linear(x, w, None, "wxt"))


def test_the_forms_are_measured_once_per_machine_and_dtype(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    runs = []

    def fake(dtype):
        runs.append(dtype)
        return MatmulForms(compute.dtype_name(dtype), (1,), ("gemv",), {"gemv": (1e-4,)}, None, False)

    monkeypatch.setattr(compute, "measure_forms", fake)
    first, again = matmul_forms(torch.bfloat16), matmul_forms(torch.bfloat16)
    assert runs == [torch.bfloat16] and not first.cached and again.cached and again.best == ("gemv",)
    matmul_forms(torch.float32)
    assert runs == [torch.bfloat16, torch.float32]
    keys = [json.loads(k) for k in json.loads((tmp_path / "own_engine" / "compute.json").read_text())]
    assert [k["dtype"] for k in keys] == ["bfloat16", "float32"] and all(k["threads"] == 1 for k in keys)
    assert keys[0]["forms"] == list(matmul.forms_here(torch.bfloat16))  # a CPU gaining a form measures anew
