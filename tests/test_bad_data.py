"""Damaged data through the real trainer, on every backend: a truncated and a corrupt JPEG
in the training folder are skipped, named once and counted (--on-bad-sample skip, the
default) or stop the run naming the file (fail); folder mistakes get one clear line.

The trainer runs in this process (``main``), as the command line runs it, to spare a
torch import per run."""

import pytest

from distres.train import main
from tests.helpers import break_jpeg, make_imagefolder, read_metrics

ARGS = [
    "--arch",
    "resnet18",
    "--data",
    "imagefolder",
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
    "--no-progress",
    "--log-every",
    "3",
    "--wandb",
    "disabled",
    "--checkpoint-every",
    "0",
]


@pytest.fixture(scope="module")
def damaged(module_dir):
    """24 training JPEGs (2 of them broken) + 1 text file; 8 validation JPEGs."""
    root = make_imagefolder(module_dir, {"train": {"a": 12, "b": 12}, "val": {"a": 4, "b": 4}})
    bad = [
        break_jpeg(root / "train" / "a" / "0003.jpg", "truncated"),
        break_jpeg(root / "train" / "b" / "0005.jpg", "corrupt"),
    ]
    (root / "train" / "b" / "notes.txt").write_text("not an image")
    return root, bad


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "gpu", "dali"])
def test_bad_images_are_skipped_named_once_and_counted(damaged, backend, tmp_path, capsys):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e '.[dali]')")
    root, bad = damaged
    out = tmp_path / "run"
    code = main(ARGS + ["--data-dir", str(root), "--data-backend", backend, "--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err[-3000:]
    for path in bad:  # two epochs, but each file is named once
        assert err.count(f"skipping unreadable image {path}") == 1, err
    assert "ignored 1 non-image file(s)" in err and "notes.txt" in err
    train = [x for x in read_metrics(out) if x["kind"] == "train"]
    # torch and dali meet the 2 files in every epoch (24 images = 6 full batches: all are used);
    # gpu leaves them out once, when it loads the data set.
    assert train[-1]["bad_samples"] == (2 if backend == "gpu" else 4)
    assert train[-1]["step"] == (2 * 5 if backend == "gpu" else 2 * 6)  # gpu: 22 images -> 5 batches
    assert [x["eval_samples"] for x in read_metrics(out) if x["kind"] == "eval"] == [8, 8]


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_fail_policy_stops_with_the_file_path(damaged, backend, tmp_path, capsys):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e '.[dali]')")
    root, bad = damaged
    code = main(
        ARGS
        + [
            "--data-dir",
            str(root),
            "--data-backend",
            backend,
            "--on-bad-sample",
            "fail",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    errors = [ln for ln in err.splitlines() if ln.startswith("distres: error: ")]
    assert len(errors) == 1
    assert any(f"cannot decode {p} (" in errors[0] for p in bad), errors
    assert "--on-bad-sample skip" in errors[0]


def test_folder_mistakes_get_one_clear_line(tmp_path, capsys):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    (root / "train" / "c").mkdir()  # an empty class folder in the training split
    args = [
        "--data",
        "imagefolder",
        "--data-dir",
        str(root),
        "--device",
        "cpu",
        "--image-size",
        "32",
        "--output-dir",
        str(tmp_path / "o"),
        "--no-progress",
    ]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (
        f"distres: error: class folder(s) c in {root / 'train'} hold no image files; "
        "add images or remove the empty folder(s)"
    )
