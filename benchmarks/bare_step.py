"""The bare ResNet training step on one GPU, without distres's loop: what the model, autocast,
channels_last, fused SGD, DDP and torch.compile give by themselves. The same configuration
through distres (benchmarks/scaling.py --units gpu1) then shows the loop's own overhead.

    python benchmarks/bare_step.py --out "$OUT"                      # the default matrix (~5 min)
    python benchmarks/bare_step.py --configs eager:cl:256,default:cl:256 --profile default:cl:256

A config is MODE:LAYOUT:BATCH[:KNOBS]; MODE eager | default | reduce-overhead |
max-autotune-no-cudagraphs | max-autotune; LAYOUT cl (channels_last) | nchw; KNOBS a '+'-joined
list: c1x1 (inductor conv_1x1_as_mm), cdt (coordinate_descent_tuning), bfin (bf16 input
instead of float32), ddp (DDP over an nccl group of one, gradient_as_bucket_view, zero_grad in
place as distres does), none (with ddp: zero_grad(set_to_none=True) instead), nobb (with ddp:
broadcast_buffers=False). Each config runs in its own process (a crash or a hang costs one row).
Timing: CUDA events around N steps after warm-up (compilation and cuDNN autotuning excluded),
median of R repeats; "host ms/step" is how long Python needs to enqueue a step when the GPU
is idle (if it approaches the GPU step time the run is host-bound: CUDA graphs help).
``--device cpu`` (tiny sizes: ``--arch resnet18 --image-size 32``) only checks the script end to
end on a machine without a GPU (benchmarks/gpu.sh's dry run); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

DEFAULT = (
    "eager:nchw:256,eager:cl:256,eager:cl:384,default:cl:256,reduce-overhead:cl:256,"
    "eager:cl:256:ddp,eager:cl:256:ddp+none,eager:cl:256:ddp+nobb"
)


def child(
    cfg: str, steps: int, repeats: int, warmup: int, arch: str, profile_dir: str | None, device: str, size: int
) -> dict:
    import torch
    import torch.nn as nn
    import torchvision

    mode, layout, batch, *rest = cfg.split(":")
    knobs = set(rest[0].split("+")) if rest else set()
    batch = int(batch)
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    if "c1x1" in knobs or "cdt" in knobs:
        import torch._inductor.config as ic

        ic.conv_1x1_as_mm = "c1x1" in knobs
        ic.coordinate_descent_tuning = "cdt" in knobs
    fmt = torch.channels_last if layout == "cl" else torch.contiguous_format
    cuda = device == "cuda"
    dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model = getattr(torchvision.models, arch)(num_classes=1000, zero_init_residual=True)
    model = model.to(dev, memory_format=fmt)
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    opt = torch.optim.SGD(
        [{"params": decay, "weight_decay": 5e-5}, {"params": no_decay, "weight_decay": 0.0}],
        lr=0.1,
        momentum=0.9,
        fused=cuda,
    )
    crit = nn.CrossEntropyLoss(label_smoothing=0.1)
    set_to_none = True
    if "ddp" in knobs:
        import torch.distributed as td

        td.init_process_group(
            "nccl" if cuda else "gloo", store=td.HashStore(), rank=0, world_size=1, device_id=dev if cuda else None
        )
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[0] if cuda else None, gradient_as_bucket_view=True, broadcast_buffers="nobb" not in knobs
        )
        set_to_none = "none" in knobs
    fwd = model if mode == "eager" else torch.compile(model, mode=None if mode == "default" else mode)
    cudagraphs = mode in ("reduce-overhead", "max-autotune")
    g = torch.Generator(device=dev).manual_seed(0)
    xs = [torch.randn(batch, 3, size, size, device=dev, generator=g).contiguous(memory_format=fmt) for _ in range(2)]
    if "bfin" in knobs:
        xs = [x.to(torch.bfloat16) for x in xs]
    ys = [torch.randint(0, 1000, (batch,), device=dev, generator=g) for _ in range(2)]

    def step(i: int) -> torch.Tensor:
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):  # (CPU: a check, fp32)
            loss = crit(fwd(xs[i % 2]), ys[i % 2])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=set_to_none)
        return loss.detach()

    sync()
    t0 = time.perf_counter()
    first = step(0)
    sync()
    first_s = time.perf_counter() - t0
    for i in range(warmup):
        step(i)
    sync()
    # host enqueue time of one step with an idle GPU queue
    host = []
    for i in range(3):
        sync()
        t0 = time.perf_counter()
        step(i)
        host.append(time.perf_counter() - t0)
    sync()
    rates, wall = [], []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        for i in range(steps):
            loss = step(i)
        if cuda:
            end.record()
            end.synchronize()
        wall.append(time.perf_counter() - t0)
        rates.append(batch * steps / (start.elapsed_time(end) / 1e3 if cuda else wall[-1]))
    assert torch.isfinite(loss).item(), "non-finite loss"
    res = {
        "config": cfg,
        "arch": arch,
        "img_s": round(statistics.median(rates), 1),
        "img_s_repeats": [round(x, 1) for x in rates],
        "img_s_wall": round(batch * steps / statistics.median(wall), 1),
        "gpu_ms_per_step": round(1e3 * batch / statistics.median(rates), 2),
        "host_ms_per_step_idle_gpu": round(1e3 * min(host), 2),
        "first_step_s": round(first_s, 1),
        "first_loss": float(first),
        "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 1) if cuda else 0.0,
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu (a check of the script, not a figure)",
    }
    if profile_dir:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(3):
                step(i)
            sync()
        avg = prof.key_averages()
        key = "self_device_time_total"
        try:
            table = avg.table(sort_by=key, row_limit=30)
        except Exception:  # noqa: BLE001  (older name)
            key = "self_cuda_time_total"
            table = avg.table(sort_by=key, row_limit=30)
        Path(profile_dir).mkdir(parents=True, exist_ok=True)
        name = cfg.replace(":", "_").replace("+", "-")
        (Path(profile_dir) / f"profile-{name}.txt").write_text(table)
        # kernel-time share by family: conv / gemm / batchnorm / elementwise / other
        fam: dict[str, float] = {}
        total = 0.0
        for e in avg:
            t = getattr(e, key, 0.0) or 0.0
            if getattr(e, "device_type", None) is not None and str(e.device_type).endswith("CPU"):
                continue
            n = e.key.lower()
            if "tonhwc" in n or "tonchw" in n:
                k = "layout transpose"
            elif any(s in n for s in ("bn_fw", "bn_bw", "batch_norm", "batchnorm")):
                k = "batchnorm"
            elif any(s in n for s in ("implicit", "conv", "fprop", "dgrad", "wgrad")):
                k = "conv"
            elif "gemm" in n or "cublas" in n:
                k = "gemm"
            elif n.startswith("triton"):
                k = "triton (fused)"
            elif "memcpy" in n or "memset" in n:
                k = "memcpy/memset"
            elif any(s in n for s in ("elementwise", "vectorized", "reduce")):
                k = "elementwise/reduce"
            else:
                k = "other"
            fam[k] = fam.get(k, 0.0) + t
            total += t
        res["kernel_share"] = (
            {k: round(v / total, 3) for k, v in sorted(fam.items(), key=lambda kv: -kv[1])} if total else {}
        )
        print(table, file=sys.stderr)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=DEFAULT)
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--timeout", type=int, default=300, help="seconds per config")
    p.add_argument("--budget", type=int, default=540, help="seconds for all configs (a device command gets 600)")
    p.add_argument("--min-left", type=int, default=60, help="seconds of --budget a config needs to start")
    p.add_argument("--profile", default="", help="comma-separated configs to profile (kernel table)")
    p.add_argument("--out", default=os.environ.get("OUT", "/tmp/bare-step"))
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: a check of the script only")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        prof = a.out if a.child in a.profile.split(",") else None
        res = child(a.child, a.steps, a.repeats, a.warmup, a.arch, prof, a.device, a.image_size)
        print("RESULT " + json.dumps(res), flush=True)
        return
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    t_all = time.perf_counter()
    for cfg in [c for c in a.configs.split(",") if c]:
        left = a.budget - (time.perf_counter() - t_all)
        if left < a.min_left:
            rows.append({"config": cfg, "error": f"skipped: {left:.0f} s left of --budget {a.budget}"})
            (out / "bare_step.json").write_text(json.dumps(rows, indent=1) + "\n")
            continue
        cmd = [
            sys.executable,
            __file__,
            "--child",
            cfg,
            "--arch",
            a.arch,
            "--steps",
            str(a.steps),
            "--repeats",
            str(a.repeats),
            "--warmup",
            str(a.warmup),
            "--profile",
            a.profile,
            "--out",
            str(out),
            "--device",
            a.device,
            "--image-size",
            str(a.image_size),
        ]
        t0 = time.perf_counter()
        print(f"bench: {cfg} ...", file=sys.stderr, flush=True)
        # Its own session, so that a timeout also ends inductor's compile workers.
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            stdout, stderr = proc.communicate(timeout=min(a.timeout, left - 10))
            line = next((x for x in stdout.splitlines() if x.startswith("RESULT ")), None)
            row = json.loads(line[7:]) if line else {"config": cfg, "error": stderr[-1500:]}
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            row = {"config": cfg, "error": f"timeout after {min(a.timeout, left - 10):.0f} s"}
        row["process_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "bare_step.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(f"\n{'config':40s} {'img/s':>8s} {'gpu ms':>8s} {'host ms':>8s} {'1st s':>6s} {'mem GB':>6s} {'proc s':>6s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:40s} ERROR {r['error'][-200:]!r}")
        else:
            print(
                f"{r['config']:40s} {r['img_s']:8.0f} {r['gpu_ms_per_step']:8.1f} {r['host_ms_per_step_idle_gpu']:8.1f} "
                f"{r['first_step_s']:6.1f} {r['peak_mem_gb']:6.1f} {r['process_s']:6.0f}"
            )


if __name__ == "__main__":
    main()
