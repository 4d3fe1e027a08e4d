#!/usr/bin/env bash
# The router recipe study end to end, resumable (run it again to continue):
#   1. tune the quick recipes; 2. place them and the static drops on the frontier;
#   3. tune the paper-budget recipe (the long one, checkpointed); 4. add it and the committed cpu-main routers.
# Every finished part is a file; nothing finished is recomputed.
#   bash benchmarks/recipe_study.sh            # about 4 hours on 2 CPU cores (the paper-budget tuning alone ~1 hour)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-results/runs}
QUICK="cpu,global,gradual,annealed,target-k2,target-k4,target-k6,target-k8,target-k10"
routers() {  # --routers NAME=FOLDER for every finished recipe in $1
  for n in ${1//,/ }; do
    at=""; case $n in target-k*) at="@${n#target-k}";; esac   # tuned for one point: placed there only
    [ -f "$OUT/recipe-$n/train/routers/routers.safetensors" ] && printf -- '--routers %s=%s%s ' "$n" "$OUT/recipe-$n/train/routers" "$at"
  done
}
$PY -m rt_lib router-study tune --out "$OUT" --only "$QUICK"
# shellcheck disable=SC2046
$PY -m rt_lib frontier --out "$OUT/router-frontier" $(routers "gradual,annealed,global,cpu") $(routers "${QUICK#cpu,global,gradual,annealed,}")
$PY -m rt_lib router-study tune --out "$OUT" --only paper-budget
# shellcheck disable=SC2046
$PY -m rt_lib frontier --out "$OUT/router-frontier" $(routers "gradual,annealed,global,cpu,paper-budget") \
  --routers committed="$OUT/cpu-main/train/routers" $(routers "${QUICK#cpu,global,gradual,annealed,}")
