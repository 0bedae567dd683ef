#!/usr/bin/env bash
# The GPU measurements, one part per command, each well inside a 10-minute command limit:
#
#   bash benchmarks/gpu.sh list              # the parts, their minutes and commands (runs nothing)
#   bash benchmarks/gpu.sh first             # then one part per call, e.g. on a lent GPU machine
#
# Runs from the checkout as it is: no install (PYTHONPATH), no git (the code version comes from
# $DISTRES_CODE_VERSION, e.g. DISTRES_CODE_VERSION="commit $(git rev-parse HEAD)" here), no W&B, no
# DALI and no ffmpeg needed (a benchmark case that needs a missing package says so and the rest
# goes on). The CIFAR-10 JPEG tarball comes from .gpu/cifar10-jpeg.tar.gz (an ignored folder:
# mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/) and is unpacked once.
# Each part writes its results as soon as each case ends, then packs them into $OUT/PART.tgz
# beside PART.log and a short PART.md: three files a part.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/distres-gpu}
DATA_DIR=${DATA_DIR:-.cache/data/cifar10}
TARBALL=${TARBALL:-.gpu/cifar10-jpeg.tar.gz}

# part: minutes: what
PARTS=(
  "first:7:one command for a short lease: environment, the ResNet-50 headline (bf16, channels_last, batch 256, with and without DDP at world size 1), pytest -m gpu, ResNeXt-50 at the same settings"
  "smoke:5:environment, then every CUDA path once: pytest -m gpu (nccl group of one through the loop, fp16 + GradScaler + clipping, compiled DDP with grad accumulation resumed, gpu backend vs CPU bit for bit, CUDA RNG through a checkpoint, NVML, host-sync audit of every backend)"
  "bare:6:bare ResNet-50 step without distres: NCHW/channels_last, batch 256/384, compile, reduce-overhead, DDP at world size 1 with zero_grad in place / set_to_none / no broadcast_buffers"
  "levers:8:ResNet-50 through distres.train, 224 px synthetic, 1 GPU: fp32 -> bf16 -> channels_last -> batch 256 -> compile, and DDP at world size 1 vs none"
  "levers-x:6:the same for ResNeXt-50 32x4d (bf16 channels_last batch 256, eager and compiled)"
  "loaders:5:input pipelines without a model: torch and gpu backends on the CIFAR-10 JPEGs, torch (decoding in workers and on the GPU) on 224-px generated JPEGs (dali when installed)"
  "cifar10:7:configs/cifar10-gpu.yaml end to end on the CIFAR-10 JPEGs: accuracy and seconds"
  "scaling:6:CPU vs 1 GPU, ResNet-50 on the CIFAR-10 JPEGs (gpuN skipped on one GPU)"
  "seed:6:the seed article's job (ResNet-50, ImageNet stem, CIFAR-10, 10 epochs) on this GPU: its plain loop (benchmarks/seed_loop.py: batch 64, Adam, fp32), then distres with configs/cifar10-cpu.yaml's recipe and the gpu backend; seconds and test top-1 of each"
)

part=${1:-list}
if [[ $part == list ]]; then
  for p in "${PARTS[@]}"; do
    IFS=: read -r name mins what <<<"$p"
    printf '%-9s ~%s min  %s\n' "$name" "$mins" "$what"
  done
  echo "each: bash benchmarks/gpu.sh PART   (results: \$OUT/PART.{log,md,tgz}; OUT=$OUT)"
  exit 0
fi
known=0
for p in "${PARTS[@]}"; do [[ ${p%%:*} == "$part" ]] && known=1; done
if (( ! known )); then echo "gpu.sh: unknown part '$part'; bash benchmarks/gpu.sh list" >&2; exit 2; fi

dir="$OUT/$part"
mkdir -p "$dir"
log="$OUT/$part.log"
summary="$OUT/$part.md"
exec > >(tee "$log") 2>&1
: >"$summary"
echo "# gpu.sh $part: $(date -u +%FT%TZ), code: ${DISTRES_CODE_VERSION:-unknown}"
pack() { tar czf "$OUT/$part.tgz" -C "$OUT" "$part" && rm -rf "${dir:?}"; }
trap pack EXIT

need_cifar10() {
  if [[ ! -d $DATA_DIR/train && -f $TARBALL ]]; then
    mkdir -p "$DATA_DIR" && tar xzf "$TARBALL" -C "$DATA_DIR"
  fi
  [[ -d $DATA_DIR/train ]] || { echo "gpu.sh: no CIFAR-10 at $DATA_DIR or $TARBALL"; return 1; }
}

scaling() {  # NAME [scaling.py flags] [-- distres.train flags]: one distres.train run, timed
  local name=$1; shift
  "$PY" benchmarks/scaling.py --work-dir "runs/gpu-$part-$name-$$" --out "$dir" --name "$name" --wandb disabled \
    --timeout 300 "$@" | tail -n 12
  grep -h '"kind": "epoch"' "runs/gpu-$part-$name-$$"/*/metrics.jsonl 2>/dev/null | cut -c1-300
}

table() {  # the scaling.py results of this part as one Markdown table
  "$PY" - "$dir" <<'PY' >>"$summary"
import json, pathlib, sys
rows = []
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    r = json.loads(f.read_text())
    for m in r.get("measured", []):
        rows.append(f"| {f.stem} | {m['name']} | {m['images_per_sec']:,.0f} | {m['step_ms']:.1f} | "
                    f"{m['data_wait_ms']:.1f} | {m.get('peak_mem_mb', 0):,.0f} |")
print("| run | unit | images/s | step ms | data wait ms | peak MB |\n| --- | --- | --- | --- | --- | --- |")
print("\n".join(rows) or "| (no finished run) | | | | | |")
PY
  cat "$summary"
}

environment() {  # the GPU, driver and library versions, to env.txt
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | tee "$dir/env.txt"
  "$PY" -c "import torch, torchvision, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__)" | tee -a "$dir/env.txt"
}

gpu_tests() {  # SECONDS: the GPU-only tests, their last lines to the summary
  timeout -k 10 "$1" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider --junitxml="$dir/gpu-tests.xml" -rs \
    | tee "$dir/pytest.txt"
  tail -n 5 "$dir/pytest.txt" >>"$summary"
}

# one GPU, 224-px synthetic images, the same windows for every throughput run (first, levers, levers-x)
synthetic224=(--units gpu1 --data synthetic --image-size 224 --window 20 --warmup-windows 3 --windows 4)

case $part in
  first)
    environment
    common=("${synthetic224[@]}" --batch-size 256 --amp bf16)
    scaling r50-bf16-cl-b256 --arch resnet50 "${common[@]}" -- --channels-last
    gpu_tests 300
    scaling r50-bf16-cl-b256-ddp1 --arch resnet50 "${common[@]}" -- --channels-last --dist-backend nccl
    scaling rx50-bf16-cl-b256 --arch resnext50_32x4d "${common[@]}" -- --channels-last
    table ;;
  smoke)
    environment
    gpu_tests 500 ;;
  bare)
    "$PY" benchmarks/bare_step.py --out "$dir" --timeout 200 --budget 480 --profile eager:cl:256 \
      2>"$dir/stderr.txt" | tee "$summary" ;;
  levers)
    common=("${synthetic224[@]}" --arch resnet50)
    scaling r50-fp32-nchw-b128 "${common[@]}" --batch-size 128 --amp none -- --no-channels-last
    scaling r50-bf16-nchw-b128 "${common[@]}" --batch-size 128 --amp bf16 -- --no-channels-last
    scaling r50-bf16-cl-b128 "${common[@]}" --batch-size 128 --amp bf16 -- --channels-last
    scaling r50-bf16-cl-b256 "${common[@]}" --batch-size 256 --amp bf16 -- --channels-last
    scaling r50-bf16-cl-b256-ddp1 "${common[@]}" --batch-size 256 --amp bf16 -- --channels-last --dist-backend nccl
    scaling r50-bf16-cl-b256-compile "${common[@]}" --batch-size 256 --amp bf16 --warmup-windows 5 -- \
      --channels-last --compile
    table ;;
  levers-x)
    common=("${synthetic224[@]}" --arch resnext50_32x4d)
    scaling rx50-bf16-cl-b256 "${common[@]}" --batch-size 256 --amp bf16 -- --channels-last
    scaling rx50-bf16-cl-b256-compile "${common[@]}" --batch-size 256 --amp bf16 --warmup-windows 5 -- \
      --channels-last --compile
    table ;;
  loaders)
    need_cifar10 || exit 1
    "$PY" benchmarks/loaders.py run --data-dir "$DATA_DIR" --backends gpu,torch --image-size 32 --batch-size 512 \
      --batches 100 --warmup 5 --repeats 2 --workers 15 --out "$dir" --name loaders-gpu-cifar10 >/dev/null
    "$PY" benchmarks/loaders.py generate .cache/data/imagenet-like --num 2000 | tail -n 1
    "$PY" benchmarks/loaders.py run --data-dir .cache/data/imagenet-like --backends torch,torch-device-decode,dali,torchvision-stock \
      --image-size 224 --batch-size 256 --batches 15 --warmup 3 --repeats 2 --workers 15 \
      --out "$dir" --name loaders-gpu-224 >/dev/null
    cat "$dir"/*.md >"$summary"; cat "$summary" ;;
  cifar10)
    need_cifar10 || exit 1
    timeout -k 10 480 "$PY" -m distres.train --config configs/cifar10-gpu.yaml --data-dir "$DATA_DIR" \
      --output-dir "$dir/run" --no-progress --wandb disabled
    grep -h '"kind": "eval"' "$dir/run/metrics.jsonl" >"$summary"; tail -n 3 "$summary" ;;
  seed)
    need_cifar10 || exit 1
    timeout -k 10 330 "$PY" benchmarks/seed_loop.py --data-dir "$DATA_DIR" --device cuda --epochs 10 --workers 8 \
      | tee "$dir/seed-loop.json"
    timeout -k 10 200 "$PY" -m distres.train --config configs/cifar10-cpu.yaml --epochs 10 --device cuda \
      --data-backend gpu --data-dir "$DATA_DIR" --output-dir "$dir/run" --checkpoint-every 0 --eval-every 10 \
      --no-progress --wandb disabled 2>&1 | tee "$dir/distres.txt" | tail -n 3
    { cat "$dir/seed-loop.json"; grep -h "distres: done" "$dir/distres.txt"; } >"$summary"; cat "$summary" ;;
  scaling)
    need_cifar10 || exit 1
    scaling scaling-gpu-resnet50-cifar10 --units cpu1,gpu1,gpuN --arch resnet50 --batch-size 256 \
      --data cifar10 --data-dir "$DATA_DIR" --window 10 --warmup-windows 2 --windows 4
    table ;;
esac
