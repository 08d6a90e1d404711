"""`bench engine plan`'s estimate: decode and prefill time from the plan's bytes per tier and bandwidths measured
here, the link that bounds them, and the host RAM the plan assumed."""

from typer.testing import CliRunner

from harness.cli import app
from harness.inputs.models import hf_config
import torch

from harness.plan_estimate import links
from own_engine.config import ModelConfig
from own_engine.engine_config import EngineConfig
from own_engine.planner import RAM_SHARE, Machine, make_plan


def test_every_byte_a_token_reads_is_on_one_link():
    """Streamed from disk: the 4 layers and the sequence's KV blocks come from disk, the head and norm from RAM."""
    cfg = ModelConfig.from_dict(hf_config("tiny-llama"), source="preset tiny-llama")
    config = EngineConfig.of(max_context=512, weights="disk", kv="disk")
    machine = Machine.here(cfg, config)
    plan = make_plan(cfg, config, machine)
    by_tier = {link.tier: link for link in links(plan, machine)}
    assert set(by_tier) == {"device", "disk"}
    assert by_tier["disk"].bytes_per_token == 4 * plan.layer_bytes + 512 // plan.block_size * plan.block_bytes
    assert by_tier["device"].bytes_per_token == plan.globals_bytes
    assert all(link.bytes_per_s and link.bytes_per_s > 0 for link in by_tier.values())


def test_bench_engine_plan_says_how_long_what_bounds_it_and_the_ram_it_assumed():
    r = CliRunner().invoke(app, ["engine", "plan", "--model", "tiny-llama", "--context", "512"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "host RAM assumed: " in out and f"host-memory tiers take {RAM_SHARE:.0%}" in out
    assert "estimated decode at full context (512 tokens, one sequence):" in out and "bound by RAM (100% of it)" in out
    assert "estimated prefill of 512 tokens:" in out and "bound by compute" in out
    r = CliRunner().invoke(app, ["engine", "plan", "--model", "tiny-llama", "--context", "512", "--weights", "disk",
                                 "--kv", "disk"])
    assert r.exit_code == 0 and "ms/token, bound by disk" in " ".join(r.output.split()), r.output


def test_planning_for_a_gpu_this_machine_lacks_gives_the_placement_without_a_time():
    """Sizing a GPU run from a laptop: `--device cuda` without CUDA used to crash measuring the GPU's bandwidth."""
    r = CliRunner().invoke(app, ["engine", "plan", "--model", "llama-3.1-8b", "--context", "100000",
                                 "--vram-budget", "8GiB", "--device", "cuda"])
    assert r.exit_code == 0, r.output
    out = " ".join(r.output.split())
    assert "layers resident" in out
    if not torch.cuda.is_available():
        assert "no time estimate: this machine has no CUDA device" in out
