#!/usr/bin/env bash
# Several nodes without SLURM: run this same command on every node; torchrun's c10d rendezvous
# at MASTER_ADDR:MASTER_PORT gathers the nodes and hands out node ranks (none is set by hand).
#
#   MASTER_ADDR=node0 NNODES=4 launch/multinode.sh --data imagefolder --data-dir /data/imagenet
#
# Environment (defaults): MASTER_ADDR (required: a host every node reaches, usually the first),
# MASTER_PORT (29500), NNODES (2), NPROC_PER_NODE (GPUs visible, else 1 gloo process),
# RUN_ID (distres: the same on every node, different for concurrent jobs), MAX_RESTARTS (0:
# torchrun restarts of a failed worker group; a restarted worker resumes from the newest
# checkpoint), PYTHON (the checkout's .venv/bin/python when present, else python3),
# OMP_NUM_THREADS (CPU cores / NPROC_PER_NODE). Extra arguments go to distres.train; relative
# paths in them are from the folder the command runs in.
set -euo pipefail

: "${MASTER_ADDR:?set MASTER_ADDR to a host every node can reach (e.g. the first node)}"
# No cd: relative paths (--data-dir, --output-dir, --config) are read from the folder
# the user is in; common.sh finds the checkout and puts it on PYTHONPATH.
source "$(dirname "$0")/common.sh"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  gpus=$(visible_gpus)
  if (( gpus > 0 )); then NPROC_PER_NODE=$gpus; else NPROC_PER_NODE=1; fi
fi
share_threads "$(nproc)" "$NPROC_PER_NODE"

exec "$PYTHON" -m torch.distributed.run --nnodes "${NNODES:-2}" --nproc_per_node "$NPROC_PER_NODE" \
  --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv-id "${RUN_ID:-distres}" \
  --max-restarts "${MAX_RESTARTS:-0}" -m distres.train "$@"
