"""Fixtures shared by the tests (the helpers they use are in tests/helpers.py)."""

from __future__ import annotations

import gzip
import io
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

from tests.helpers import (
    CIFAR10_TARBALL,
    FOLDER_RUN,
    TINY,
    WANDB_VARS,
    close_built,
    make_imagefolder,
    process_state,
    train_ranks,
)

DISK_NEEDED_GB = 2  # the most the suite holds at once (its largest test's checkpoints), with room

# The slow tier of tests whose files other changes own, and single cases of parametrized tests:
# marked here rather than in the file (``make test-fast`` leaves out every test marked slow;
# ``make test`` runs them all).
SLOW_ELSEWHERE = {
    "test_scaling.py::test_quick_cpu_run",
    "test_launch.py::test_local_launcher_runs_two_cpu_ranks_from_the_callers_folder",
    "test_launch.py::test_multinode_launcher_joins_two_nodes_by_rendezvous",
    # emulated on CPUs without bf16/fp16 units: tens of seconds for one step (fp32 stays fast)
    "test_models_engine.py::test_one_step_path_for_every_precision[fp16]",
    "test_models_engine.py::test_one_step_path_for_every_precision[bf16]",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid.split("/")[-1] in SLOW_ELSEWHERE:
            item.add_marker(pytest.mark.slow)


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


@pytest.fixture(autouse=True)
def _restores_process_state():
    """Every test leaves the process as it found it (threads, deterministic algorithms, RNGs,
    environment, signal handlers, process group, the data loaders it built with
    ``closed_at_the_end``): the CLIs run in this process change them, and tests must pass alone
    and in any order."""
    with process_state():
        yield
        close_built()


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
    subset = tmp_path_factory.mktemp("cifar10") / "subset"
    per_class = {"train": 400, "test": 100}
    # Decompressed in memory, and only the chosen files written: the whole set is 60,000 files.
    with tarfile.open(fileobj=io.BytesIO(gzip.decompress(CIFAR10_TARBALL.read_bytes()))) as tar:
        groups = {}  # (split, class): [(file name, member)]
        for member in tar.getmembers():
            split, cls, name = (Path(member.name).parts[-3:] + ("", "", ""))[:3]
            if member.isfile() and split in per_class:
                groups.setdefault((split, cls), []).append((name, member))
        for (split, cls), members in groups.items():
            (subset / split / cls).mkdir(parents=True)
            for name, member in sorted(members, key=lambda item: item[0])[: per_class[split]]:
                (subset / split / cls / name).write_bytes(tar.extractfile(member).read())
    return subset


@pytest.fixture(scope="session")
def folder_run(tmp_path_factory):
    """One 2-rank gloo run (``train_ranks``) on a small ImageFolder of real JPEGs, shared by the
    tests that read a finished multi-process run: test_inference (best.pt; evaluate under
    torchrun, predict and export from its checkpoints), test_sharding (the exact evaluation count
    over uneven shards) and test_profile (--profile-steps: one trace per rank, the summary).
    With EMA, the ImageNet stem (so that the stock torchvision model loads its export) and bf16 as
    training runs by default; 72 training images on 2 ranks x batch 4 are 9 steps per epoch, 2
    epochs; 21 validation images: neither rank's shard fills its last batch. Returns
    (data folder, output folder, the run's ``Ran``)."""
    root = tmp_path_factory.mktemp("folder_run")
    data = make_imagefolder(
        root / "data",
        {"train": {c: FOLDER_RUN["train_per_class"] for c in FOLDER_RUN["classes"]}, "val": FOLDER_RUN["val"]},
        size=36,
    )
    out = root / "run"
    first, last = FOLDER_RUN["profile_steps"]
    r = train_ranks(
        [
            "--arch",
            "resnet18",
            "--data",
            "imagefolder",
            "--data-dir",
            str(data),
            "--image-size",
            "32",
            "--cifar-stem",
            "off",
            "--batch-size",
            "4",
            "--epochs",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--ema-decay",
            "0.5",
            "--profile-steps",
            f"{first}:{last}",
            "--log-every",
            "1",
            "--no-progress",
            "--wandb",
            "disabled",
            "--output-dir",
            str(out),
        ],
    )
    assert r.returncode == 0, r.stderr[-3000:]
    yield data, out, r
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def synthetic_run(tmp_path_factory):
    """One 2-rank gloo run (forked ranks, ``train_ranks``) on synthetic data, logging to an
    offline W&B run, shared by test_ddp (the end-to-end run: one metrics file, every step once,
    the loss falls) and test_wandb (one offline run per job, read back with wandb's own reader).
    Batch 8 on 2 ranks over 128 samples: 8 steps per epoch, 4 epochs, an evaluation after each.
    HOME is an empty folder and no W&B variable is set: whatever W&B writes outside the output
    folder shows up there. Returns (output folder, HOME, the ranks' ``Ran``)."""
    root = tmp_path_factory.mktemp("synthetic_run")
    home, out = root / "home", root / "run"
    home.mkdir()
    r = train_ranks(
        TINY
        + [
            "--wandb",
            "offline",
            "--batch-size",
            "8",
            "--synthetic-samples",
            "128",
            "--epochs",
            "4",
            "--lr",
            "0.02",
            "--output-dir",
            str(out),
        ],
        env={"HOME": str(home), **dict.fromkeys(WANDB_VARS)},
    )
    assert r.returncode == 0, r.stderr[-3000:]
    yield out, home, r
    shutil.rmtree(root, ignore_errors=True)
