"""The catalogue of bad inputs: every mistake a user can make with data, paths, config values,
checkpoints, the launcher's environment or resources ends in one line 'distres: error: ...'
naming the problem and the fix, exit status 2, no traceback, and nothing already saved lost.
(The README's table lists the same cases; the recoveries that need no error, such as skipping
an undecodable image or a torn newest checkpoint, are tested where they happen:
test_bad_data.py, test_checkpoint.py.)

Most cases run the CLI's ``main`` in this process (the same code path as the command line, a
fraction of the start-up cost); those that need a launcher, a second process or a resource
limit run the real command."""

import resource
from pathlib import Path

import numpy as np
import pytest
import torch

from distres import evaluate, export, predict, prepare, train
from distres.data import known
from tests.helpers import (
    TINY,
    make_imagefolder,
    one_error_line,
    run_train,
    start_one,
    train_here,
    train_ranks,
)

RUN = ["--device", "cpu", "--no-progress", "--wandb", "disabled"]


@pytest.fixture(scope="module")
def made(module_dir):
    """Folders, files and one real 2-step run that the cases point at."""
    root = module_dir
    p = {"root": root}
    (root / "empty" / "train").mkdir(parents=True)
    (root / "empty" / "val").mkdir()
    for split in ("train", "val"):
        (root / "noimg" / split / "cat").mkdir(parents=True)
        (root / "noimg" / split / "cat" / "notes.txt").write_text("not an image")
    p["small"] = make_imagefolder(root / "small", {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}})
    p["folder"] = make_imagefolder(root / "folder", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    p["emptyclass"] = make_imagefolder(root / "emptyclass", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    (p["emptyclass"] / "train" / "c").mkdir()
    p["newclass"] = make_imagefolder(root / "newclass", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "z": 2}})
    (root / "unknown-key.yaml").write_text("learning_rate: 0.1\n")
    (root / "broken.yaml").write_text("lr: [0.1\n")
    (root / "list.yaml").write_text("- lr\n- 0.1\n")
    (root / "badtype.yaml").write_text("epochs: ten\n")
    (root / "a-file").write_text("not a folder")
    (root / "garbage.pt").write_bytes(b"not a checkpoint")
    torch.save({"weight": torch.zeros(2)}, root / "plain.pt")
    (root / "noimages").mkdir()
    (root / "mnist").mkdir()
    for train_split, n in ((True, 8), (False, 4)):  # a tiny MNIST: the idx files hold decoded arrays
        images, labels = known.MNIST_FILES[train_split]
        known.write_idx(root / "mnist" / images, np.zeros((n, 28, 28), dtype=np.uint8))
        known.write_idx(root / "mnist" / labels, np.arange(n, dtype=np.uint8) % 2)
    run = root / "run"
    r = train_here(  # bf16, the default, as TINY is not
        TINY
        + [
            "--amp",
            "bf16",
            "--batch-size",
            "4",
            "--synthetic-samples",
            "16",
            "--max-steps",
            "2",
            "--output-dir",
            str(run),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    p["run"], p["ckpt"] = run, run / "checkpoints" / "last.pt"
    p["ckpt_bytes"] = p["ckpt"].read_bytes()
    return p


def _train(*args):
    return lambda p: (train.main, [*RUN, *args, "--output-dir", str(p["root"] / "out")])


def _resume(*args):
    """Resume the 2-step run with other settings; its checkpoint must stay as it was."""
    return lambda p: (
        train.main,
        [
            *TINY,
            "--batch-size",
            "4",
            "--synthetic-samples",
            "16",
            "--max-steps",
            "4",
            "--output-dir",
            str(p["run"]),
            "--amp",
            "bf16",
            "--resume",
            *args,
        ],
    )


# name -> (what to run, a phrase the one line must hold)
CASES = {
    # config values and types
    "unknown arch": (_train("--arch", "resnet51"), "invalid choice: 'resnet51'"),
    "unknown flag": (_train("--learning-rate", "0.1"), "unrecognized arguments"),
    "batch size 0": (_train("--batch-size", "0"), "--batch-size must be > 0"),
    "negative batch size": (_train("--batch-size", "-4"), "--batch-size must be > 0"),
    "not a number": (_train("--lr", "fast"), "invalid float value: 'fast'"),
    "epochs 0 without max steps": (_train("--epochs", "0"), "trains nothing"),
    "ema decay out of range": (_train("--ema-decay", "1.5"), "--ema-decay must be in [0, 1)"),
    "bad lr steps": (_train("--lr-steps", "thirty"), "--lr-steps must be comma-separated epochs"),
    "bad profile window": (_train("--profile-steps", "9:3"), "need 1 <= A <= B"),
    "rollback factor 0": (_train("--rollback-lr-factor", "0"), "--rollback-lr-factor must be in (0, 1]"),
    "dist timeout 0": (_train("--dist-timeout", "0"), "--dist-timeout must be a positive number of minutes"),
    "dist timeout inf": (_train("--dist-timeout", "inf"), "--dist-timeout must be a positive number of minutes"),
    "repeated aug 0": (_train("--repeated-aug", "0"), "--repeated-aug must be > 0"),
    "unknown config key": (
        lambda p: _train("--config", str(p["root"] / "unknown-key.yaml"))(p),
        "unknown key 'learning_rate'",
    ),
    "missing config file": (lambda p: _train("--config", str(p["root"] / "missing.yaml"))(p), "cannot read --config"),
    "config not YAML": (lambda p: _train("--config", str(p["root"] / "broken.yaml"))(p), "is not valid YAML (line 2)"),
    "config not a mapping": (lambda p: _train("--config", str(p["root"] / "list.yaml"))(p), "must be a mapping"),
    "config value of the wrong type": (lambda p: _train("--config", str(p["root"] / "badtype.yaml"))(p), "epochs"),
    # data layout and content
    "missing data dir": (
        lambda p: _train("--data", "imagefolder", "--data-dir", str(p["root"] / "nope"))(p),
        "does not exist",
    ),
    "imagefolder without data dir": (_train("--data", "imagefolder"), "needs --data-dir"),
    "data dir is a file": (
        lambda p: _train("--data", "imagefolder", "--data-dir", str(p["root"] / "a-file"))(p),
        "a-file",
    ),
    "no class folders": (
        lambda p: _train("--data", "imagefolder", "--data-dir", str(p["root"] / "empty"))(p),
        "no class sub-folders",
    ),
    "no image files": (
        lambda p: _train("--data", "imagefolder", "--data-dir", str(p["root"] / "noimg"))(p),
        "no image files",
    ),
    "empty class folder": (
        lambda p: _train("--data", "imagefolder", "--data-dir", str(p["emptyclass"]), "--image-size", "32")(p),
        "hold no image files",
    ),
    "validation class unknown to training": (
        lambda p: _train("--data", "imagefolder", "--data-dir", str(p["newclass"]), "--image-size", "32")(p),
        "z",
    ),
    "too few samples for a batch": (
        lambda p: _train(
            "--data", "imagefolder", "--data-dir", str(p["small"]), "--batch-size", "4", "--image-size", "32"
        )(p),
        "cannot fill one batch",
    ),
    "grad accum beyond the epoch": (
        lambda p: _train(
            "--data",
            "imagefolder",
            "--data-dir",
            str(p["folder"]),
            "--batch-size",
            "4",
            "--grad-accum",
            "8",
            "--image-size",
            "32",
        )(p),
        "--grad-accum 8 needs more batches",
    ),
    "cifar10 offline without files": (
        lambda p: _train("--data", "cifar10", "--data-dir", str(p["root"] / "c10"))(p),
        "--data-dir",
    ),
    "synthetic backend with real data": (
        _train("--data", "cifar10", "--data-backend", "synthetic"),
        "--data-backend synthetic goes with --data synthetic",
    ),
    "gpu backend for large images": (
        lambda p: _train(
            "--data", "imagefolder", "--data-dir", str(p["folder"]), "--data-backend", "gpu", "--image-size", "96"
        )(p),
        "--data-backend gpu is for small images",
    ),
    "decoding on the device in another backend": (
        lambda p: _train(
            "--data",
            "imagefolder",
            "--data-dir",
            str(p["folder"]),
            "--data-backend",
            "gpu",
            "--decode-on",
            "device",
            "--image-size",
            "32",
        )(p),
        "--decode-on device is an option of",
    ),
    "decoding on the device without files": (
        lambda p: _train(
            "--data", "mnist", "--data-dir", str(p["root"] / "mnist"), "--decode-on", "device", "--batch-size", "2"
        )(p),
        "comes as arrays already decoded",
    ),
    # paths, checkpoints and weights
    "output dir is a file": (
        lambda p: (train.main, [*TINY, "--max-steps", "1", *RUN, "--output-dir", str(p["root"] / "a-file")]),
        "a-file",
    ),
    "resume a missing file": (lambda p: _train("--resume", str(p["root"] / "none.pt"))(p), "does not exist"),
    "resume a corrupt file": (lambda p: _train("--resume", str(p["root"] / "garbage.pt"))(p), "unreadable or corrupt"),
    "resume a plain state dict": (
        lambda p: _train("--resume", str(p["root"] / "plain.pt"))(p),
        "is not a distres checkpoint",
    ),
    "resume best.pt": (
        lambda p: _train("--resume", str(p["run"] / "checkpoints" / "best.pt"))(p),
        "holds the best weights only",
    ),
    "resume with another arch": (_resume("--arch", "resnet50"), "does not fit this run"),
    "resume with another amp": (_resume("--amp", "fp16"), "trained with --amp bf16"),
    "output dir holds another run": (
        lambda p: (train.main, [*TINY, "--max-steps", "1", *RUN, "--output-dir", str(p["run"])]),
        "already holds checkpoints",
    ),
    "weights file missing": (lambda p: _train("--weights", str(p["root"] / "none.pt"))(p), "none.pt"),
    # the launcher's environment
    "cuda without a GPU": (_train("--device", "cuda"), "no CUDA GPU is visible"),
    "nccl on CPUs": (_train("--dist-backend", "nccl"), "--dist-backend nccl needs CUDA GPUs"),
    # the other CLIs
    "evaluate a missing checkpoint": (
        lambda p: (evaluate.main, ["--checkpoint", str(p["root"] / "none.pt")]),
        "does not exist",
    ),
    "predict a folder without images": (
        lambda p: (predict.main, ["--checkpoint", str(p["ckpt"]), str(p["root"] / "noimages")]),
        "no image",
    ),
    "export over a .json path": (
        lambda p: (
            export.main,
            [
                "--checkpoint",
                str(p["ckpt"]),
                "--format",
                "safetensors",
                "--check-images",
                str(p["folder"] / "val"),
                "--output",
                str(p["root"] / "m.json"),
            ],
        ),
        ".json",
    ),
    "prepare a missing folder": (
        lambda p: (prepare.main, ["resize", str(p["root"] / "nope"), str(p["root"] / "o"), "--size", "32"]),
        "nope",
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_one_line(name, made, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    make, needle = CASES[name]
    fn, argv = make(made)
    capsys.readouterr()
    code = fn(argv)
    err = capsys.readouterr().err
    assert code == 2, (name, err[-2000:])
    line = one_error_line(err)
    assert needle in line, (name, line)
    assert made["ckpt"].read_bytes() == made["ckpt_bytes"]  # the earlier run's checkpoint is intact


def test_a_multi_process_launch_without_a_rendezvous_address(made, capsys, monkeypatch):
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train.main([*TINY, *RUN, "--output-dir", str(made["root"] / "env")]) == 2
    assert "needs MASTER_ADDR and MASTER_PORT" in one_error_line(capsys.readouterr().err)


@pytest.mark.slow
def test_from_the_command_line_and_under_torchrun(tmp_path):
    # a process of its own (forked: python -m distres.train starts the same main under torchrun below)
    r = start_one(train.main, ["--batch-size", "0"]).wait(timeout=120)
    assert r.returncode == 2
    one_error_line(r.stderr)
    small = make_imagefolder(tmp_path / "small", {"train": {"a": 3}, "val": {"a": 1}})
    r = run_train(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(small),
            "--batch-size",
            "2",
            "--image-size",
            "32",
            "--device",
            "cpu",
        ],
        nproc=2,
    )
    assert r.returncode != 0
    assert r.stderr.count("distres: error: 3 training samples cannot fill one batch of 2 on each of 2") == 1
    r = train_ranks(  # (forked ranks: torchrun is the run above's)
        TINY + ["--sync-bn", "--batch-size", "4", "--synthetic-samples", "16", "--output-dir", str(tmp_path / "o")]
    )
    assert r.returncode != 0
    assert "distres: error: --sync-bn needs CUDA GPUs" in r.stderr


def test_a_full_disk_during_a_checkpoint_write(tmp_path):
    """A file-size limit (as a full disk: the write fails with an OSError) under the first
    checkpoint: one line, nothing half-written left behind."""
    out = tmp_path / "run"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MiB: less than a checkpoint

    args = [*TINY, "--batch-size", "4", "--synthetic-samples", "16", "--max-steps", "2", "--threads", "1"]
    r = start_one(train.main, args + ["--output-dir", str(out)], setup=limit).wait(timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    assert "cannot write a checkpoint to" in line and "File too large" in line and "free space" in line, line
    assert not [p.name for p in Path(out / "checkpoints").iterdir() if ".tmp" in p.name]
