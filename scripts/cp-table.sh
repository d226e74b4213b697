#!/usr/bin/env bash
# The SmolLM2 STS-B dev table of docs/recipes.md ("Contrastive Prompting on SmolLM2"): PromptEOL, TP, CP (scaled and
# norm; layer l and factor C swept) and TP+CP, every exit layer. One sweep per setting, ~4 min each on one CPU core.
#   bash scripts/cp-table.sh OUT_DIR [DATA_DIR]
set -euo pipefail
out=${1:?usage: scripts/cp-table.sh OUT_DIR [DATA_DIR]}
data=${2:-../shared/data/senteval}
sweep() { python -m tpsurgery sweep -m smollm2-135m -d "$data" --no-progress "$@"; }
sweep -r prompteol-tp --stops 8 -o "$out/prompteol-tp"                       # PromptEOL (placeholder hidden), TP [1,8)
sweep -r prompteol-tp-cp --stops 8 --no-baseline --vary edits.factor=0.5,2 -o "$out/tp-cp"      # TP [1,8) + CP l=5
sweep -r cp-prompteol --vary edits.layers=3,4,5,7,9 --vary edits.factor=0.5,2 -o "$out/cp-l-c"  # CP scaled, l x C
sweep -r cp-prompteol-norm --vary edits.layers=4,5,7 -o "$out/cp-norm"                           # CP norm, l
sweep -r cp-prompteol --vary edits.factor=0.25,1,3 -o "$out/cp-c"                                # CP scaled l=5, C
