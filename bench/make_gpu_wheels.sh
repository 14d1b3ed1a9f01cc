#!/usr/bin/env bash
# Download, here, the pure-Python wheels that the GPU machine lacks (it has torch, torchvision, timm,
# regex, tqdm, huggingface_hub, safetensors, numpy, pyyaml, but no open_clip_torch, webdataset,
# braceexpand, ftfy or wcwidth), at the versions of this project's virtualenv, for bench/gpu.sh (which installs
# them from bench/.deps/wheels: name that folder in the device tool's carry).
#   bench/make_gpu_wheels.sh [DEST]      # DEST defaults to bench/.deps/wheels
# GPU_PYTHON (default 3.12, the GPU image's) picks the interpreter version the wheels are for.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-bench/.deps/wheels}
PY=${PYTHON:-.venv/bin/python}
PACKAGES=(open_clip_torch webdataset braceexpand ftfy wcwidth timm)
# Pin each to the version installed here, so the GPU run uses what was tested on the CPU.
mapfile -t PINNED < <("$PY" - "${PACKAGES[@]}" <<'PYEOF'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
PYEOF
)
mkdir -p "$DEST"
"$PY" -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: -d "$DEST" \
    --python-version "${GPU_PYTHON:-3.12}" --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "${PINNED[@]}"
ls -l "$DEST"
