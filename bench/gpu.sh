#!/usr/bin/env bash
# The GPU check (bench/gpu_bench.py) on a machine with one NVIDIA GPU, in sections run one after another;
# each writes gpu_SECTION.md and gpu_SECTION.json into $OUT (bench/out/gpu when OUT is unset) as it ends,
# with everything printed also in $OUT/gpu.log, so a run cut short keeps the sections that finished:
#   smoke     CUDA and NCCL on one rank (a DDP step), every --precision name for a few steps, OpenCLIP vs
#             FastCLIP-v3 samples/s and host syncs per step: at most 4 minutes (about 2 expected)
#   programs  open_clip_train vs our script, RN50 at batch 128 and 256, alternating: about 4 minutes
#   steps     the step alone at batch 256, with and without cudnn.benchmark: about a minute
# The GPU machine lacks open_clip_torch (open_clip_train with it), webdataset, braceexpand, ftfy and
# wcwidth. Make them wheels first where pip can download (`make gpu-wheels`: bench/.deps/wheels, which git
# ignores) and carry that folder; what is still missing stops the run at once, in one line. Device tool:
#   run(command="bash bench/gpu.sh", carry=["bench/.deps/wheels"], timeout_s=570)
#   run(command="bash bench/gpu.sh smoke", carry=["bench/.deps/wheels"], timeout_s=300)   # the first alone
# Without a GPU, the same code paths on a tiny CPU setup (a few minutes):
#   bash bench/gpu.sh --cpu-smoke [SECTION ...]
# PYTHON picks the interpreter (default python3), WHEELS the wheel folder (default bench/.deps/wheels).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=${WHEELS:-bench/.deps/wheels}
DEST=${OUT:-bench/out/gpu}
FLAGS=()
SECTIONS=()
for arg in "$@"; do
    case $arg in
        --cpu-smoke) FLAGS+=(--cpu-smoke) ;;
        *) SECTIONS+=("$arg") ;;
    esac
done
[ ${#SECTIONS[@]} -gt 0 ] || SECTIONS=(smoke programs steps)

MODULES=(open_clip open_clip_train webdataset braceexpand ftfy wcwidth)
missing() {
    "$PY" -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' \
        "${MODULES[@]}"
}
if [ -n "$(missing)" ] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    SITE=/tmp/fastclip-bench-site
    "$PY" -m pip install --quiet --disable-pip-version-check --no-index --no-deps --no-compile --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi
absent=$(missing)
if [ -n "$absent" ]; then
    echo "gpu.sh: missing Python modules: $absent (no wheel for them in $WHEELS): run 'make gpu-wheels' where pip can download, and carry $WHEELS"
    exit 3
fi

# src first: `training` and `fastclip` must be this checkout's (no install needed).
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
mkdir -p "$DEST"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" 2>&1 | tee "$DEST/gpu.log"
failed=()
for section in "${SECTIONS[@]}"; do
    start=$SECONDS
    "$PY" bench/gpu_bench.py "$section" --out "$DEST" "${FLAGS[@]}" 2>&1 | tee -a "$DEST/gpu.log" || failed+=("$section")
    echo "gpu.sh: section $section done in $((SECONDS - start)) s; reports in $DEST" | tee -a "$DEST/gpu.log"
done
[ ${#failed[@]} -eq 0 ] || { echo "gpu.sh: failed sections: ${failed[*]}" | tee -a "$DEST/gpu.log"; exit 1; }
