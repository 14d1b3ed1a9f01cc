#!/usr/bin/env bash
# GPU checks and benchmark (bench/gpu_bench.py) on a machine with one NVIDIA GPU: every --precision name
# through the training script, then the step and program measurements; about 8 minutes on an H100.
# Writes bench/out/gpu.md and bench/out/gpu.json.
#   bash bench/gpu.sh                                 # open_clip_torch & co already installed
#   WHEELS=bench/.deps/wheels bash bench/gpu.sh       # install them first from wheels (make_gpu_wheels.sh)
#   bash bench/gpu.sh --cpu-smoke                     # no GPU: check the code paths on a tiny CPU setup
# PYTHON picks the interpreter (default python3); extra arguments go to gpu_bench.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    SITE=${SITE:-/tmp/fastclip-bench-site}
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
# src first: `training` and `fastclip` must be this checkout's (no install needed).
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
exec "$PY" bench/gpu_bench.py "$@"
