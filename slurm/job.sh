#!/usr/bin/env bash
# The body of slurm/train.sbatch and slurm/train-cpu.sbatch (run by them; not submitted itself).
#
# One srun task per node, each a torchrun that starts NPROC_PER_NODE workers. torchrun's c10d
# rendezvous on the first node of the allocation hands out node ranks, so no node rank is set
# by hand. Each job writes to its own output directory, keyed by the job id, so a requeued job
# finds its checkpoints and continues (distres.train --resume latest).
#
# Preemption: SLURM signals this batch shell (--signal=B:USR1@<s>, or scancel --batch
# --signal=USR1). The trap forwards SIGUSR1 through srun to torchrun, which passes it to every
# worker (TORCHELASTIC_SIGNALS_TO_HANDLE below); the workers agree on a step, save a checkpoint
# and exit with status 75. The job then requeues itself and the next run resumes.
#
# Environment (defaults):
#   DISTRES_HOME     the checkout to run from ($SLURM_SUBMIT_DIR: submit from the repo root)
#   PYTHON           .venv/bin/python when present, else python3
#   DEVICE           cuda (train-cpu.sbatch sets cpu: gloo instead of nccl)
#   NPROC_PER_NODE   GPUs per node (SLURM_GPUS_ON_NODE, else nvidia-smi), 1 process on CPU
#   OUTPUT_DIR       runs/<job name>-<job id>
#   RDZV_PORT        20000 + job id % 20000 (on the first node; distinct for jobs sharing a node)
#   MAX_RESTARTS     0: torchrun restarts of a failed worker group before the job fails
#   REQUEUE          1: requeue after a preemption (0: exit with status 75 instead)
set -uo pipefail

cd "${DISTRES_HOME:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
source launch/common.sh
DEVICE=${DEVICE:-cuda}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if [[ $DEVICE == cpu ]]; then NPROC_PER_NODE=1
  elif [[ -n "${SLURM_GPUS_ON_NODE:-}" ]]; then NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
  else NPROC_PER_NODE=$(nvidia-smi -L | wc -l); fi
fi
OUTPUT_DIR=${OUTPUT_DIR:-runs/${SLURM_JOB_NAME:-distres}-${SLURM_JOB_ID}}
RDZV_PORT=${RDZV_PORT:-$(( 20000 + SLURM_JOB_ID % 20000 ))}
MAX_RESTARTS=${MAX_RESTARTS:-0}
REQUEUE=${REQUEUE:-1}
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)

# Each worker gets its share of the task's CPUs (torchrun would otherwise set 1 thread).
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
share_threads "$cpus" "$NPROC_PER_NODE"
# torchrun forwards these to its workers; SIGUSR1 is not among its defaults, and without it
# SIGUSR1 would kill torchrun itself (and, on clusters that track processes by cgroup, the
# workers with it, before they save). PET_* sets torchrun's --signals-to-handle; older
# releases read TORCHELASTIC_SIGNALS_TO_HANDLE.
export PET_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
export TORCHELASTIC_SIGNALS_TO_HANDLE=$PET_SIGNALS_TO_HANDLE
# After forwarding a signal torchrun waits this long for the workers before SIGKILL (30 s by
# default): time for the step in flight, the next one, and a checkpoint write.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-120}
# NCCL: the defaults suit NVLink within a node and InfiniBand between nodes. Uncomment to pin
# the network interface, to debug a hang, or to fall back to TCP on clusters without IB:
#   export NCCL_SOCKET_IFNAME=ib0        # interface for bootstrap/TCP traffic
#   export NCCL_DEBUG=INFO               # topology and transport chosen, once per rank
#   export NCCL_IB_DISABLE=1             # no InfiniBand: use sockets
#   export GLOO_SOCKET_IFNAME=ib0        # the preemption flag's small gloo group, also on GPU runs
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a dead peer fails, not hangs

echo "distres: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
     "${SLURM_NTASKS} node task(s) x ${NPROC_PER_NODE} ${DEVICE} process(es), rendezvous ${head_node}:${RDZV_PORT}," \
     "output ${OUTPUT_DIR}"

preempted=0
srun_pid=""
on_signal() {
  # Forward once: a second signal during torchrun's shutdown could cut it short.
  [[ $preempted == 1 ]] && return
  preempted=1
  echo "distres: $(date +%T) job ${SLURM_JOB_ID} got a stop signal: checkpointing"
  if [[ -n $srun_pid ]]; then kill -USR1 "$srun_pid" 2>/dev/null; fi
}
trap on_signal USR1 TERM

# --nnodes is the number of srun tasks: one per node normally (--ntasks-per-node=1), and
# several on one machine for a test of the multi-node path.
# srun does not inherit --cpus-per-task from sbatch since SLURM 22.05: without it each torchrun,
# and every worker and data-loading process under it, would be bound to a single CPU.
srun --cpus-per-task="$cpus" --kill-on-bad-exit=0 \
  "$PYTHON" -m torch.distributed.run \
    --nnodes "${SLURM_NTASKS}" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "${head_node}:${RDZV_PORT}" --rdzv-id "${SLURM_JOB_ID}" \
    --max-restarts "$MAX_RESTARTS" \
    -m distres.train --device "$DEVICE" --output-dir "$OUTPUT_DIR" --resume latest "$@" &
srun_pid=$!
# A signal that came before srun started: forward it now.
if [[ $preempted == 1 ]]; then kill -USR1 "$srun_pid" 2>/dev/null; fi
# A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; done
wait "$srun_pid"
rc=$?

# torchrun exits 1 after forwarding a signal; 75 comes straight from workers started by srun.
if [[ $rc -ne 0 && ( $preempted -eq 1 || $rc -eq 75 ) ]]; then
  if [[ $REQUEUE == 1 ]]; then
    echo "distres: $(date +%T) job ${SLURM_JOB_ID} stopped at a checkpoint; requeueing"
    scontrol requeue "$SLURM_JOB_ID" && exit 0
  fi
  exit 75
fi
echo "distres: $(date +%T) job ${SLURM_JOB_ID} finished with status $rc"
exit "$rc"
