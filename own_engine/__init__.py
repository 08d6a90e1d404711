"""An offloading paged-attention inference engine for Llama-family models (Llama 2/3, Qwen2, Mistral).

    from own_engine import Engine
    with Engine.from_pretrained(path, device="cuda", vram_budget="8GiB", max_context=100_000) as engine:
        print(engine.plan.explain())
        tokens = engine.generate(prompt_ids, max_new_tokens=64, on_token=lambda i, token: ...)
        print(engine.stats.as_dict())

Every option, its default and its meaning: EngineConfig. Serving: loop = engine.serve(), then
loop.submit(Sequence(prompt_ids, SamplingParams(max_new_tokens=64), on_token=..., on_finish=...)) from any thread:
sequences join and leave between steps (continuous batching); loop.close() when done; ServingLoop(lambda: Engine(...))
builds the engine on the loop's thread (own_engine.serving: why that is faster). Planning without loading:
make_plan(cfg, config, Machine.here(cfg, config)).explain(), with cfg = ModelConfig.load(path).
"""
import importlib
from typing import Any

# Exports load on first use, so importing the package (or one light module of it) loads no torch.
_EXPORTS = {"EngineError": "errors", "ModelConfig": "config", "EngineConfig": "engine_config", "Engine": "engine",
            "Plan": "planner", "Machine": "planner", "make_plan": "planner", "Compute": "compute",
            "DIRECTIONS": "stats", "PHASES": "stats", "EngineStats": "stats",
            "probe_bandwidth": "bandwidth", "Probe": "bandwidth", "Scheduler": "scheduler", "Sequence": "sequence",
            "SamplingParams": "sequence", "ServingLoop": "serving"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:  # typed code imports an export from its module, where its type is known
    if name not in _EXPORTS:
        raise AttributeError(f"module 'own_engine' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
