#!/usr/bin/env bash
# The GPU machine's torch/torchvision pair (torch 2.11, torchvision 0.26) against this checkout,
# on a CPU, before a GPU visit: API drift between the developers' torch and the GPU image's
# shows here, not in the visit's 15 minutes. `make compat-check` builds the environment and
# runs this; by hand: bash tools/compat-check.sh PYTHON (an interpreter with that pair).
#
#   1. every entry point's --help: benchmarks/*.py, gpu.sh list, python -m distres.<tool>
#   2. the CPU-runnable parts of the GPU paths (tests/test_gpu_paths.py: kernel families, the
#      input-bound verdict, autotune's estimates, gpu.sh's deadline and packing; the CPU twin of
#      the smoke run), tests/test_gpu.py collected (its tests need CUDA), the profiler and
#      telemetry tests
#   3. with COMPAT_DRY=1: benchmarks/gpu.sh first as a dry run, the visit's command on the CPU
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: bash tools/compat-check.sh PYTHON}
export PYTHONPATH="$PWD" WANDB_MODE=disabled
failed=0
check() { # NAME COMMAND...
  local name=$1
  shift
  if "$@" >/tmp/compat-check.$$.log 2>&1; then
    echo "ok    $name"
  else
    echo "FAIL  $name"
    tail -n 15 /tmp/compat-check.$$.log | sed 's/^/      /'
    failed=1
  fi
}
"$PY" -c "import torch, torchvision; print('compat-check: torch', torch.__version__, 'torchvision', torchvision.__version__)"
for f in benchmarks/*.py; do
  grep -q '__main__' "$f" && check "$f --help" "$PY" "$f" --help
done
check "gpu.sh list" bash benchmarks/gpu.sh list
for tool in train autotune evaluate predict export prepare; do
  check "distres.$tool --help" "$PY" -m distres.$tool --help
done
check "GPU paths on the CPU (pytest)" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu_paths.py tests/test_gpu.py \
  tests/test_profile.py tests/test_telemetry.py
if [[ ${COMPAT_DRY:-0} == 1 ]]; then
  out=$(mktemp -d)
  check "gpu.sh first, dry run" env DISTRES_GPU_DRY=1 OUT="$out" PYTHON="$PY" bash benchmarks/gpu.sh first
  echo "      (its files: $out)"
fi
rm -f /tmp/compat-check.$$.log
exit $failed
