#!/usr/bin/env bash
# Create a Cloud TPU VM (single host or pod slice) and run t5lite.train on every worker.
# jax.distributed.initialize() auto-detects the TPU topology (t5lite.train --multihost).
#
#   TPU_NAME=t5lite-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   REPO_URL=https://example.org/your/t5lite.git \
#   scripts/launch_tpu_vm.sh --gin_file=gin_configs/models/t5_1_1/large.gin \
#       --gin_file=gin_configs/runs/pretrain.gin --gin_file=gin_configs/partitioning/fsdp.gin \
#       --gin.MODEL_DIR=gs://your-bucket/runs/t5_large --gin.TRAIN_STEPS=100000
set -euo pipefail
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR, e.g. v4-32}"
: "${REPO_URL:?set REPO_URL to your t5lite repository}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
if ! gcloud compute tpus tpu-vm describe "$TPU_NAME" --zone "$ZONE" >/dev/null 2>&1; then
  gcloud compute tpus tpu-vm create "$TPU_NAME" --zone "$ZONE" \
      --accelerator-type "$ACCELERATOR" --version "$RUNTIME"
fi
ARGS=$(printf '%q ' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command "
  set -e
  [ -d t5lite ] || git clone $REPO_URL t5lite
  cd t5lite && git pull --ff-only
  python3 -m venv ~/venv && . ~/venv/bin/activate
  pip install -q -U pip && pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python -m t5lite.train --multihost $ARGS
"
