"""Batching, callbacks, stopping, sampling, offload files, statistics and the plan's explanation."""
import dataclasses
import errno
from collections import namedtuple

import pytest
import torch

from own_engine import Engine, EngineError, ModelConfig, probe_bandwidth
from own_engine.compute import cpu_flags

from .conftest import AVX2, EPYC, plan_here

PROMPTS = [[5, 77, 300, 12, 9, 401, 33], list(range(100, 140)), [7, 7, 8]]


@pytest.mark.parametrize("placement", [dict(weights="gpu", kv="gpu"), dict(weights="disk", kv="disk")])
def test_batch_equals_each_sequence_alone(tiny_model, tmp_path, placement):
    path, _ = tiny_model("qwen2_bias_tied")
    options = dict(block_size=16, prefill_chunk=24, max_context=96, max_batch=3, offload_dir=tmp_path / "off")
    with Engine.from_pretrained(path, **placement, **options) as engine:
        alone = [engine.generate(p, max_new_tokens=20) for p in PROMPTS]
        streamed = []
        together = engine.generate(PROMPTS, max_new_tokens=20, on_token=lambda i, t: streamed.append((i, t)))
        assert together == alone
        assert [t for i, t in streamed if i == 1] == alone[1] and len(streamed) == 60
        assert engine.blocks.num_free == engine.blocks.num_blocks


@pytest.mark.parametrize("flags", [None, AVX2, EPYC], ids=["this_cpu", "avx2", "epyc"])
def test_the_last_layer_computes_only_the_rows_whose_logits_are_wanted(tiny_model, monkeypatch, fake_cpu, flags):
    """Its K and V at every row (the decode after it reads them: test_hf_parity), its MLP at each sequence's last
    row only, however the prompts fall into chunks; the tokens as each sequence alone gives them. On this CPU, and
    on CPUs faked without bf16 instructions (torch's kernels only) and with them but no AMX."""
    import own_engine.model

    if flags:
        fake_cpu(flags)
    path, _ = tiny_model("llama_gqa2")  # 5 layers
    options = dict(block_size=16, prefill_chunk=24, max_context=96, max_batch=3, prefix_cache=False)
    with Engine.from_pretrained(path, weights="gpu", kv="gpu", **options) as engine:
        alone = [engine.generate(p, max_new_tokens=4) for p in PROMPTS]
        rows: list[int] = []
        mlp = own_engine.model.mlp
        monkeypatch.setattr(own_engine.model, "mlp", lambda x, *a: rows.append(len(x)) or mlp(x, *a))
        seqs, _ = engine.prefill(PROMPTS)
        engine.release(seqs)
        monkeypatch.setattr(own_engine.model, "mlp", mlp)  # the fake CPU stays
        # 50 rows in chunks of 24, 24 and 2: four layers at every row, the last at the three prompts' last rows
        assert rows == [24, 24, 2] * 4 + [1, 1, 1]
        assert engine.generate(PROMPTS, max_new_tokens=4) == alone


@pytest.mark.parametrize("flags", [None, AVX2, EPYC], ids=["this_cpu", "avx2", "epyc"])
def test_prefill_products_in_bf16_run_on_rows_padded_to_a_multiple_of_64(tiny_model, monkeypatch, fake_cpu, flags):
    """oneDNN builds F.linear's kernels for each row count it meets: in bf16 on a CPU a chunk's products see only
    multiples of 64 rows (those of a full chunk built at load), alone or beside another chunk in the pass, with the
    logits of unpadded products. A CPU without bf16 instructions computes in float32 (MKL's products build
    nothing): no padding there."""
    import own_engine.model

    if flags:
        fake_cpu(flags)
    path, _ = tiny_model("llama_bf16")
    calls: list[tuple[int, str, tuple[int, ...]]] = []
    linear = own_engine.model.linear
    monkeypatch.setattr(own_engine.model, "linear",
                        lambda x, w, b=None, form="linear": calls.append((len(x), form, w.shape)) or linear(x, w, b, form))
    prompts = [list(range(3, 103)), list(range(200, 400))]  # 100 and 200 tokens
    with Engine.from_pretrained(path, prefill_chunk=192, max_context=512, prefix_cache=False) as engine:
        pad = 64 if {"avx512_bf16", "amx_bf16"} & (flags or cpu_flags()) else 0  # bf16 compute: the policy decides so
        assert engine.plan.pad_rows == pad and ("padded with zeros" in engine.plan.explain()) == bool(pad)
        shapes = {tuple(s) for _, (_, s) in engine.model.weights.layout.tensors.items() if len(s) == 2}
        assert {(rows, tuple(s)) for rows, _, s in calls} == ({(192, s) for s in shapes} if pad else set())

        def logits(together: bool) -> torch.Tensor:
            out = []
            for batch in [prompts] if together else [[p] for p in prompts]:
                seqs, last = engine.prefill(batch)
                engine.release(seqs)
                out.append(last)
            return torch.cat(out)

        for together, plain in ((False, {100, 192}), (True, {192, 108})):  # chunks of 100; 192 and 8; 192 and 108
            calls.clear()
            engine.model.pad_rows = pad
            padded = logits(together)
            # F.linear's widths past 64 rows (fewer go to the tile kernel, or to another form, as measured here)
            assert {rows for rows, form, _ in calls if form == "linear" and rows > 64} == ({128, 192} if pad else plain)
            engine.model.pad_rows = 0
            torch.testing.assert_close(padded, logits(together), rtol=0, atol=0.05)


def test_stops_at_eos_unless_ignored(tiny_model):
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path) as engine:
        tokens = engine.generate(PROMPTS[0], max_new_tokens=30)
        stop = next(i for i, t in enumerate(tokens) if t not in tokens[:i] and i >= 3)
        engine.config = dataclasses.replace(engine.config, eos_token_ids=(tokens[stop],))
        assert engine.generate(PROMPTS[0], max_new_tokens=30) == tokens[:stop + 1]
        assert engine.generate(PROMPTS[0], max_new_tokens=30, ignore_eos=True) == tokens


def test_sampling_is_reproducible_with_a_seed(tiny_model):
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path) as engine:
        def run(seed, **kw):
            return engine.generate(PROMPTS[1], max_new_tokens=20, temperature=0.8, seed=seed, **kw)
        assert run(1) == run(1) != run(2)
        assert run(3, top_k=1) == engine.generate(PROMPTS[1], max_new_tokens=20)  # top-1 is greedy
        assert run(4, top_p=1e-6) == run(5, top_p=1e-6) == run(6, top_k=1)


def test_offload_files_removed_on_close_unless_kept(tiny_model, tmp_path):
    path, _ = tiny_model("llama_bf16")  # weights on disk in fp32: packed files under the offload dir
    options = dict(weights="disk", kv="disk", dtype="float32", max_context=64)

    engine = Engine.from_pretrained(path, **options)  # no offload_dir: a temporary one
    temp = engine.offload_dir
    assert (temp / "kv").is_dir() and (temp / "weights" / "manifest.json").is_file()
    engine.close()
    assert not temp.exists()

    kept = tmp_path / "kept"
    with Engine.from_pretrained(path, **options, offload_dir=kept, keep_offload=True) as engine:
        first = engine.generate(PROMPTS[0], max_new_tokens=5)
    packed = kept / "weights" / "layer_000.bin"
    mtime = packed.stat().st_mtime_ns
    with Engine.from_pretrained(path, **options, offload_dir=kept) as engine:  # reuses the packed layers
        assert engine.generate(PROMPTS[0], max_new_tokens=5) == first
        assert packed.stat().st_mtime_ns == mtime
    assert not kept.exists()  # the engine made it (its marker says so): it goes


def test_a_folder_of_the_users_is_worked_in_beside_never_emptied(tiny_model, tmp_path):
    """Issue 25: an offload_dir or prefix_cache_dir that already holds the user's files, even files named as the
    engine names its own (weights/, kv/, blocks/, manifest.json), keeps them all: the engine works in a subfolder it
    makes and marks (own_engine/), and removes only that. A subfolder of that name that is not the engine's is
    refused."""
    from own_engine.config import EngineError

    path, _ = tiny_model("llama_bf16")
    mine = tmp_path / "mine"
    files = {"weights/layer_000.bin": b"my weights", "kv/layer_000.kv": b"my kv", "blocks/a.kv": b"my block",
             "manifest.json": b"{}", "notes.txt": b"keep me"}
    for name, data in files.items():
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_bytes(data)
    with Engine.from_pretrained(path, weights="disk", kv="disk", dtype="float32", max_context=64, offload_dir=mine,
                                prefix_cache_dir=mine) as engine:
        engine.generate(PROMPTS[0], max_new_tokens=3)
        assert engine.offload_dir == mine / "own_engine" and engine.store.dir == mine / "own_engine"
    assert {str(p.relative_to(mine)): p.read_bytes() for p in mine.rglob("*") if p.is_file()
            and "own_engine" not in p.parts} == files
    assert (mine / "own_engine" / "manifest.json").is_file()  # the prefix store is kept for later runs, not the KV
    assert not (mine / "own_engine" / "kv").exists()

    (mine / "own_engine").rename(mine / "was_ours")
    (mine / "own_engine").mkdir()  # the user's own folder of that name
    with pytest.raises(EngineError, match="offload_dir .*holds files of yours"):
        Engine.from_pretrained(path, weights="disk", kv="disk", dtype="float32", max_context=64, offload_dir=mine)


def test_stats_count_streamed_bytes(tiny_model, tmp_path):
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, weights="disk", kv="disk", block_size=16, prefill_chunk=8,
                                offload_dir=tmp_path / "off") as engine:
        engine.generate(PROMPTS[1], max_new_tokens=10)
        stats, layers = engine.stats, engine.config.num_layers * engine.plan.layer_bytes
        # One pass over the weights per forward, prefill included despite its 5 chunks (plus the KV it reads
        # back and the first layer of the next pass, prefetched ahead).
        assert layers <= stats.bytes[("prefill", "disk->host")] <= 1.5 * layers
        assert stats.bytes[("decode", "disk->host")] >= 9 * layers
        assert stats.bytes[("decode", "host->disk")] == 9 * 5 * engine.config.kv_bytes_per_token(engine.dtype)
        assert stats.bandwidth("disk->host") > 0 and stats.tokens == {"load": 0, "prefill": 40, "decode": 9}
        assert set(stats.as_dict()) == {"transfers", "phase_seconds", "tokens", "read_bytes", "prefix_cache",
                                        "preemptions"}
        # What compute read, wherever it was: every layer and lm_head once per pass, and the KV up to each token.
        head = engine.model.globals.lm_head.nbytes + engine.model.globals.norm.nbytes
        kv = engine.config.num_layers * engine.config.kv_bytes_per_token(engine.dtype)
        assert stats.read_bytes["decode"] == sum(layers + head + (40 + j) * kv for j in range(1, 10))


def test_plan_explains_itself(tiny_model):
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, weights="disk", max_context=1000) as engine:
        text = engine.plan.explain()
    assert "0 of 5 layers resident" in text and "5 from disk" in text
    assert "KV cache: 32 on device blocks of 32 tokens" in text


def test_probe_bandwidth_on_cpu_makes_its_folder_and_removes_it(tmp_path):
    """An offload dir that does not exist yet (weights read in place, no KV on disk) used to fail the probe with
    FileNotFoundError after the measurement, losing the cell."""
    probe = probe_bandwidth("cpu", nbytes=8 << 20, directory=tmp_path / "offload" / "new")
    assert probe.bytes_per_s > 1e6 and probe.nbytes == 8 << 20 and probe.error is None
    assert list(tmp_path.iterdir()) == []


def test_probe_reports_instead_of_raising(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    with monkeypatch.context() as m:
        m.setattr("own_engine.bandwidth.shutil.disk_usage", lambda p: usage(10**9, 10**9 - (80 << 20), 80 << 20))
        shrunk = probe_bandwidth("cpu", nbytes=64 << 20, directory=tmp_path)  # fits itself in a quarter of it
        m.setattr("own_engine.bandwidth.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
        full = probe_bandwidth("cpu", directory=tmp_path)
    assert shrunk.nbytes == 20 << 20 and shrunk.bytes_per_s > 0
    assert full.bytes_per_s is None and "1000 B free, too little" in full.error

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("own_engine.bandwidth.os.fsync", no_space)
    failed = probe_bandwidth("cpu", nbytes=8 << 20, directory=tmp_path / "new")
    assert failed.bytes_per_s is None and "No space left on device" in failed.error
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("native", [False, True])
def test_compute_dtype_policy(tiny_model, fake_cpu, native):
    """bf16 weights on a CPU without bf16 instructions compute in float32 through one reused upcast buffer; with them,
    or on CUDA, in bf16 in place. The plan says which and why."""
    fake_cpu(EPYC if native else AVX2)
    cfg = ModelConfig.load(tiny_model("llama_bf16")[0])
    cpu = plan_here(cfg, device="cpu", weights="gpu", max_context=64)
    assert cpu.dtype == torch.bfloat16
    assert cpu.compute_dtype == (torch.bfloat16 if native else torch.float32)
    assert cpu.n_slots == (0 if native else 1) and (cpu.slot_bytes > 1.9 * cpu.layer_bytes) != native
    assert ("no bfloat16 instructions" in cpu.explain()) != native
    cuda = plan_here(cfg, device="cuda", weights="disk", max_context=64)
    assert cuda.compute_dtype == torch.bfloat16 and "compute in bfloat16" in cuda.explain()
    with pytest.raises(EngineError, match="on CUDA compute runs in the stored dtype"):
        plan_here(cfg, device="cuda", compute_dtype="float32")


@pytest.mark.parametrize("native", [False, True, None], ids=["no-bf16-isa", "bf16-isa", "this-cpu"])
def test_weights_on_disk_are_read_in_place_on_cpu(tiny_model, tmp_path, fake_cpu, native):
    """On the CPU, layers on disk are memory-mapped: compute reads their pages (no ring, no copy). By default from
    per-layer files packed at load (aligned, q, k and v side by side); with pack_weights false from the safetensors
    themselves when the dtype matches. A bf16 checkpoint computes in bf16 straight from the map on a CPU with bf16
    instructions; without them it is upcast from the map into one float32 buffer, in the calling thread (no
    prefetch thread on the CPU). Run with the instruction set faked both ways, and on this CPU as its flags say."""
    if native is None:
        native = bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
    else:
        fake_cpu(EPYC if native else AVX2)
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, weights="disk", kv="gpu", offload_dir=tmp_path / "off",
                                pack_weights=False) as engine:
        layers = engine.model.weights
        w = layers.layer(0)["mlp.up_proj.weight"]
        mapped = layers.spans[0][0][0].bytes
        assert not layers.slots and layers.pool is None
        assert mapped.data_ptr() <= w.data_ptr() < mapped.data_ptr() + mapped.numel()
        assert not (tmp_path / "off").exists()  # nothing written: the checkpoint is read where it is
        assert "qkv" not in layers.layer(0)  # q, k and v apart in the safetensors
    with Engine.from_pretrained(path, weights="disk", kv="gpu", offload_dir=tmp_path / "packed") as engine:
        layers = engine.model.weights
        w = layers.layer(0)["qkv"]
        assert layers.spans[0][0][0].map.size() == engine.plan.layer_bytes and w.data_ptr() % 64 == 0
        assert (tmp_path / "packed" / "weights" / "layer_000.bin").is_file() and not layers.slots
    path, _ = tiny_model("llama_bf16")
    with Engine.from_pretrained(path, weights="disk", kv="gpu") as engine:
        layers = engine.model.weights
        assert not layers.slots and layers.pool is None
        assert engine.plan.compute_dtype == (torch.bfloat16 if native else torch.float32)
        w0, w1 = layers.layer(0)["mlp.up_proj.weight"], layers.layer(1)["mlp.up_proj.weight"]
        if native:  # both layers are views of the map, in bf16 as stored
            assert w0.dtype == w1.dtype == torch.bfloat16 and w0.data_ptr() != w1.data_ptr()
            mapped = layers.spans[1][0][0].bytes
            assert mapped.data_ptr() <= w1.data_ptr() < mapped.data_ptr() + mapped.numel()
        else:  # one reused float32 buffer
            assert w0.dtype == torch.float32 and w0.data_ptr() == w1.data_ptr()
        assert layers.layer(1, narrow=True)["mlp.up_proj.weight"].dtype == torch.bfloat16  # decode reads the map
