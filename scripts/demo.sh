#!/usr/bin/env bash
# Set-up + main job: install, then embed sample sentences with PromptEOL and PromptEOL+TP on the embedded
# SmolLM2-135M and print their similarity matrices and what TP did to the token sequence.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
tpsurgery demo "$@"
