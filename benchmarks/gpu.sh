#!/usr/bin/env bash
# The GPU measurements, one part per command, each inside one deadline (a device command gets
# 10 minutes, a visit 15 in all):
#
#   bash benchmarks/gpu.sh list              # the parts, their minutes and commands (runs nothing)
#   bash benchmarks/gpu.sh first             # the headline and every CUDA path, in 6 minutes
#   DISTRES_GPU_DRY=1 bash benchmarks/gpu.sh first   # the same steps on a CPU at tiny sizes
#
# Runs from the checkout as it is: no install (PYTHONPATH), no git (the code version comes from
# $DISTRES_CODE_VERSION, e.g. DISTRES_CODE_VERSION="commit $(git rev-parse HEAD)" here), no W&B,
# DALI or ffmpeg (a case that needs a missing package says so and the rest goes on). The device
# image may hold only torch, torchvision and numpy: `first` installs nothing, and a step whose
# package is missing (pytest, PyYAML for the tests; pynvml) says so in PART.md.
# The CIFAR-10 JPEG tarball comes from .gpu/cifar10-jpeg.tar.gz (an ignored folder:
# mkdir -p .gpu && cp ../shared/data/cifar10-jpeg.tar.gz .gpu/) and is unpacked once.
#
# One deadline per part (DISTRES_GPU_DEADLINE_S, default 360 s): every step runs under what is
# left of it (timeout, SIGINT first so Python prints what it has, SIGKILL 15 s later), a step
# with under DISTRES_GPU_MIN_STEP_S left is skipped and listed. After every step the part's
# files are packed into $OUT: PART.log (the console), PART.md (the summary) and PART.tgz (every
# result, the probe, the last lines of each training log); nothing else is written there, so a
# command killed at any point still returns all that was measured before.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WANDB_MODE=disabled
# One machine: the process groups of one talk over the loopback, whatever its other interfaces.
export GLOO_SOCKET_IFNAME=${GLOO_SOCKET_IFNAME:-lo} NCCL_SOCKET_IFNAME=${NCCL_SOCKET_IFNAME:-lo}
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/distres-gpu}
DATA_DIR=${DATA_DIR:-.cache/data/cifar10}
TARBALL=${TARBALL:-.gpu/cifar10-jpeg.tar.gz}
DEADLINE_S=${DISTRES_GPU_DEADLINE_S:-360}
MIN_STEP_S=${DISTRES_GPU_MIN_STEP_S:-20}
DRY=${DISTRES_GPU_DRY:-0}
GRACE_S=${DISTRES_GPU_GRACE_S:-15} # between SIGINT and SIGKILL; also kept free at the end for the last pack

# part: minutes: what
PARTS=(
  "first:6:the probe (versions, nvidia-smi, /dev/shm, name resolution, CUDA decode_jpeg, nccl and gloo groups of one, NVML); the ResNet-50 headline (224 px, bf16, channels_last, batch 256) without and with DDP at world size 1, alternating A B A B, SM clock recorded; the bare step beside it; then pytest -m gpu with the time left"
  "smoke:6:the probe, then every CUDA path once: pytest -m gpu (nccl through the loop, fp16 + GradScaler + clipping, the gpu backend vs CPU bit for bit, nvJPEG vs the workers, CUDA RNG, NVML, host-sync audit of every backend, evaluate/predict/export, the smoke run of profile/compile/autotune/augment/EMA/TensorBoard/resume, compiled DDP resumed)"
  "bare:6:bare ResNet-50 step without distres: NCHW/channels_last, batch 256/384, compile, reduce-overhead, DDP at world size 1 with zero_grad in place / set_to_none / no broadcast_buffers"
  "levers:8:ResNet-50 through distres.train, 224 px synthetic, 1 GPU: fp32 -> bf16 -> channels_last -> batch 256 -> compile, and DDP at world size 1 vs none"
  "levers-x:6:the same for ResNeXt-50 32x4d (bf16 channels_last batch 256, eager and compiled)"
  "loaders:6:input pipelines without a model: torch and gpu backends on the CIFAR-10 JPEGs, torch (decoding in workers and on the GPU) on 8,000 generated 224-px JPEGs (dali when installed)"
  "cifar10:8:configs/cifar10-gpu.yaml end to end on the CIFAR-10 JPEGs: accuracy and seconds"
  "scaling:6:CPU vs 1 GPU, ResNet-50 on the CIFAR-10 JPEGs (gpuN skipped on one GPU)"
  "seed:8:the seed article's job (ResNet-50, ImageNet stem, CIFAR-10, 10 epochs) on this GPU: its plain loop (benchmarks/seed_loop.py: batch 64, Adam, fp32), then distres with configs/cifar10-cpu.yaml's recipe and the gpu backend; seconds and test top-1 of each"
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
if ((!known)); then
  echo "gpu.sh: unknown part '$part'; bash benchmarks/gpu.sh list" >&2
  exit 2
fi
if [[ ! $DEADLINE_S =~ ^[0-9]+$ ]]; then
  echo "gpu.sh: DISTRES_GPU_DEADLINE_S must be whole seconds, not '$DEADLINE_S'" >&2
  exit 2
fi

T0=$SECONDS
mkdir -p "$OUT"
# The part's files grow outside $OUT (which must never hold more than a few files) and are
# packed into it after each step.
work=$(mktemp -d "${TMPDIR:-/tmp}/distres-gpu-$part.XXXXXX")
dir="$work/$part"
mkdir -p "$dir"
log="$OUT/$part.log"
summary="$OUT/$part.md"
exec > >(tee "$log") 2>&1
: >"$summary"
say() { echo "$*" | tee -a "$summary"; }
say "# gpu.sh $part: $(date -u +%FT%TZ), code: ${DISTRES_CODE_VERSION:-unknown}, deadline ${DEADLINE_S} s$( ((DRY)) && echo ', DRY RUN on the CPU at tiny sizes: no figure here means anything')"

pack() {
  cp "$summary" "$dir/summary.md" 2>/dev/null
  tar czf "$OUT/.$part.tgz.part" -C "$work" "$part" && mv -f "$OUT/.$part.tgz.part" "$OUT/$part.tgz"
}
finish() {
  pack
  rm -rf "${work:?}"
}
trap finish EXIT
pack
trap 'say "gpu.sh: interrupted at $((SECONDS - T0)) s"; exit 130' INT TERM

left() { echo $((DEADLINE_S - (SECONDS - T0) - GRACE_S)); }
# limit CAP: the seconds a command of this step may run (CAP or what the deadline leaves);
# prints nothing and fails when under MIN_STEP_S are left.
limit() {
  local l
  l=$(left)
  ((l >= MIN_STEP_S)) || return 1
  echo $(($1 < l ? $1 : l))
}
# step NAME CAP COMMAND...: run it within limit CAP, its status to the summary, then pack.
step() {
  local name=$1 cap=$2 t t0=$SECONDS rc
  shift 2
  if ! t=$(limit "$cap"); then
    say "- $name: skipped, $(left) s left before the deadline"
    return 0
  fi
  echo "== $name (up to $t s, $((SECONDS - T0)) s into the part)"
  LIMIT=$t "$@"
  rc=$?
  say "- $name: exit $rc in $((SECONDS - t0)) s (limit $t s)"
  pack
  return 0
}
# bounded SECONDS COMMAND...: the command under timeout, SIGINT first.
bounded() {
  local t=$1
  shift
  timeout -s INT -k "$GRACE_S" "$t" "$@"
}
cmd() { bounded "$LIMIT" "$@"; } # COMMAND...: within the step's limit
cmd_out() { # FILE COMMAND...: the same, its standard output to FILE
  local f=$1
  shift
  bounded "$LIMIT" "$@" >"$f"
}

need_cifar10() {
  if [[ ! -d $DATA_DIR/train && -f $TARBALL ]]; then
    mkdir -p "$DATA_DIR" && tar xzf "$TARBALL" -C "$DATA_DIR"
  fi
  [[ -d $DATA_DIR/train ]] || {
    say "gpu.sh: no CIFAR-10 at $DATA_DIR or $TARBALL"
    return 1
  }
}

# The packages a part needs beyond torch, torchvision and numpy (PyYAML for distres.config,
# tqdm for distres.train, pytest and its own for the tests): those missing here are unpacked from the wheels in
# .gpu/wheels (`make gpu-prep` fills it; the device has no network) into the part's folder and
# put on PYTHONPATH. A wheel needs no pip to be unpacked, and PyYAML's pure-Python part works
# on any Python version (its C extension is optional).
deps() {
  local site="$work/site" missing
  missing=$("$PY" - <<'PY'
import importlib.util
wheels = {"yaml": "pyyaml", "pytest": "pytest", "pluggy": "pluggy", "iniconfig": "iniconfig", "packaging": "packaging",
          "pygments": "pygments", "pytest_timeout": "pytest_timeout", "exceptiongroup": "exceptiongroup", "tomli": "tomli",
          "tqdm": "tqdm"}
def found(module):
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False
print(" ".join(w for m, w in wheels.items() if not found(m)))
PY
)
  [[ -z $missing ]] && return 0
  if [[ -d .gpu/wheels ]]; then
    "$PY" - "$site" .gpu/wheels $missing <<'PY'
import pathlib, sys, zipfile
site, folder, names = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3:]
for name in names:
    for whl in folder.glob("*.whl"):
        if whl.name.lower().startswith(name + "-"):
            zipfile.ZipFile(whl).extractall(site)
            break
PY
    export PYTHONPATH="$PYTHONPATH:$site"
    say "- missing here, unpacked from .gpu/wheels: $missing"
  else
    say "- missing here and no .gpu/wheels to unpack them from: $missing"
  fi
}

probe() {
  bounded "$LIMIT" "$PY" benchmarks/gpu_probe.py >"$dir/probe.jsonl"
  local rc=$?
  cat "$dir/probe.jsonl"
  "$PY" - "$dir/probe.jsonl" <<'PY' >>"$summary"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    keep = {k: v for k, v in r.items() if k not in ("check", "ok", "check_s")}
    print(f"  - probe {r['check']}: {'ok' if r['ok'] else 'FAILED'} {json.dumps(keep)[:400]}")
PY
  return $rc
}

# clocks NAME COMMAND...: the command with the GPU's SM clock sampled every second beside it.
clocks() {
  local name=$1 sampler=
  shift
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,temperature.gpu,utilization.gpu \
      --format=csv,noheader,nounits -lms 1000 >"$dir/clocks-$name.csv" 2>&1 &
    sampler=$!
  fi
  "$@"
  local rc=$?
  [[ -n $sampler ]] && kill "$sampler" 2>/dev/null
  return $rc
}

# train NAME [scaling.py flags] [-- distres.train flags]: one distres.train run through
# benchmarks/scaling.py within the step's limit; the tail of its log comes back either way.
train() {
  local name=$1 runs="$work/runs/$1"
  shift
  # scaling.py's own timeout ends torchrun's process group (its own session) before ours ends
  # scaling.py; the step's timeout is the backstop.
  clocks "$name" bounded "$LIMIT" "$PY" benchmarks/scaling.py --work-dir "$runs" --out "$dir" --name "$name" \
    --wandb disabled --timeout $((LIMIT - 10)) "$@" 2>&1 | tee "$dir/$name.scaling.txt" | tail -n 12
  local rc=${PIPESTATUS[0]} tail="$dir/$name.scaling.txt"
  for f in "$runs"/*/train.log; do
    [[ -f $f ]] && tail -n 60 "$f" >"$dir/$name.train-tail.txt" && tail="$dir/$name.train-tail.txt"
  done
  if ((rc != 0)); then
    say "  - $name failed (exit $rc); the last lines of $(basename "$tail"):"
    tail -n 8 "$tail" | sed 's/^/        /' | tee -a "$summary"
  fi
  return "$rc"
}

table() { # the scaling.py results and SM clocks of this part, and the bare step, as Markdown
  "$PY" - "$dir" <<'PY' >>"$summary"
import csv, json, pathlib, statistics, sys
d = pathlib.Path(sys.argv[1])
rows, rates = [], {}
for f in sorted(d.glob("*.json"), key=lambda p: p.stat().st_mtime):
    if f.name == "bare_step.json":
        continue
    r = json.loads(f.read_text())
    for m in r.get("measured", []):
        mhz = []
        clk = d / f"clocks-{f.stem}.csv"
        if clk.is_file():
            for row in csv.reader(clk.read_text().splitlines()):
                try:
                    mhz.append(float(row[1]))
                except (IndexError, ValueError):
                    pass
        sm = f"{statistics.median(mhz):.0f} (max {max(mhz):.0f})" if mhz else "-"
        rates.setdefault(f.stem.rsplit("-", 1)[0] if f.stem[-2:] in ("-1", "-2") else f.stem, []).append(m["images_per_sec"])
        rows.append(f"| {f.stem} | {m['images_per_sec']:,.0f} | {m['step_ms']:.1f} | {m['data_wait_ms']:.1f} | "
                    f"{m.get('peak_mem_mb', 0):,.0f} | {sm} |")
print("\nSteady-state images/s: the median of the train windows after the warm-up ones.\n")
print("| run | images/s | step ms | data wait ms | peak MB | SM MHz median |\n| --- | --- | --- | --- | --- | --- |")
print("\n".join(rows) or "| (no finished run) | | | | | |")
for name, v in rates.items():
    print(f"\n{name}: {', '.join(f'{x:,.0f}' for x in v)} images/s" + (f" (spread {100 * (max(v) - min(v)) / max(v):.1f}%)" if len(v) > 1 else ""))
bare = d / "bare_step.json"
if bare.is_file():
    for b in json.loads(bare.read_text()):
        if "img_s" not in b:
            print(f"\nbare step {b['config']}: {b.get('error', '')[-200:]}")
            continue
        loop = [x for k, v in rates.items() if not k.endswith("ddp1") for x in v]
        over = f"; distres's loop without DDP: {statistics.median(loop):,.0f}, {100 * (1 - statistics.median(loop) / b['img_s']):.1f}% below" if loop else ""
        print(f"\nbare step {b['config']} ({b['arch']}): {b['img_s']:,.0f} images/s (CUDA events){over}")
PY
  cat "$summary"
}

gpu_tests() { # [pytest selection]: the GPU-only tests within the step's limit, their summary to PART.md
  local extra=()
  if ! "$PY" -c "import pytest, yaml" 2>/dev/null; then
    say "  - pytest or PyYAML missing here: no tests (pip install pytest pyyaml, or -e '.[test]')"
    return 1
  fi
  if "$PY" -c "import pytest_timeout" 2>/dev/null; then
    extra=(--timeout "$((LIMIT < 300 ? LIMIT : 300))")
  else
    say "  - pytest-timeout missing here: no per-test timeout, only the step's"
  fi
  # SIGINT: pytest stops the test it is in and still prints its summary (-rA: every test's outcome).
  bounded "$LIMIT" "$PY" -m pytest -q -m gpu tests/test_gpu.py -p no:cacheprovider -rA \
    --junitxml="$dir/gpu-tests.xml" "${extra[@]}" "$@" 2>&1 | tee "$dir/pytest.txt" | tail -n 40
  local rc=${PIPESTATUS[0]}
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)|^=+ .* in [0-9.]+s" "$dir/pytest.txt" | sed 's/^/  - /' >>"$summary"
  return "$rc"
}

bare() { # CONFIGS: benchmarks/bare_step.py within the step's limit
  bounded "$LIMIT" "$PY" benchmarks/bare_step.py --out "$dir" --configs "$1" --timeout $((LIMIT - 5)) \
    --budget "$LIMIT" --min-left 15 "${bare_dry[@]}" 2>"$dir/bare-stderr.txt" | tail -n 4
}

# One GPU, 224-px synthetic images, the same windows for every throughput run. The dry run: the
# same steps on the CPU with a tiny model, images and windows.
if ((DRY)); then
  synthetic224=(--units cpu1 --data synthetic --image-size 32 --window 2 --warmup-windows 1 --windows 2)
  headline=(--arch resnet18 "${synthetic224[@]}" --batch-size 8 --amp none)
  ddp1=(--dist-backend gloo)
  bare_dry=(--device cpu --arch resnet18 --image-size 32 --steps 2 --repeats 1 --warmup 1)
  bare_cfg=eager:cl:8
else
  synthetic224=(--units gpu1 --data synthetic --image-size 224 --window 20 --warmup-windows 3 --windows 4)
  headline=(--arch resnet50 "${synthetic224[@]}" --batch-size 256 --amp bf16)
  ddp1=(--dist-backend nccl)
  bare_dry=(--steps 30 --repeats 3 --warmup 10)
  bare_cfg=eager:cl:256
fi

deps
case $part in
  first)
    # a step that outlasts any deadline, for tests/test_gpu_paths.py
    [[ ${DISTRES_GPU_FAKE_SLOW:-0} == 1 ]] && step "slow (test)" 600 cmd sleep 600
    step probe 30 probe
    # Without and with DDP, alternating, so a drift of clocks or temperature falls on both.
    step "headline A1: no DDP" 120 train r50-1 "${headline[@]}" -- --channels-last
    step "headline B1: DDP, world size 1" 120 train r50-ddp1-1 "${headline[@]}" -- --channels-last "${ddp1[@]}"
    step "headline A2: no DDP" 120 train r50-2 "${headline[@]}" -- --channels-last
    step "headline B2: DDP, world size 1" 120 train r50-ddp1-2 "${headline[@]}" -- --channels-last "${ddp1[@]}"
    step "bare step $bare_cfg" 90 bare "$bare_cfg"
    table
    step "pytest -m gpu" 600 gpu_tests ;;
  smoke)
    step probe 30 probe
    step "pytest -m gpu" 600 gpu_tests ;;
  bare)
    step "bare step matrix" 600 cmd "$PY" benchmarks/bare_step.py --out "$dir" --timeout 200 --budget 520 \
      --profile eager:cl:256
    table ;;
  levers)
    common=("${synthetic224[@]}" --arch resnet50)
    step fp32-nchw-b128 150 train r50-fp32-nchw-b128 "${common[@]}" --batch-size 128 --amp none -- --no-channels-last
    step bf16-nchw-b128 100 train r50-bf16-nchw-b128 "${common[@]}" --batch-size 128 --amp bf16 -- --no-channels-last
    step bf16-cl-b128 100 train r50-bf16-cl-b128 "${common[@]}" --batch-size 128 --amp bf16 -- --channels-last
    step bf16-cl-b256 100 train r50-bf16-cl-b256 "${common[@]}" --batch-size 256 --amp bf16 -- --channels-last
    step bf16-cl-b256-compile 200 train r50-bf16-cl-b256-compile "${common[@]}" --batch-size 256 --amp bf16 \
      --warmup-windows 5 -- --channels-last --compile
    table ;;
  levers-x)
    common=("${synthetic224[@]}" --arch resnext50_32x4d)
    step rx50-bf16-cl-b256 120 train rx50-bf16-cl-b256 "${common[@]}" --batch-size 256 --amp bf16 -- --channels-last
    step rx50-bf16-cl-b256-compile 220 train rx50-bf16-cl-b256-compile "${common[@]}" --batch-size 256 --amp bf16 \
      --warmup-windows 5 -- --channels-last --compile
    table ;;
  loaders)
    need_cifar10 || exit 1
    step "loaders cifar10" 120 cmd "$PY" benchmarks/loaders.py run --data-dir "$DATA_DIR" --backends gpu,torch \
      --image-size 32 --batch-size 512 --batches 100 --warmup 5 --repeats 2 --workers 15 --case-timeout 40 \
      --out "$dir" --name loaders-gpu-cifar10
    step "generate 8,000 224-px JPEGs" 90 cmd "$PY" benchmarks/loaders.py generate .cache/data/imagenet-like --num 8000
    # 8,000 images at batch 64: 125 batches an epoch, every one of 15 workers decodes 8 of them,
    # and the 30 warm-up + 60 timed batches stay inside one epoch.
    step "loaders 224 px" 240 cmd "$PY" benchmarks/loaders.py run --data-dir .cache/data/imagenet-like \
      --backends torch,torch-device-decode,dali,torchvision-stock --image-size 224 --batch-size 64 --batches 60 \
      --warmup 30 --repeats 2 --workers 15 --case-timeout 30 --out "$dir" --name loaders-gpu-224
    cat "$dir"/*.md >>"$summary" 2>/dev/null ;;
  cifar10)
    need_cifar10 || exit 1
    step "configs/cifar10-gpu.yaml" 600 cmd "$PY" -m distres.train --config configs/cifar10-gpu.yaml \
      --data-dir "$DATA_DIR" --output-dir "$dir/run" --no-progress --wandb disabled
    grep -h '"kind": "eval"' "$dir/run/metrics.jsonl" >>"$summary" ;;
  seed)
    need_cifar10 || exit 1
    step "seed loop" 330 cmd_out "$dir/seed-loop.json" "$PY" benchmarks/seed_loop.py --data-dir "$DATA_DIR" \
      --device cuda --epochs 10 --workers 8
    step "distres, seed recipe" 200 cmd_out "$dir/distres.txt" "$PY" -m distres.train --config configs/cifar10-cpu.yaml \
      --epochs 10 --device cuda --data-backend gpu --data-dir "$DATA_DIR" --output-dir "$dir/run" --checkpoint-every 0 \
      --eval-every 10 --no-progress --wandb disabled
    cat "$dir/seed-loop.json" >>"$summary" 2>/dev/null
    grep -h "distres: done" "$log" >>"$summary" 2>/dev/null ;;
  scaling)
    need_cifar10 || exit 1
    step "scaling cpu1 vs gpu1" 600 train scaling-gpu-resnet50-cifar10 --units cpu1,gpu1,gpuN --arch resnet50 \
      --batch-size 256 --data cifar10 --data-dir "$DATA_DIR" --window 10 --warmup-windows 2 --windows 4
    table ;;
esac
say "gpu.sh $part: done in $((SECONDS - T0)) s"
