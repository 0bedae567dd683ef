"""Shared helpers: run the real CLI (in-process, as a subprocess, or under torchrun) and
prepare small real data sets."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10_TARBALL = Path(os.environ.get("DISTRES_CIFAR10_TARBALL", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))

# Small, fast settings shared by the end-to-end tests: ResNet-18 on 32-px synthetic data.
TINY = ["--arch", "resnet18", "--data", "synthetic", "--image-size", "32", "--synthetic-classes", "10",
        "--device", "cpu", "--no-progress", "--log-every", "1"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def run_train(args: list[str], nproc: int = 1, timeout: int = 300, extra_torchrun: list[str] = ()):
    """Run distres.train as a user would; returns CompletedProcess (text)."""
    if nproc == 1:
        cmd = [sys.executable, "-m", "distres.train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *extra_torchrun, "-m", "distres.train", *args]
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


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


@pytest.fixture(scope="session")
def cifar10_subset(tmp_path_factory) -> Path:
    """The real CIFAR-10 JPEGs: 400 train and 100 test images per class, as an ImageFolder."""
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real-data test: {CIFAR10_TARBALL} not present")
    root = tmp_path_factory.mktemp("cifar10")
    full = root / "full"
    full.mkdir()
    with tarfile.open(CIFAR10_TARBALL) as tar:
        tar.extractall(full, filter="data")
    subset = root / "subset"
    for split, per_class in (("train", 400), ("test", 100)):
        for cls_dir in sorted((full / split).iterdir()):
            dst = subset / split / cls_dir.name
            dst.mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:per_class]:
                os.link(f, dst / f.name)
    shutil.rmtree(full)
    return subset
