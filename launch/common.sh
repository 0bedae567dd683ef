# Shared by launch/*.sh and slurm/*, sourced from any folder. It sets:
#
# DISTRES_ROOT: the checkout holding this file (found from the file itself, not from the
#   current folder: the launchers stay in the user's folder, so relative paths mean what they say).
# PYTHON: the checkout's .venv when present, else python3 (a PYTHON already set wins).
# PYTHONPATH: the checkout first, so `-m distres.train` runs this checkout's code from any
#   folder, installed or not. PYTHONSAFEPATH (Python >= 3.11) keeps `python -m` from putting
#   the current folder first, where another checkout's distres/ could shadow this one.
DISTRES_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x $DISTRES_ROOT/.venv/bin/python ]]; then PYTHON=$DISTRES_ROOT/.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$DISTRES_ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONSAFEPATH=1

visible_gpus() {
  "$PYTHON" -c 'import torch; print(torch.cuda.device_count())'
}

# share_threads CPUS NPROC: torchrun sets 1 thread per process; on CPU runs give each process
# its share of the cores instead (an OMP_NUM_THREADS already set wins).
share_threads() {
  local n=$(( $1 / $2 ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( n > 0 ? n : 1 ))}
}
