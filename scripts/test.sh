#!/usr/bin/env bash
# Set-up + tests: install, then run the whole test suite (doctests included). Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
python -m pytest -q "$@"
