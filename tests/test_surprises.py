"""Small surprises a new user met, each pinned down: a damaged CIFAR-10 download, DDP's
gradient-strides warning with channels_last, "..." after a complete class list, a failed
offline MNIST download, W&B online without a key, an error glued to the progress bar, the
profiler's kineto lines and the evaluation report's path.

Most run the CLI's ``main`` in this process; the one that needs a second rank runs two forked
ranks sharing one console, and the one that needs a fresh process (kineto reads its log level
once per process) runs the real command."""

from __future__ import annotations

import pickle
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest

from distres import evaluate, prepare, tracking, train
from distres.data import known
from distres.data.sharding import ShardSampler
from distres.errors import UserError
from tests.helpers import TINY, break_jpeg, make_imagefolder, one_error_line, run_ranks, run_train

RUN = ["--device", "cpu", "--no-progress", "--wandb", "disabled"]


# --- 1. a damaged cifar-10-batches-py ----------------------------------------------------------


def _cifar10_pickles(root: Path, per_file: int = 3) -> Path:
    """torchvision's cifar-10-batches-py/ layout, a few images per file: pickled dicts with
    'data' (N x 3072 uint8, channel planes) and 'labels'; batches.meta with the label names."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        d = {"batch_label": name, "data": rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)}
        d["labels"] = [int(y) for y in rng.integers(0, 10, per_file)]
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))
    return root


def test_a_damaged_cifar10_download_is_one_line_in_training_and_prepare(tmp_path, capsys):
    root = _cifar10_pickles(tmp_path / "ok")
    train_split, test_split = known.splits("cifar10", root, download=False)
    assert (len(train_split), len(test_split)) == (15, 3)

    damaged = _cifar10_pickles(tmp_path / "damaged")
    folder = damaged / "cifar-10-batches-py"
    batch = folder / "data_batch_1"
    batch.write_bytes(batch.read_bytes()[:5000])  # a download cut short
    (folder / "test_batch").unlink()
    code = train.main([*TINY, "--data", "cifar10", "--data-dir", str(damaged), "--output-dir", str(tmp_path / "run")])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    for words in (str(folder), "data_batch_1 unreadable", "test_batch missing", "delete it"):
        assert words in line, line
    assert "data_batch_2" not in line, line

    dst = tmp_path / "pngs"
    assert prepare.main(["cifar10", str(damaged), str(dst), "--workers", "1"]) == 2
    line = one_error_line(capsys.readouterr().err)
    for words in (str(folder), "data_batch_1 unreadable", "test_batch missing", "download CIFAR-10 again"):
        assert words in line, line
    assert not dst.exists()  # nothing half-converted


# --- 2. DDP's "Grad strides do not match bucket view strides" ----------------------------------


def test_channels_last_gradients_match_ddps_buckets(tmp_path, capsys):
    """A process group of one (gloo) goes through DDP as 2 ranks do; at 32 px with the ImageNet
    stem, layer4's maps are 1x1 and its 1x1 convolutions run as matrix products on the CPU.
    (torch warns once per process: this test means something in a process that has not warned.)"""
    args = [*TINY, "--batch-size", "4", "--synthetic-samples", "8", "--max-steps", "1", "--dist-backend", "gloo"]
    args += ["--channels-last", "--cifar-stem", "off", "--checkpoint-every", "0", "--output-dir", str(tmp_path / "r")]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = train.main(args)
    assert code == 0, capsys.readouterr().err[-3000:]
    assert not [w for w in caught if "Grad strides do not match" in str(w.message)]


# --- 3 and 8: evaluate's errors and report -----------------------------------------------------


@pytest.fixture(scope="module")
def three_classes(module_dir):
    """A 1-step run's checkpoint of a 3-class model (synthetic data)."""
    out = module_dir / "run"
    args = [*TINY, "--synthetic-classes", "3", "--synthetic-samples", "8", "--batch-size", "4", "--max-steps", "1"]
    assert train.main([*args, "--output-dir", str(out)]) == 0
    return out / "checkpoints" / "last.pt"


def test_a_class_mismatch_shows_dots_only_when_classes_were_left_out(three_classes, tmp_path, capsys):
    code = evaluate.main(["--checkpoint", str(three_classes), "--data", "cifar10", "--data-dir", str(tmp_path)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2
    assert "the model's classes (0, 1, 2) are not cifar10's" in line, line
    with pytest.raises(UserError) as e:
        known.splits("cifar10", tmp_path, download=False, classes=[str(k) for k in range(7)])
    assert "(0, 1, 2, 3, 4, ...)" in str(e.value)


def test_the_report_path_is_absolute_however_it_was_named(three_classes, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert evaluate.main(["--checkpoint", str(three_classes), "--device", "cpu", "--output-dir", "named"]) == 0
    report = [ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("report: ")]
    assert report == [
        f"  report: {tmp_path / 'named'}/ (summary.json, per_class.csv, confusion.csv, confusion.png, "
        "misclassified.csv)"
    ], report
    assert (tmp_path / "named" / "summary.json").is_file()


# --- 4. a failed offline MNIST download --------------------------------------------------------


def test_a_failed_mnist_download_names_the_missing_files_and_leaves_no_folder(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    # Offline, whatever the machine: every mirror refuses the connection at once.
    monkeypatch.setattr(tvd.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    root = tmp_path / "mnist"
    root.mkdir()
    for name in known.MNIST_FILES[True]:  # the training pair is there, the t10k pair is not
        known.write_idx(root / name, np.zeros((2, 28, 28) if "images" in name else (2,), dtype=np.uint8))
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(UserError) as e:
        known.splits("mnist", root, download=True)
    text = str(e.value)
    assert "t10k-images-idx3-ubyte" in text and "t10k-labels-idx1-ubyte" in text, text
    assert "train-images" not in text and "train-labels" not in text, text
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # no MNIST/raw/ left

    fresh = tmp_path / "new" / "mnist"  # a folder that did not exist: not left behind either
    with pytest.raises(UserError):
        known.splits("mnist", fresh, download=True)
    assert not (tmp_path / "new").exists()


# --- 5. --wandb online without a key -----------------------------------------------------------


def test_wandb_online_without_a_key_says_so_in_a_distres_line(tmp_path, monkeypatch, capsys):
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_BASE_URL", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):  # restored afterwards
        monkeypatch.setenv(var, str(tmp_path / "unused"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.netrc
    started = []
    fake = types.SimpleNamespace(init=lambda **kw: started.append(kw["mode"]), Settings=lambda **kw: kw)
    monkeypatch.setitem(sys.modules, "wandb", fake)  # what is printed is the point, not W&B itself
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracking.open_wandb_run("online", tmp_path / "run", {}, "run", resume=False)
    assert started == ["offline"] and not caught, caught
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distres: warning: W&B: no API key"), lines


# --- 6. --on-bad-sample fail's error and the progress bar --------------------------------------


def test_a_bad_sample_error_on_another_rank_starts_a_line_of_its_own(tmp_path):
    """Rank 1 meets a broken JPEG in its second batch: rank 0's progress bar is on the console
    the ranks share then (drawn when the epoch started, before the first step's all-reduce), a
    line without its newline."""
    root = make_imagefolder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}})
    paths = sorted((root / "train").rglob("*.jpg"))  # the order FolderSource lists them in
    second = list(ShardSampler(len(paths), 2, 1, 2, seed=0, shuffle=True, drop_last=True).index_batches(0))[1]
    for i in second:
        break_jpeg(paths[i], "corrupt")
    args = [*TINY, "--data", "imagefolder", "--data-dir", str(root), "--batch-size", "2", "--workers", "0"]
    args += ["--on-bad-sample", "fail", "--progress", "--checkpoint-every", "0", "--output-dir", str(tmp_path / "r")]
    r = run_ranks(train.main, args, console=True)
    assert r.returncode != 0
    assert "%|" in r.stderr, r.stderr[-3000:]  # the bar was drawn
    lines = r.stderr.splitlines()
    assert any(ln.startswith("distres: error: cannot decode ") for ln in lines), r.stderr[-3000:]
    assert not [ln for ln in lines if "%|" in ln and "distres: error" in ln], r.stderr[-3000:]


# --- 7. the profiler's kineto lines ------------------------------------------------------------


def test_the_profiler_keeps_kinetos_lines_off_the_console(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--batch-size", "4", "--synthetic-samples", "8", "--max-steps", "1", "--profile-steps", "1:1"]
    r = run_train([*args, "--checkpoint-every", "0", "--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "distres: profile of steps 1..1" in r.stderr, r.stderr[-3000:]
    assert "USDT" not in r.stderr and "profiler_start" not in r.stderr, r.stderr[-3000:]
