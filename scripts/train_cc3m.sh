#!/bin/bash -x
# Train on CC3M as in the FastCLIP paper: `sbatch scripts/train_cc3m.sh v3` (2 nodes x 4 GPUs), or without
# slurm: `LAUNCHER=torchrun bash scripts/train_cc3m.sh v3` on one node, or on each of NNODES nodes
# `LAUNCHER=torchrun NNODES=2 MASTER_ADDR=first-node bash scripts/train_cc3m.sh v3` (MASTER_PORT: 12805).
# Usage: train_cc3m.sh VERSION [FLAGS...]; VERSION: openclip | v0 | v1 | v2 | v3; FLAGS are appended to
# main.py's, so they win (scripts/train_preemptible.sh adds its checkpoint cadence this way).
#SBATCH --time=2-00:00:00
#SBATCH --mem=120G
#SBATCH --nodes=2
#SBATCH --gres=gpu:4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=6
#SBATCH --wait-all-nodes=1
#SBATCH --job-name=fastclip
#SBATCH --partition=gpu
#SBATCH --output=%x_%j.log
set -euo pipefail
VERSION=${1:-v3}
shift || true
LAUNCHER=${LAUNCHER:-srun}
DATA=${DATA:-./datasets/cc3m_webdataset/cc3m_train/\{00000..00331\}.tar}

case "$VERSION" in
  openclip) LOSS=(--gather-with-grad --lr 1e-3) ;;
  v0) LOSS=(--fastclip --temperature_scheme global_learnable --lr 1e-3) ;;
  v1) LOSS=(--fastclip --temperature_scheme global_constant --lr 1e-3) ;;
  v2) LOSS=(--fastclip --temperature_scheme individual_learnable --lr 1e-3 --lr_tau 0.0133
            --lr_tau_scheduler const --temperature 0.03 --rho 7.0) ;;
  v3) LOSS=(--fastclip --multiply_tau --temperature_scheme global_learnable --lr 1e-3 --lr_tau 2e-4
            --lr_tau_scheduler step_thresh --rho 6.5) ;;
  *) echo "unknown version $VERSION: openclip, v0, v1, v2 or v3" >&2; exit 2 ;;
esac
if [ "$VERSION" != openclip ]; then
  LOSS+=(--gamma 0.2 --gamma_schedule cosine --gamma_decay_epochs 18)
fi

if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
export MASTER_PORT=${MASTER_PORT:-12805}
export PYTHONPATH="${PYTHONPATH:-}:$PWD/src"

ARGS=(--save-frequency 1 --train-data "$DATA" --train-num-samples 2723840 --data_size 3318333
      --warmup 10000 --batch-size 256 --epochs 37 --workers 6 --model RN50 --name "medium_$VERSION"
      --seed 2024 --profile --wd 0.1 --local-loss --resume latest "${LOSS[@]}" "$@")

# exec: the launcher takes this shell's place, so whoever started the script waits on the launcher and
# sees its exit code (75: stopped by a signal after a checkpoint, see train_preemptible.sh).
if [ "$LAUNCHER" = srun ]; then
  exec srun python -u src/training/main.py "${ARGS[@]}"
else
  ARGS+=(--logs-dir "$PWD/logs")  # --logs-dir: torchrun would read --logs as its own --logs-specs
  cd src  # relative paths (DATA) still mean the project root there
  # the c10d rendezvous can restart the workers (--max-restarts); the default static one cannot.
  # torchrun needs HOST:PORT in --rdzv_endpoint.
  exec torchrun --nnodes="${NNODES:-1}" --nproc_per_node="${NPROC_PER_NODE:-4}" --rdzv-backend=c10d \
      --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="${SLURM_JOB_ID:-fastclip}" \
      --max-restarts="${MAX_RESTARTS:-0}" -m training.main "${ARGS[@]}"
fi
