#!/usr/bin/env bash
# The SmolLM2 STS-B dev table of docs/recipes.md ("Contrastive Prompting on SmolLM2"): CP scaled (layer l and factor
# C swept), CP norm, TP + CP, every exit layer; one pass per setting (~4 min each on one CPU core). PromptEOL and
# PromptEOL + TP come from the stored full-dev sweep docs/figures/smollm2-sweep.json.
#   bash scripts/cp-table.sh OUT_DIR [DATA_DIR]
set -euo pipefail
out=${1:?usage: scripts/cp-table.sh OUT_DIR [DATA_DIR]}
data=${2:-../shared/data/senteval}
sweep() { python -m tpsurgery sweep -m smollm2-135m -d "$data" --no-progress "$@"; }
sweep -r prompteol-tp-cp --stops 8 --no-baseline --vary edits.factor=0.5,2 -o "$out/tp-cp"   # TP [1,8) + CP l=5
sweep -r cp-prompteol --vary edits.layers=3,5,7,9 -o "$out/cp-l"                                # CP scaled C=2, l
sweep -r cp-prompteol --vary edits.factor=0.5,1,3 -o "$out/cp-c"                               # CP scaled l=5, C
sweep -r cp-prompteol --vary edits.layers=4 --vary edits.factor=0.5 -o "$out/cp-official"      # official Llama-2
sweep -r cp-prompteol-norm --vary edits.layers=5,9 -o "$out/cp-norm"                            # CP norm, l
sweep -r prompteol-tp-cp --stops 2 --no-baseline --vary edits.layers=4,9 --vary edits.factor=0.25,0.5,1 \
  -o "$out/tp12-cp"                                                                             # TP [1,2) + CP, l x C
