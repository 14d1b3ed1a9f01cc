#!/bin/bash
# CC3M training for preemptible partitions and time limits: the job checkpoints and requeues itself.
#
# Submit: `sbatch scripts/train_preemptible.sh v3` from the repository root (VERSION: openclip | v0 | v1 |
# v2 | v3, the same runs as scripts/train_cc3m.sh). Every start, the first and each requeued one, runs
# `--resume latest`: it continues from the newest good checkpoint of logs/medium_$VERSION (from scratch
# when there is none), mid-epoch included, since epoch_latest.pt is also written every SAVE_EVERY_MINUTES
# (default 30) and whenever the run is stopped.
#
# How a stop happens: 120 s before the time limit slurm sends SIGUSR1 to the training tasks
# (--signal=USR1@120); on preemption it sends SIGTERM to the tasks and to this shell. Every rank finishes
# its step, a checkpoint is written, and the training exits with 75. This shell ignores the signals
# (it has to outlive the training to requeue the job) and then acts on srun's exit code:
#   0   training done                          -> exit 0
#   75  stopped by a signal, checkpoint saved  -> scontrol requeue, exit 75
#   76  another rank hung or died              -> scontrol requeue, exit 76 (resuming is right)
#   77  too many consecutive NaN/inf steps     -> exit 77, no requeue (resuming would repeat them)
#   else an error (see the log)                -> exit with it, no requeue
# The log (%x_%j.log) keeps the job id across requeues; --open-mode=append keeps every start in it.
#
# The runs are those of scripts/train_cc3m.sh (its DATA and LAUNCHER apply), with a checkpoint cadence.
# Environment: DATA (training shards), SAVE_EVERY_MINUTES (30), MAX_REQUEUES (20: no requeue once
# slurm's SLURM_RESTART_COUNT reaches it, so a job that keeps failing does not loop forever; empty: no
# cap), EXTRA_ARGS (appended last to main.py's flags, so they win: e.g. a smaller --batch-size).
# With slurm's PreemptMode=REQUEUE slurm requeues the job itself; the extra `scontrol requeue` then
# only fails with a message.
#SBATCH --time=2-00:00:00
#SBATCH --mem=120G
#SBATCH --nodes=2
#SBATCH --gres=gpu:4
#SBATCH --ntasks-per-node=4
#SBATCH --cpus-per-task=6
#SBATCH --wait-all-nodes=1
#SBATCH --job-name=fastclip-preemptible
#SBATCH --partition=gpu
#SBATCH --output=%x_%j.log
#SBATCH --open-mode=append
#SBATCH --signal=USR1@120
#SBATCH --requeue
set -uo pipefail  # no -e: srun's exit code is examined, not fatal
VERSION=${1:-v3}
MAX_REQUEUES=${MAX_REQUEUES-20}
read -r -a EXTRA <<< "${EXTRA_ARGS:-}"
ARGS=(--save-every-minutes "${SAVE_EVERY_MINUTES:-30}" "${EXTRA[@]}")

echo "start $((${SLURM_RESTART_COUNT:-0} + 1)) of job ${SLURM_JOB_ID:-?}: scripts/train_cc3m.sh $VERSION ${ARGS[*]}" >&2
# srun passes the signals on to the tasks itself; this shell must only not die of them (srun does not
# inherit these traps: a trapped signal is reset to its default in a child).
trap 'echo "batch shell got SIGTERM: waiting for the training to save its checkpoint" >&2' TERM
trap 'echo "batch shell got SIGUSR1: waiting for the training to save its checkpoint" >&2' USR1
bash scripts/train_cc3m.sh "$VERSION" "${ARGS[@]}" &  # the same runs; it execs srun, so $! is srun
SRUN_PID=$!
while kill -0 "$SRUN_PID" 2>/dev/null; do
  wait "$SRUN_PID"  # returns early when a trapped signal arrives
done
wait "$SRUN_PID"  # bash keeps the status of the ended srun
RC=$?

case "$RC" in
  0) echo "training done" >&2; exit 0 ;;
  75 | 76)
    if [ "$RC" = 75 ]; then why="stopped by a signal after a checkpoint"; else why="another rank hung or died"; fi
    if [ -n "$MAX_REQUEUES" ] && [ "${SLURM_RESTART_COUNT:-0}" -ge "$MAX_REQUEUES" ]; then
      echo "training $why (exit $RC), but the job was already requeued $MAX_REQUEUES times (MAX_REQUEUES):" \
           "not requeueing; resubmit to continue from the newest checkpoint" >&2
    elif scontrol requeue "$SLURM_JOB_ID"; then
      echo "training $why (exit $RC): requeued job $SLURM_JOB_ID; it continues from the newest checkpoint" >&2
    else
      echo "training $why (exit $RC): scontrol requeue $SLURM_JOB_ID failed; resubmit to continue" >&2
    fi
    exit "$RC" ;;
  77) echo "training stopped after too many consecutive NaN/inf steps (exit 77): not requeueing, since" \
           "resuming would repeat them; lower --lr or check the data, then resubmit" >&2
      exit 77 ;;
  *) echo "training failed (exit $RC): not requeueing; see the log" >&2; exit "$RC" ;;
esac
