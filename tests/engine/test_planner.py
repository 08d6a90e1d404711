"""The plan is a function of the model, the options and the Machine it is handed; the options and their defaults are
written once (EngineConfig), and the `own` backend and `bench engine plan` are built from them."""
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from own_engine import EngineConfig, EngineError, Machine, ModelConfig, make_plan
from own_engine.compute import Compute

from .conftest import EPYC

BF16 = Compute(torch.bfloat16, 0, "the stored dtype (faked)")


def preset(name: str) -> ModelConfig:
    from harness.inputs.models import hf_config

    return ModelConfig.from_dict(hf_config(name), source=f"preset {name}")


def test_make_plan_reads_nothing_of_the_machine(monkeypatch):
    cfg, config = preset("llama-3.1-8b"), EngineConfig(device="cuda", vram_budget="8GiB", max_context=100_000)
    machine = Machine(ram=64 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16)

    def read(*args, **kwargs):
        raise AssertionError("make_plan read the machine")

    for name in ("psutil.virtual_memory", "shutil.disk_usage", "own_engine.compute.cpu_flags",
                 "own_engine.compute.crossover", "tempfile.gettempdir"):
        monkeypatch.setattr(name, read)
    plan = make_plan(cfg, config, machine)
    assert plan == make_plan(cfg, config, machine) and plan.compute_reason == "the stored dtype (faked)"


def test_the_plan_follows_the_machine_it_is_given():
    cfg, config = preset("llama-3.1-8b"), EngineConfig(device="cuda", vram_budget="8GiB", max_context=100_000)
    roomy = make_plan(cfg, config, Machine(ram=256 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16))
    tight = make_plan(cfg, config, Machine(ram=1 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16))
    assert set(roomy.layer_tiers) == {"device", "host"} and roomy.kv_blocks.get("host", 0) > 0
    assert set(tight.layer_tiers) == {"device", "disk"} and tight.kv_blocks.get("disk", 0) > 0  # no RAM to pin
    # KV on disk for want of memory gets its pages as requests write them; a disk tier memory holds, at load
    small = make_plan(cfg, EngineConfig(device="cuda", vram_budget="8GiB", max_context=4096, kv="disk"),
                      Machine(ram=64 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16))
    assert not roomy.prefault_disk_kv and not tight.prefault_disk_kv and small.prefault_disk_kv
    kv_line = next(line for line in small.explain().splitlines() if line.startswith("KV cache:"))
    assert kv_line.endswith("all layers) (the disk files' pages faulted in at load)"), kv_line
    # ... where the kernel can (Linux 5.14+): on an older one the pages come as requests write them, as the plan says
    old_kernel = make_plan(cfg, EngineConfig(device="cuda", vram_budget="8GiB", max_context=4096, kv="disk"),
                           Machine(ram=64 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16, populate=False))
    kv_line = next(line for line in old_kernel.explain().splitlines() if line.startswith("KV cache:"))
    assert not old_kernel.prefault_disk_kv and kv_line.endswith("all layers)"), kv_line
    with pytest.raises(EngineError, match=r"offload dir /offload: needs .* only 1.00 KiB free on its filesystem"):
        make_plan(cfg, config, Machine(ram=1 << 30, disk=1024, disk_at=Path("/offload"), compute=BF16))


def test_options_and_defaults_are_written_once():
    from backends.own_backend import OwnOptions

    engine, own = EngineConfig.model_fields, OwnOptions.model_fields
    assert set(engine) < set(own) and all(own[name].annotation == engine[name].annotation for name in engine)
    differ = {name for name in engine if own[name].default != engine[name].default}
    assert differ == {"max_context", "max_batch"} and (OwnOptions().max_context, OwnOptions().max_batch) == (8192, 8)
    assert EngineConfig().max_batch == 1 and EngineConfig().context_for(131072) == 4096
    assert EngineConfig(max_context=100).context_for(131072) == 100 and EngineConfig().context_for(1024) == 1024
    worded = {name for name in engine if own[name].description != engine[name].description}
    assert worded == {"vram_budget", "offload_dir"}  # the backend fills those in from the scenario and the cell
    options = OwnOptions(weights="disk", block_size=16, num_threads=2)
    assert EngineConfig.of(options, max_batch=2) == EngineConfig(weights="disk", block_size=16, max_batch=2,
                                                                 max_context=8192)
    with pytest.raises(EngineError, match=r"weights='fast': Input should be 'auto', 'gpu', 'cpu' or 'disk'"):
        EngineConfig.of(weights="fast")


def test_bench_engine_plan_says_what_it_computes_in_and_why(fake_cpu):
    from harness.cli import app

    fake_cpu(EPYC)
    run = CliRunner().invoke(app, ["engine", "plan", "--model", "llama-3.1-8b", "--vram-budget", "8GiB"])
    assert run.exit_code == 0, run.output
    assert "device cpu," in run.output and "context 4096 tokens x batch 1" in run.output  # EngineConfig's defaults
    assert "compute in bfloat16: the stored dtype (this CPU has bfloat16 instructions: avx512_bf16)" in run.output
    assert "a layer of decoding rows" not in run.output  # no AMX: our tile kernel, its precondition, never runs
    assert "read from this machine:" in run.output
    run = CliRunner().invoke(app, ["engine", "plan", "--model", "llama-3.1-8b", "--max-batch", "2", "--context",
                                   "1000"])
    assert run.exit_code == 0 and "context 1000 tokens x batch 2" in run.output
    bad = CliRunner().invoke(app, ["engine", "plan", "--model", "llama-3.1-8b", "--kv", "tape"])
    assert bad.exit_code == 2 and "kv='tape'" in bad.output and "Traceback" not in bad.output


@pytest.mark.parametrize("device, max_batch, chunk, step", [("cpu", 1, 2048, 2048), ("cpu", 4, 2048, 512),
                                                          ("cuda", 1, 512, 512), ("cuda", 4, 512, 512)])
def test_a_pass_is_wide_only_where_no_decode_waits_and_no_vram_pays(device, max_batch, chunk, step):
    """Decodes wait behind each pass: 512 rows where other sequences may decode, a whole chunk (2,048 rows on a
    CPU) in a pass with none; on CUDA the working buffers come out of the budget that holds layers and KV. A chunk
    asked for is both."""
    cfg = preset("llama-3.1-8b")
    config = EngineConfig(device=device, max_batch=max_batch, max_context=8192)  # no budget: all resident
    machine = Machine(ram=64 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16)
    plan = make_plan(cfg, config, machine)
    assert plan.count("device") == cfg.num_layers and (plan.prefill_chunk, plan.step_tokens) == (chunk, step)
    asked = make_plan(cfg, config.model_copy(update={"prefill_chunk": 64}), machine)
    assert (asked.prefill_chunk, asked.step_tokens) == (64, 64)


def test_the_mlp_takes_a_chunk_in_one_part_on_a_cpu_and_parts_of_512_rows_on_a_gpu():
    """On a CPU each part of a chunk's MLP reads its weights again (a 2,048-token prefill of the 201M model: 0.39 s in
    one part, 0.44 s in four); on a GPU 512-row parts bound the activations a VRAM budget pays for."""
    cfg, machine = preset("llama-3.1-8b"), Machine(ram=256 << 30, disk=1 << 40, disk_at=Path("/offload"), compute=BF16)
    cpu = make_plan(cfg, EngineConfig(max_context=8192, prefill_chunk=2048), machine)
    gpu = make_plan(cfg, EngineConfig(device="cuda", vram_budget="8GiB", max_context=8192, prefill_chunk=2048), machine)
    assert (cpu.prefill_chunk, cpu.mlp_rows) == (2048, 2048) and (gpu.prefill_chunk, gpu.mlp_rows) == (2048, 512)
    assert "MLP 2048 rows" in cpu.explain()
