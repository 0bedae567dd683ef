#!/usr/bin/env bash
# One node, no SLURM: all local GPUs with nccl, or NPROC CPU processes with gloo.
#
#   launch/local.sh --data imagefolder --data-dir /data/imagenet        # every visible GPU
#   NPROC=2 launch/local.sh --data synthetic --arch resnet18 --max-steps 20   # CPU: 2 gloo ranks
#
# Environment (defaults): NPROC (GPUs visible, else 2), PYTHON (the checkout's .venv/bin/python
# when present, else python3), OMP_NUM_THREADS (CPU cores / NPROC). Extra arguments go to
# distres.train; run it from any folder, relative paths are from that folder.
set -euo pipefail

# No cd: relative paths (--data-dir, --output-dir, --config) are read from the folder
# the user is in; common.sh finds the checkout and puts it on PYTHONPATH.
source "$(dirname "$0")/common.sh"
if [[ -z "${NPROC:-}" ]]; then
  gpus=$(visible_gpus)
  if (( gpus > 0 )); then NPROC=$gpus; else NPROC=2; fi
fi
share_threads "$(nproc)" "$NPROC"

exec "$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" -m distres.train "$@"
