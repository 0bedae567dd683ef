#!/usr/bin/env bash
# Every GPU measurement the committed results need, in one command, on a GPU machine:
#
#   benchmarks/gpu.sh                       # all of them, results into benchmarks/results/
#   benchmarks/gpu.sh levers                # one part: levers | loaders | scaling | cifar10
#
# Needs the package installed (pip install -e '.[dali]'; on a machine without internet:
# pip install --no-deps -e . plus the nvidia-dali-cuda130 wheel), and the CIFAR-10 JPEGs at
# DATA_DIR (default .cache/data/cifar10: `tar xzf cifar10-jpeg.tar.gz -C .cache/data/cifar10`).
#
#   levers   ResNet-50 and ResNeXt-50 32x4d, 224 px synthetic data, 1 GPU: images/s with each
#            lever added one at a time (fp32 NCHW -> bf16 -> channels_last -> batch 256 ->
#            torch.compile modes), each a real distres.train run timed by benchmarks/scaling.py
#            (median over windows after warm-up, compilation excluded)
#   loaders  benchmarks/loaders.py all: torch / dali (mixed decode) / gpu backends, no model
#   scaling  benchmarks/scaling.py: CPU vs 1 GPU vs all GPUs, ResNet-50 on the CIFAR-10 JPEGs and
#            on 224-px synthetic data
#   cifar10  configs/cifar10-gpu.yaml end to end on the CIFAR-10 JPEGs (accuracy and seconds)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA_DIR=${DATA_DIR:-.cache/data/cifar10}
OUT=${OUT:-benchmarks/results}
WORK=${WORK:-runs/gpu-$(date +%Y%m%d-%H%M%S)}
parts=${1:-levers loaders scaling cifar10}
mkdir -p "$WORK"

scaling() {  # NAME [scaling.py flags] [-- distres.train flags]
  local name=$1; shift
  "$PYTHON" benchmarks/scaling.py --work-dir "$WORK/$name" --out "$OUT" --name "$name" --wandb offline "$@"
}

for part in $parts; do
  case $part in
    levers)
      for arch in resnet50 resnext50_32x4d; do
        common=(--units gpu1 --arch "$arch" --data synthetic --image-size 224 --window 20 --warmup-windows 3 --windows 5)
        scaling "levers-$arch-fp32" "${common[@]}" --batch-size 128 --amp none -- --no-channels-last
        scaling "levers-$arch-bf16" "${common[@]}" --batch-size 128 --amp bf16 -- --no-channels-last
        scaling "levers-$arch-bf16-cl" "${common[@]}" --batch-size 128 --amp bf16 -- --channels-last
        scaling "levers-$arch-bf16-cl-b256" "${common[@]}" --batch-size 256 --amp bf16 -- --channels-last
        for mode in default max-autotune-no-cudagraphs max-autotune; do
          scaling "levers-$arch-bf16-cl-b256-compile-$mode" "${common[@]}" --batch-size 256 --amp bf16 \
            --warmup-windows 6 -- --channels-last --compile --compile-mode "$mode"
        done
      done ;;
    loaders)
      "$PYTHON" benchmarks/loaders.py all --cifar10 "$DATA_DIR" --out "$OUT" ;;
    scaling)
      scaling scaling-gpu-resnet50-cifar10 --units cpu1,gpu1,gpuN --arch resnet50 --batch-size 256 \
        --data cifar10 --data-dir "$DATA_DIR"
      scaling scaling-gpu-resnet50-synthetic224 --units gpu1,gpuN --arch resnet50 --batch-size 256 \
        --data synthetic --image-size 224 -- --channels-last ;;
    cifar10)
      "$PYTHON" -m distres.train --config configs/cifar10-gpu.yaml --data-dir "$DATA_DIR" \
        --output-dir "$WORK/cifar10-gpu" --no-progress 2>&1 | tee "$WORK/cifar10-gpu.log" ;;
    *) echo "gpu.sh: unknown part $part (levers, loaders, scaling, cifar10)" >&2; exit 2 ;;
  esac
done
