"""What a GPU machine offers, in under half a minute: versions, nvidia-smi, /dev/shm, how long
resolving the host name takes, a CUDA JPEG decode, an nccl and a gloo process group of one, NVML.

    python benchmarks/gpu_probe.py > probe.jsonl        # one JSON line per check, as each ends

Each check runs on its own and prints its line as soon as it ends (a check that hangs leaves the
ones before it on record); a failed or impossible check says why and the rest go on.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time


def versions() -> dict:
    out = {"python": sys.version.split()[0], "code": os.environ.get("DISTRES_CODE_VERSION", "unknown")}
    for name in ("torch", "torchvision", "numpy", "PIL", "yaml", "pynvml", "tensorboard", "pytest", "pytest_timeout"):
        try:
            out[name] = getattr(importlib.import_module(name), "__version__", "present")
        except Exception as e:  # noqa: BLE001  (absent or broken: either is the answer)
            out[name] = f"missing ({type(e).__name__})"
    import torch

    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    out["gpus"] = torch.cuda.device_count()
    out["cpus"] = os.cpu_count()
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "CUDA_VISIBLE_DEVICES"):
        out[var] = os.environ.get(var)
    return out


def nvidia_smi() -> dict:
    query = "name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    p = subprocess.run(
        ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True, timeout=15
    )
    return {"query": query, "rows": p.stdout.strip().splitlines(), "rc": p.returncode}


def shm() -> dict:
    usage = shutil.disk_usage("/dev/shm")
    return {"total_gb": round(usage.total / 2**30, 2), "free_gb": round(usage.free / 2**30, 2)}


def resolve() -> dict:
    name = socket.gethostname()
    t = time.perf_counter()
    addr = socket.gethostbyname(name)
    return {"hostname": name, "address": addr, "seconds": round(time.perf_counter() - t, 4)}


def _cuda():
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("skipped: no CUDA device")
    return torch


def decode_jpeg() -> dict:
    torch = _cuda()
    from torchvision.io import decode_jpeg as decode
    from torchvision.io import encode_jpeg

    data = encode_jpeg(torch.randint(0, 256, (3, 224, 224), dtype=torch.uint8))
    img = decode(data, device="cuda")
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        img = decode(data, device="cuda")
    torch.cuda.synchronize()
    return {"shape": list(img.shape), "ms_per_image": round(1e3 * (time.perf_counter() - t) / 20, 3)}


def group(backend: str) -> dict:
    import torch
    import torch.distributed as td

    if backend == "nccl":
        _cuda()
    device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
    t = time.perf_counter()
    td.init_process_group(backend, store=td.HashStore(), rank=0, world_size=1)
    try:
        x = torch.ones(4, device=device)
        td.all_reduce(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return {"sum": x.sum().item(), "seconds": round(time.perf_counter() - t, 3)}
    finally:
        td.destroy_process_group()


def nvml() -> dict:
    _cuda()
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(0)
    return {
        "name": pynvml.nvmlDeviceGetName(h),
        "util": pynvml.nvmlDeviceGetUtilizationRates(h).gpu,
        "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
        "sm_clock_max_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
    }


CHECKS = {
    "versions": versions,
    "nvidia-smi": nvidia_smi,
    "shm": shm,
    "resolve": resolve,
    "decode_jpeg": decode_jpeg,
    "nccl": lambda: group("nccl"),
    "gloo": lambda: group("gloo"),
    "nvml": nvml,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checks", default=",".join(CHECKS), help="comma-separated, of " + ", ".join(CHECKS))
    a = p.parse_args()
    failed = 0
    for name in a.checks.split(","):
        t = time.perf_counter()
        try:
            row = {"check": name, "ok": True, **CHECKS[name]()}
        except Exception as e:  # noqa: BLE001  (every check is reported, whatever it raised)
            msg = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
            row = {"check": name, "ok": False, "error": f"{type(e).__name__}: {msg}"}
            failed += not msg.startswith("skipped")
        row["check_s"] = round(time.perf_counter() - t, 3)
        print(json.dumps(row), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
