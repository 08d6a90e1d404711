import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Workers are separate processes: the scripted test backend reaches them through the plugin variable.
os.environ["LLMBENCH_PLUGINS"] = "tests.scripted_backend"
sys.path.insert(0, str(ROOT))


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from harness.models import cached_synthetic

    return cached_synthetic("tiny-llama", 0)


@pytest.fixture
def write_scenario(tmp_path, tiny_model):
    """Write a scenario YAML (a dict, or raw text) into tmp_path and return its path."""
    import yaml

    def write(content, name="scenario.yaml") -> Path:
        path = tmp_path / name
        path.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))
        return path

    return write


def scenario_dict(tiny_model, backends, workloads=None, **extra) -> dict:
    return {
        "name": "t",
        "models": {"tiny": {"path": str(tiny_model)}},
        "backends": backends,
        "workloads": workloads or [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 4,
                                    "warmup_requests": 1}],
        **extra,
    }
