#!/usr/bin/env bash
# The router recipe study end to end, resumable (run it again to continue):
#   1. tune the quick recipes; 2. tune the paper-budget recipe (the long one, checkpointed);
#   3. place every recipe and the static drops on the frontier.
# Every finished part is a file; nothing finished is recomputed.
#   bash benchmarks/recipe_study.sh            # about 4 hours on 2 CPU cores (the paper-budget tuning alone ~1 hour)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/runs}
QUICK="cpu,global,gradual,annealed,annealed-16,annealed-16-gentle,target-k2,target-k4,target-k6,target-k8,target-k10"
routers() {  # --routers NAME=FOLDER for every finished recipe in $1
  for n in ${1//,/ }; do
    at=""; case $n in target-k*) at="@${n#target-k}";; esac   # tuned for one point: placed there only
    [ -f "$OUT/recipe-$n/train/routers/routers.safetensors" ] && printf -- '--routers %s=%s%s ' "$n" "$OUT/recipe-$n/train/routers" "$at"
  done
}
$PY -m rt_lib router-study tune --out "$OUT" --only "$QUICK"
$PY -m rt_lib router-study tune --out "$OUT" --only paper-budget
# the newest recipes first, then the points the others still lack; last the per-target routers
# (each placed at its own point only)
# shellcheck disable=SC2046
$PY -m rt_lib frontier --out "$OUT/router-frontier" $(routers "annealed-16,annealed-16-gentle,paper-budget,cpu,annealed,global,gradual") \
  $(routers "target-k2,target-k4,target-k6,target-k8,target-k10")
