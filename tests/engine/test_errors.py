"""Fixable problems raise EngineError naming the cause, before any work (no offload files, no loading)."""
import json
import shutil
from collections import namedtuple

import pytest
from safetensors.torch import load_file, save_file

from llmbench.units import parse_size
from own_engine import Engine, EngineError, ModelConfig

from .conftest import plan_here


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    """copy(name) -> a private copy of a tiny model's folder, free to damage."""
    def copy(name):
        dst = tmp_path / f"{name}_copy"
        shutil.copytree(tiny_model(name)[0], dst)
        return dst
    return copy


def edit_config(path, **changes):
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, **changes}))


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"architectures": ["LlamaForSequenceClassification"]}, "architectures"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "rope type 'yarn'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}}, "llama3 rope needs .*low_freq"),
])
def test_unsupported_architecture(model_copy, changes, message):
    path = model_copy("llama_gqa2")
    edit_config(path, **changes)
    with pytest.raises(EngineError, match=message) as err:
        Engine.from_pretrained(path)
    assert "config.json" in str(err.value)


def test_missing_config(tmp_path):
    with pytest.raises(EngineError, match="config.json: not found"):
        Engine.from_pretrained(tmp_path)


def test_missing_weights(model_copy):
    path = model_copy("llama_gqa2")
    (path / "model.safetensors").unlink()
    with pytest.raises(EngineError, match="no model.safetensors or model.safetensors.index.json"):
        Engine.from_pretrained(path)


def test_missing_shard(model_copy):
    path = model_copy("llama_mha_tied_sharded")
    shards = sorted(path.glob("model-*.safetensors"))
    assert len(shards) > 1
    shards[1].unlink()
    with pytest.raises(EngineError, match=f"missing shard file.*{shards[1].name}"):
        Engine.from_pretrained(path)


def test_missing_tensor(model_copy):
    path = model_copy("llama_gqa2")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(EngineError, match="1 tensor.*missing.*model.layers.1.mlp.up_proj.weight"):
        Engine.from_pretrained(path)


def test_wrong_shape(model_copy):
    path = model_copy("llama_gqa2")
    edit_config(path, intermediate_size=96)
    with pytest.raises(EngineError, match="shapes do not match"):
        Engine.from_pretrained(path)


@pytest.mark.parametrize("damage,message", [
    (lambda data: data[:len(data) // 2], "truncated: tensor"),
    (lambda data: data[:5], "truncated or corrupt safetensors header"),
    (lambda data: (100).to_bytes(8, "little") + b"{not json" + data[17:], "corrupt safetensors header"),
])
def test_corrupt_file(model_copy, damage, message):
    path = model_copy("llama_gqa2")
    file = path / "model.safetensors"
    file.write_bytes(damage(file.read_bytes()))
    with pytest.raises(EngineError, match=message):
        Engine.from_pretrained(path)


def test_budget_too_small(tiny_model, tmp_path):
    path, _ = tiny_model("llama_gqa2")
    with pytest.raises(EngineError, match="vram_budget 97.66 KiB is too small: needs at least"):
        Engine.from_pretrained(path, vram_budget=100_000, offload_dir=tmp_path / "off")
    with pytest.raises(EngineError, match="too small"):  # forcing all layers resident needs more
        Engine.from_pretrained(path, vram_budget=1_500_000, weights="gpu", block_size=16)
    assert not (tmp_path / "off").exists()


def test_too_little_disk(tiny_model, tmp_path, monkeypatch):
    path, _ = tiny_model("llama_gqa2")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("own_engine.planner.shutil.disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(EngineError, match=r"offload dir .*off: needs .* only 1000 B free"):
        Engine.from_pretrained(path, kv="disk", offload_dir=tmp_path / "off")
    assert not (tmp_path / "off").exists()


def test_bad_options(tiny_model):
    path, _ = tiny_model("llama_gqa2")
    with pytest.raises(EngineError, match="weights='fast'"):
        Engine.from_pretrained(path, weights="fast")
    with pytest.raises(EngineError, match="vram_budget: expected a size like 8GiB"):
        plan_here(ModelConfig.load(path), vram_budget="lots")
    assert parse_size("8GiB") == 8 << 30 and parse_size("1.5 GB") == 1_500_000_000 and parse_size(512) == 512


def test_generation_longer_than_the_kv_cache(tiny_model):
    path, _ = tiny_model("llama_gqa2")
    with Engine.from_pretrained(path, max_context=64, block_size=16) as engine:
        with pytest.raises(EngineError, match="need 5 KV blocks, the cache has 4"):
            engine.generate(list(range(60)), max_new_tokens=10)
        assert engine.blocks.num_free == 4
