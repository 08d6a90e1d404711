"""The `own` backend: our engine through the harness, in every placement, against the HF reference."""

import json

import pytest

from backends.base import cpu_affinity
from backends.own_backend import SPIN_COUNT
from harness.run import affinity
from harness.run.runner import Runner
from harness.config.load import load_scenario
from tests.conftest import scenario_dict


def run_cells(write_scenario, tiny_model, tmp_path, backends, **extra):
    wl = [{"name": "w", "input_tokens": 40, "output_tokens": 24, "num_requests": 4,
           "load": {"type": "concurrency", "concurrency": 2}}]
    path = write_scenario(scenario_dict(tiny_model, backends, wl, record_outputs=True, **extra))
    code = Runner(load_scenario(path), str(path), tmp_path / "out", write_report=False).run()
    cells = {c["backend"]: c for c in json.loads((tmp_path / "out" / "results.json").read_text())["cells"]}
    return code, cells


def serve_one(backend, prompt: list[int], max_tokens: int) -> list:
    """Start the backend, stream one request through it, stop it: the request's events."""
    import asyncio

    from backends.base import Request

    async def run():
        await backend.start()
        try:
            return [e async for e in backend.generate(Request(0, "", prompt, max_tokens=max_tokens))]
        finally:
            await backend.stop()

    return asyncio.run(run())


def outputs(tmp_path, cell):
    lines = (tmp_path / "out" / cell["requests_file"]).read_text().splitlines()
    return {r["id"]: r["output_token_ids"] for r in map(json.loads, lines)}


@pytest.mark.slow
def test_every_placement_gives_hf_greedy_tokens_and_counts_its_bytes(write_scenario, tiny_model, tmp_path):
    backends = [{"name": "hf", "kind": "transformers"},
                {"name": "own", "kind": "own", "options": {"max_batch": 2}},
                {"name": "own-disk", "kind": "own", "options": {"weights": "disk", "kv": "disk", "block_size": 16,
                                                                "num_threads": 1}}]
    code, cells = run_cells(write_scenario, tiny_model, tmp_path, backends)
    assert code == 0, {k: c["error"] for k, c in cells.items()}
    reference = outputs(tmp_path, cells["hf"])
    for name in ("own", "own-disk"):
        c = cells[name]
        assert outputs(tmp_path, c) == reference, name
        assert c["metrics"]["total_output_tokens"] == 4 * 24 and c["token_counts"]["output"] == ["engine"]
        assert c["logical_io"]["tokens"]["decode"] > 0
    disk = cells["own-disk"]
    streamed = disk["logical_io"]["transfers"]["decode/disk->host"]["bytes"]
    assert streamed > 0 and disk["logical_io"]["decode_bound"]["ratio_to_bound"] > 0
    assert disk["resources"]["whole"]["max_offload_dir_bytes"] > 0  # the KV blocks on disk, measured from outside
    assert "decode/disk->host" not in cells["own"]["logical_io"]["transfers"]  # resident: nothing streamed
    # What decides CPU speed, as the engine's process reports it (the gate compares it): the threads torch uses,
    # idle OpenMP threads that sleep rather than spin (a spinning pair collapsed on a shared core), the CPUs allowed.
    # The worker keeps a CPU for its load generator (resources.isolate_client): the engine gets the rest, and as many
    # threads unless told otherwise.
    engine_cpus = affinity.plan(True).engine_cpus or cpu_affinity()
    for name, threads in (("own", len(engine_cpus)), ("own-disk", 1)):
        engine = cells[name]["engine"]
        assert engine["torch_threads"] == threads and engine["omp_wait_policy"] == "PASSIVE", engine
        assert engine["omp_spin_count"] == str(SPIN_COUNT) and engine["threads_note"] is None  # bounded spinning
        assert engine["cpu_affinity"] == engine_cpus and engine["max_batch"] >= 1
    assert cells["hf"]["engine"]["torch_threads"] == len(engine_cpus)


def test_threads_follow_the_cpus_the_engine_may_run_on():
    """One torch thread per CPU the worker gave the engine unless num_threads says otherwise, and never more threads
    than CPUs (they would wait for each other at every parallel region), with a note saying so."""
    from backends.base import thread_count

    assert thread_count(None, None, 2) == (2, None)  # not isolated: every CPU it may use
    assert thread_count(None, 1, 1) == (1, None)  # the worker kept a CPU for its load generator
    assert thread_count(1, 3, 4) == (1, None)
    assert thread_count(2, 1, 1) == (1, "num_threads 2 capped at 1: the engine may run on 1 CPU(s)")


@pytest.mark.parametrize("policy,environment", [
    (None, {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}),
    ("passive", {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}),
    ("active", {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "INFINITE"})])
def test_the_wait_policy_sets_the_spin_count_too(policy, environment):
    """GOMP_SPINCOUNT wins over OMP_WAIT_POLICY in libgomp: every policy sets both, so an inherited one changes
    nothing."""
    from backends.base import BackendSpec
    from backends.own_backend import OwnBackend

    options = {} if policy is None else {"omp_wait_policy": policy}
    assert OwnBackend.process_environment(BackendSpec(name="o", kind="own", options=options)) == {
        **environment, "MALLOC_ARENA_MAX": "1"}


def test_a_resident_decode_is_compared_with_memory_bandwidth(tiny_model, tmp_path):
    """Nothing streamed on a CPU: the bound is the weights and KV each decode step reads, over memory bandwidth."""
    from backends.base import BackendSpec, CellContext, ModelInfo
    from backends.own_backend import OwnBackend

    backend = OwnBackend(BackendSpec(name="o", kind="own", options={"max_context": 64}), ModelInfo("tiny", tiny_model),
                         CellContext(dir=tmp_path))
    serve_one(backend, list(range(5, 25)), 6)
    io = backend.logical_io()
    bound = io["decode_bound"]
    plan = backend.engine.plan
    weights = plan.count("device") * plan.layer_bytes + backend.engine.model.globals.lm_head.nbytes
    assert bound["link"] == "memory" and bound["probe_bytes_per_s"] > 0 and bound["ratio_to_bound"] > 0
    assert weights < bound["bytes_per_token"] < weights * 1.1  # plus the norm and the KV read
    assert io["read_bytes"]["decode"] == bound["bytes_per_token"] * io["tokens"]["decode"]


def test_the_engine_is_built_on_the_thread_that_steps_it(tiny_model, tmp_path):
    """All of the engine's torch work on one thread (own_engine.serving: OpenMP pools per thread), and its tokens
    are chosen there."""
    import threading

    from backends.base import BackendSpec, CellContext, ModelInfo
    from backends.own_backend import OwnBackend

    backend = OwnBackend(BackendSpec(name="o", kind="own", options={"max_context": 64}), ModelInfo("tiny", tiny_model),
                         CellContext(dir=tmp_path))
    threads, load, deliver = [], backend._load, backend.deliver
    backend._load = lambda: threads.append(threading.current_thread()) or load()
    backend.deliver = lambda queue, item: threads.append(threading.current_thread()) or deliver(queue, item)
    serve_one(backend, list(range(5, 25)), 4)
    assert len(threads) == 1 + 4 + 1 and set(threads) == {backend.loop.thread}  # load, 4 tokens, the finish


def test_a_budget_too_small_fails_the_cell_clearly(write_scenario, tiny_model, tmp_path):
    backends = [{"name": "tiny-budget", "kind": "own", "options": {"vram_budget": "64KiB"}}]
    code, cells = run_cells(write_scenario, tiny_model, tmp_path, backends)
    assert code == 1 and "own engine" in cells["tiny-budget"]["error"] and "budget" in cells["tiny-budget"]["error"]


def test_bad_placement_is_a_scenario_error(write_scenario, tiny_model):
    from typer.testing import CliRunner

    from harness.cli import app

    b = [{"name": "o", "kind": "own", "options": {"weights": "tape"}}]
    r = CliRunner().invoke(app, ["validate", str(write_scenario(scenario_dict(tiny_model, b)))])
    assert r.exit_code == 2 and "backends[0].options.weights" in r.output and "disk" in r.output


def test_the_bandwidth_probe_never_costs_the_cell_its_results(tiny_model, tmp_path, monkeypatch):
    """Weights streamed in place from disk with KV resident write nothing under offload_dir, so it did not exist
    when the probe ran after the measurement (FileNotFoundError); and a probe on a full disk must report, not
    raise."""
    import errno

    from backends.base import BackendSpec, CellContext, ModelInfo
    from backends.own_backend import OwnBackend

    offload = tmp_path / "offload" / "not-yet"
    spec = BackendSpec(name="o", kind="own", options={"weights": "disk", "kv": "gpu", "offload_dir": str(offload),
                                                      "pack_weights": False})
    backend = OwnBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))
    events = serve_one(backend, list(range(5, 25)), 6)
    assert sum(getattr(e, "n_tokens", 0) for e in events) == 6
    bound = backend.logical_io()["decode_bound"]
    assert bound["ratio_to_bound"] > 0 and bound["probe_bytes"] > 0 and not offload.exists()

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("own_engine.bandwidth.os.fsync", no_space)
    io = backend.logical_io()
    assert "No space left on device" in io["decode_bound"]["probe_error"] and "ratio_to_bound" not in io["decode_bound"]
    assert io["tokens"]["decode"] == 5


def test_requests_join_the_running_batch_and_get_their_tokens_alone(tiny_model, tmp_path):
    """Requests arriving while others decode join them between steps (the scheduler, not a static batch); each
    gets the greedy tokens it gets alone, and the second one on the same prompt reuses its cached blocks."""
    import asyncio

    from backends.base import BackendSpec, CellContext, ModelInfo, Request, TokenEvent
    from backends.own_backend import OwnBackend
    from own_engine import Engine

    prompts = [list(range(5, 45)), list(range(50, 60)), list(range(5, 45))]
    spec = BackendSpec(name="o", kind="own", options={"max_batch": 3, "block_size": 16, "prefill_chunk": 8,
                                                      "max_context": 128})
    backend = OwnBackend(spec, ModelInfo("tiny", tiny_model), CellContext(dir=tmp_path))

    async def one(i: int, delay: float):
        await asyncio.sleep(delay)
        events = [e async for e in backend.generate(Request(i, "", prompts[i], max_tokens=30))]
        return [t for e in events if isinstance(e, TokenEvent) for t in e.token_ids], events[-1]

    async def run():
        await backend.start()
        try:
            return await asyncio.gather(one(0, 0), one(1, 0.3), one(2, 0.6))
        finally:
            await backend.stop()

    results = asyncio.run(run())
    with Engine.from_pretrained(tiny_model, block_size=16, max_context=128, prefix_cache=False) as engine:
        expected = [engine.generate(p, max_new_tokens=30, ignore_eos=True) for p in prompts]
    assert [tokens for tokens, _ in results] == expected
    assert all(usage.output_tokens == 30 for _, usage in results)
    io = backend.logical_io()
    assert io["prefix_cache"]["hit_blocks"] >= 2 and io["preemptions"] == 0
    assert backend.environment()["step_tokens"] == 8
