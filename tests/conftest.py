"""Fixtures shared by the tests (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.helpers import CIFAR10_TARBALL

DISK_NEEDED_GB = 2  # the most the suite holds at once (its largest test's checkpoints), with room


def pytest_sessionstart(session):
    """Say first when the temporary folder's disk is nearly full: otherwise the tests that train
    fail one by one, each with its run's 'No space left on device'."""
    tmp = Path(tempfile.gettempdir())
    free = shutil.disk_usage(tmp).free / 2**30
    if free < DISK_NEEDED_GB:
        session.config.pluginmanager.get_plugin("terminalreporter").write_line(
            f"warning: {free:.1f} GB free in {tmp}; the tests that train need about {DISK_NEEDED_GB} GB there "
            "(free some, or point TMPDIR elsewhere)",
            yellow=True,
        )


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory, request) -> Path:
    """A folder for the runs a test module shares, removed once its tests are done: a run's
    checkpoints take tens of MB, and a whole suite kept on disk would fill a small one. (The
    tests' own tmp_path folders go when they pass: tmp_path_retention_policy in pyproject.toml.)"""
    root = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield root
    shutil.rmtree(root, ignore_errors=True)


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
