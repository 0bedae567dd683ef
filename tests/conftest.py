"""Fixtures shared by the tests (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path

import pytest

from tests.helpers import CIFAR10_TARBALL


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
