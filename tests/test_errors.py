"""Every user mistake: one line 'distres: error: ...' naming the fix, exit status != 0,
no traceback, nothing already done lost."""

import subprocess
import sys


from tests.helpers import REPO, TINY, make_imagefolder, run_train
from distres.train import main


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("distres: error: ")
    return lines[0]


def _cases(tmp_path):
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "val").mkdir()
    no_images = tmp_path / "noimg"
    for split in ("train", "val"):
        (no_images / split / "cat").mkdir(parents=True)
        (no_images / split / "cat" / "notes.txt").write_text("not an image")
    small = make_imagefolder(tmp_path / "small", {"train": {"a": 2, "b": 1}, "val": {"a": 1, "b": 1}})
    (tmp_path / "bad.yaml").write_text("learning_rate: 0.1\n")
    return {
        "unknown arch": (["--arch", "resnet51"], "invalid choice: 'resnet51'"),
        "missing data dir": (["--data", "imagefolder", "--data-dir", str(tmp_path / "nope")], "does not exist"),
        "imagefolder without dir": (["--data", "imagefolder"], "needs --data-dir"),
        "empty data dir": (["--data", "imagefolder", "--data-dir", str(empty)], "no class sub-folders"),
        "no image files": (["--data", "imagefolder", "--data-dir", str(no_images)], "no image files"),
        "batch size 0": (["--batch-size", "0"], "--batch-size must be > 0"),
        "negative batch size": (["--batch-size", "-4"], "--batch-size must be > 0"),
        "unknown config key": (["--config", str(tmp_path / "bad.yaml")], "unknown key 'learning_rate'"),
        "unreadable config": (["--config", str(tmp_path / "missing.yaml")], "cannot read --config"),
        "cifar10 offline without data": (["--data", "cifar10", "--data-dir", str(tmp_path / "c10")], "--data-dir"),
        "more processes than samples": (["--data", "imagefolder", "--data-dir", str(small), "--batch-size", "4",
                                         "--image-size", "32"], "cannot fill one batch"),
        "unknown flag": (["--learning-rate", "0.1"], "unrecognized arguments"),
    }


def test_every_user_error_is_one_line(tmp_path, capsys):
    for name, (args, needle) in _cases(tmp_path).items():
        code = main(args + ["--device", "cpu", "--output-dir", str(tmp_path / "out"), "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2, name
        line = _one_error_line(err)
        assert needle in line, (name, line)


def test_error_from_the_command_line_and_under_torchrun(tmp_path):
    r = subprocess.run([sys.executable, "-m", "distres.train", "--batch-size", "0"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    _one_error_line(r.stderr)
    small = make_imagefolder(tmp_path / "small", {"train": {"a": 3}, "val": {"a": 1}})
    r = run_train(["--data", "imagefolder", "--data-dir", str(small), "--batch-size", "2",
                   "--image-size", "32", "--device", "cpu"], nproc=2)
    assert r.returncode != 0
    assert r.stderr.count("distres: error: 3 training samples cannot fill one batch of 2 on each of 2") == 1


def test_existing_checkpoints_are_never_overwritten(tmp_path):
    out = tmp_path / "run"
    args = TINY + ["--batch-size", "8", "--synthetic-samples", "32", "--max-steps", "2", "--output-dir", str(out)]
    assert run_train(args).returncode == 0
    before = (out / "checkpoints" / "last.pt").read_bytes()
    r = run_train(args)
    assert r.returncode == 2
    assert "already holds checkpoints; pass --resume" in _one_error_line(r.stderr)
    assert (out / "checkpoints" / "last.pt").read_bytes() == before


def test_sync_bn_on_cpu_processes_is_refused(tmp_path):
    r = run_train(TINY + ["--sync-bn", "--batch-size", "4", "--synthetic-samples", "16",
                          "--output-dir", str(tmp_path / "o")], nproc=2)
    assert r.returncode != 0
    assert "distres: error: --sync-bn needs CUDA GPUs" in r.stderr
