import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT


@pytest.fixture(scope="session")
def quickstart_results(tmp_path_factory) -> Path:
    """A results folder written by a real `bench run scenarios/quickstart.yaml` (the README's first command, minus
    the install), shared by the end-to-end tests here and only those (it takes over a minute): every cell must be
    ok."""
    out = tmp_path_factory.mktemp("quickstart") / "results"
    proc = subprocess.run([sys.executable, "-m", "harness.cli", "run", "scenarios/quickstart.yaml", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True,
                          timeout=1200)
    assert proc.returncode == 0, f"quickstart run failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return out
