# Shared by launch/*.sh and slurm/*: sourced from the repository root, sets nothing else.
#
# PYTHON: the checkout's .venv when present, else python3 (a PYTHON already set wins).
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

visible_gpus() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
}

# share_threads CPUS NPROC: torchrun sets 1 thread per process; on CPU runs give each process
# its share of the cores instead (an OMP_NUM_THREADS already set wins).
share_threads() {
  local n=$(( $1 / $2 ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( n > 0 ? n : 1 ))}
}
