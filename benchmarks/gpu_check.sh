#!/usr/bin/env bash
# The GPU check (benchmarks/gpu_check.py): MindSkip's speed at Llama-3-8B's shapes with random
# weights on one GPU machine that has python3, CUDA torch and transformers, and no network.
#
#   bash benchmarks/gpu_check.sh --prepare [--pinned-transformers]   # here: wheels to carry (.whl/),
#                                        # the size accounting, .whl/RUN_COMMAND.txt for the GPU machine
#   bash benchmarks/gpu_check.sh [--out DIR] [--dry-run] [--estimate] ...   # run the check
#
# PYTHON defaults to .venv/bin/python when present, else python3. Outside the kit's virtualenv,
# wheels in .whl/ are installed into /tmp/site first and put on PYTHONPATH (the same command as
# .whl/RUN_COMMAND.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
KIT_PYTHON=.venv/bin/python
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$KIT_PYTHON" ]; then PYTHON="$KIT_PYTHON"; else PYTHON="$(command -v python3 || command -v python)"; fi
fi
if [ "${1:-}" = "--prepare" ]; then
  exec "$PYTHON" benchmarks/gpu_check.py "$@"
fi
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
if [ "$PYTHON" != "$KIT_PYTHON" ] && compgen -G ".whl/*.whl" >/dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:.${PYTHONPATH:+:$PYTHONPATH}"
fi
exec "$PYTHON" benchmarks/gpu_check.py "$@"
