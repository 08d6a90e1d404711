import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.core.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
# Workers are separate processes: the scripted test backend reaches them through the plugin variable.
os.environ["LLMBENCH_PLUGINS"] = "tests.scripted_backend"


def pytest_report_header(config) -> list[str]:
    """A CI log says what CPU it ran on: timings and the engine's dtype policy depend on its instruction set."""
    from harness.measure.environment import cpu_isa
    from llmbench.cpu import cpu_model

    return [f"cpu: {cpu_model()}, {os.cpu_count()} logical cores; isa: {' '.join(cpu_isa()) or 'unknown'}"]


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from harness.inputs.models import cached_synthetic

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


def run_scenario(data: dict, folder: Path, write_report: bool = True) -> tuple[Path, dict]:
    """Run a scenario dict with the local Runner (it must succeed); its results folder and its cells by workload.
    Scripted cells run in this process: no engine to isolate, and no worker or prompt builder to start."""
    import yaml

    from harness.config.load import load_scenario
    from harness.records import load_run
    from harness.run.runner import Runner

    path = folder / "scenario.yaml"
    path.write_text(yaml.safe_dump(data))
    out = folder / "out"
    scripted = all(b["kind"] == "scripted" for b in data["backends"])
    assert Runner(load_scenario(path), str(path), out, in_process=scripted, write_report=write_report).run() == 0
    return out, {c.workload: c for c in load_run(out).cells}


def scenario_dict(tiny_model, backends, workloads=None, **extra) -> dict:
    return {
        "name": "t",
        "models": {"tiny": {"path": str(tiny_model)}},
        "backends": backends,
        "workloads": workloads or [{"name": "w", "input_tokens": 16, "output_tokens": 8, "num_requests": 4,
                                    "warmup_requests": 1}],
        "repetitions": 1,  # the tests' default before the scenario's became 3: fast, and what they assert on
        **extra,
    }


@contextlib.contextmanager
def bench_serve(model: Path, kind: str, protocol: str, *options: str):
    """`bench serve` in a subprocess; yields its base URL once /health answers, and stops its whole group after."""
    import httpx

    port = free_port()
    argv = [sys.executable, "-m", "harness.cli", "serve", "--backend", kind, "--model", str(model),
            "--protocol", protocol, "--port", str(port), *[a for o in options for a in ("--option", o)]]
    proc = subprocess.Popen(argv, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"bench serve did not start:\n{proc.stdout.read().decode() if proc.poll() is not None else 'timeout'}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)
