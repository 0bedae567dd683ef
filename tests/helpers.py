"""Helpers shared by the tests: run the real CLI (as a subprocess, or under torchrun), read
its outputs, and make small real data sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10_TARBALL = Path(
    os.environ.get("DISTRES_CIFAR10_TARBALL", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)

# Small, fast settings shared by the end-to-end tests: ResNet-18 on 32-px synthetic data.
# No W&B: an offline run costs 1-3 s of CPU per training run (tests/test_wandb.py covers it).
TINY = [
    "--arch",
    "resnet18",
    "--data",
    "synthetic",
    "--image-size",
    "32",
    "--synthetic-classes",
    "10",
    "--device",
    "cpu",
    "--no-progress",
    "--log-every",
    "1",
    "--wandb",
    "disabled",
]


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WANDB_API_KEY", None)  # tests never reach a W&B server, whatever the machine has
    return env


def _train_cmd(args: list[str], nproc: int, extra_torchrun) -> list[str]:
    if nproc == 1 and not extra_torchrun:
        return [sys.executable, "-m", "distres.train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra_torchrun,
        "-m",
        "distres.train",
        *args,
    ]


def run_train(args: list[str], nproc: int = 1, timeout: int = 300, extra_torchrun: list[str] = ()):
    """Run distres.train as a user would; returns CompletedProcess (text)."""
    return subprocess.run(
        _train_cmd(args, nproc, extra_torchrun),
        cwd=REPO,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_train(args: list[str], nproc: int = 1, extra_torchrun: list[str] = (), log: Path | None = None):
    """Start distres.train in the background (stdout+stderr to log); returns the Popen."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        _train_cmd(args, nproc, extra_torchrun),
        cwd=REPO,
        env=cli_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def one_error_line(stderr: str) -> str:
    """The one 'distres: error: ...' line of a failed command's stderr (no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("distres: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    """Poll condition() until it returns something truthy; fail the test after timeout."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


def make_imagefolder(root: Path, counts: dict[str, dict[str, int]], size: int = 32, seed: int = 0) -> Path:
    """Write a tiny ImageFolder of real JPEG files: counts[split][class] = number of images."""
    import torch
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    for split, classes in counts.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                (folder / f"{i:04d}.jpg").write_bytes(encode_jpeg(img).numpy().tobytes())
    return root


def break_jpeg(path: Path, how: str) -> Path:
    """Damage a JPEG file in place as real data sets get damaged: 'truncated' (a cut-off
    download) keeps the first 300 bytes; 'corrupt' keeps the length and a valid-looking frame
    header but points the scan at a component that does not exist, so every decoder fails."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:300]
    else:
        sos = data.index(b"\xff\xda")
        data[sos + 5] = 0x77  # the first scan component's id
    path.write_bytes(bytes(data))
    return path


def count_allreduces(ddp) -> list:
    """Give a DDP module (in a process group of one) a comm hook that counts its gradient
    all-reduces and passes the bucket through; the list grows by one per all-reduce."""
    import torch

    calls = []

    def count(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, count)
    return calls
