#!/usr/bin/env bash
# Installs oLLM (PyPI `ollm` 1.0.3) for CPU into its own virtualenv, .venv-ollm/ at the repository root (idempotent).
#
# Only benchmarks/engine_cpu.py uses it (the `ollm` configuration). oLLM pins an old transformers (4.x), so it never shares the harness's
# venv. A plain `pip install ollm` fails building flash-attn (a CUDA extension it never needs on CPU), so oLLM goes
# in with --no-deps and the dependencies its CPU path imports are installed by hand.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=.venv-ollm

if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import ollm" 2>/dev/null; then
    echo "oLLM already installed in $venv"
    exit 0
fi

python3 -m venv "$venv"
# constraints-cpu.txt pins torch to the local CPU wheel; psutil is for the benchmark's driver.
"$venv/bin/pip" install -q -c constraints-cpu.txt torch==2.13.0 transformers==4.57.6 accelerate \
    flash-linear-attention peft requests psutil
"$venv/bin/pip" install -q -c constraints-cpu.txt --no-deps ollm==1.0.3
"$venv/bin/python" -c "import ollm, torch, transformers; print('oLLM installed in $venv: torch', torch.__version__, 'transformers', transformers.__version__)"
