#!/usr/bin/env bash
# The router recipe study end to end, resumable (run it again to continue):
#   1. tune every recipe; 2. place them, the committed cpu-main routers and the static drops on the frontier.
# Every finished part is a file; nothing finished is recomputed.
#   bash benchmarks/recipe_study.sh            # about 3 hours on 2 CPU cores
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/runs}
QUICK="cpu,global,gradual,target-k2,target-k4,target-k6,target-k8,target-k10"
routers() {  # --routers NAME=FOLDER for every finished recipe in $1
  for n in ${1//,/ }; do
    at=""; case $n in target-k*) at="@${n#target-k}";; esac   # tuned for one point: placed there only
    [ -f "$OUT/recipe-$n/train/routers/routers.safetensors" ] && printf -- '--routers %s=%s%s ' "$n" "$OUT/recipe-$n/train/routers" "$at"
  done
}
# tune every recipe (the paper-budget one is the long one, checkpointed), then place them all; the
# frontier measures the router sets in this order, so the most informative points come first
$PY -m rt_lib router-study tune --out "$OUT" --only "$QUICK,paper-budget"
# shellcheck disable=SC2046
$PY -m rt_lib frontier --out "$OUT/router-frontier" $(routers "paper-budget,gradual,global,cpu") \
  --routers committed="$OUT/cpu-main/train/routers" $(routers "${QUICK#cpu,global,gradual,}")
