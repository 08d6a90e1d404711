"""An offloading paged-attention inference engine for Llama-family models (Llama 2/3, Qwen2, Mistral).

    from own_engine import Engine
    with Engine.from_pretrained(path, device="cuda", vram_budget="8GiB", max_context=100_000) as engine:
        print(engine.plan.explain())
        tokens = engine.generate(prompt_ids, max_new_tokens=64, on_token=lambda seq, token: ...)
        print(engine.stats.as_dict())

Planning without loading: make_plan(ModelConfig.load(path), device=..., vram_budget=..., context=...).explain()
"""
from .config import EngineError, ModelConfig
from .engine import Engine
from .planner import Plan, make_plan, parse_size
from .stats import DIRECTIONS, PHASES, EngineStats, probe_bandwidth

__all__ = ["DIRECTIONS", "PHASES", "Engine", "EngineError", "EngineStats", "ModelConfig", "Plan", "make_plan",
           "parse_size", "probe_bandwidth"]
