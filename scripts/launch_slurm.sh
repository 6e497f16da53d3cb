#!/usr/bin/env bash
# Multi-node GPU training with Slurm: one process per node, all of the node's GPUs per process.
# jax.distributed.initialize() reads the coordinator, process count and id from Slurm's
# environment (t5lite.train --multihost).
#
#   sbatch --nodes=4 --gpus-per-node=8 scripts/launch_slurm.sh \
#       --gin_file=gin_configs/models/t5_1_1/xl.gin --gin_file=gin_configs/runs/pretrain.gin \
#       --gin_file=gin_configs/partitioning/fsdp.gin \
#       --gin.MODEL_DIR=/shared/runs/t5_xl --gin.TRAIN_STEPS=100000
#
# MODEL_DIR must be on a filesystem every node sees (checkpoints are written cooperatively).
#SBATCH --job-name=t5lite
#SBATCH --ntasks-per-node=1
#SBATCH --exclusive
#SBATCH --signal=TERM@120
set -euo pipefail
VENV="${T5LITE_VENV:-$HOME/t5lite-venv}"
# shellcheck disable=SC1091
source "$VENV/bin/activate"
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}"
# SIGTERM (sent 120 s before the time limit, and on preemption) makes t5lite save a checkpoint
# and exit 143; requeue the job and it resumes.
srun --kill-on-bad-exit=1 python -m t5lite.train --multihost "$@" || {
  rc=$?
  if [ "$rc" -eq 143 ] && [ -n "${SLURM_JOB_ID:-}" ]; then scontrol requeue "$SLURM_JOB_ID"; fi
  exit "$rc"
}
