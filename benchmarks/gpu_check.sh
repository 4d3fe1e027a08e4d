#!/usr/bin/env bash
# One prepared GPU check of the kit (benchmarks/gpu_check.py): the embedded model on the whole
# `offline` task preset (dense and results/runs/cpu-main's routers) and the `full` profile grid
# with CUDA timings, into one run folder (default results/runs/gpu-check-<date>). Run it from the
# repository root on a machine with one GPU; it needs no network. Run it again to continue an
# interrupted check. `--smoke` runs the same code on a CPU with tiny limits.
#
#   bash benchmarks/gpu_check.sh [--out DIR] [--smoke] [--batch-size 64] [--repeats 5] ...
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
if [ ! -x "$PYTHON" ]; then
  PYTHON="$(command -v python3 || command -v python)"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec "$PYTHON" benchmarks/gpu_check.py "$@"
