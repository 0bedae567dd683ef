"""A file that kills its decoder (SIGSEGV in libpng) costs one sample: the run that meets it
names it, counts it, lists it in bad_samples.txt and ends normally, exactly as the run told to
exclude it from the start; a resumed run leaves it out too. Images declaring more pixels than
--max-image-pixels are skipped without being decoded. The trainer runs in this process; the
crash happens in its DataLoader worker (or the probe's forked child), never here."""

import json

import pytest
import torch

from distres.data import decode, isolate
from tests.damaged import huge_png, short_png, write
from tests.helpers import make_imagefolder, read_metrics, run_here, train_here, train_ranks

ARGS = [
    "--arch", "resnet18", "--data", "imagefolder", "--image-size", "32", "--cifar-stem", "off", "--batch-size", "4",
    "--device", "cpu", "--no-progress", "--log-every", "2", "--wandb", "disabled", "--amp", "none",
    "--checkpoint-every", "0", "--workers", "1", "--eval-every", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def crashing(module_dir):
    """23 good training JPEGs and the crashing PNG (6 full batches of 4), 4 validation JPEGs."""
    root = make_imagefolder(module_dir, {"train": {"a": 12, "b": 11}, "val": {"a": 2, "b": 2}})
    bad = write(root / "train" / "b" / "crash.png", short_png())
    return root, bad


def test_the_reproduction_kills_a_process_that_decodes_it(crashing):
    _, bad = crashing
    found = isolate.probe([str(bad)], decode.decode_torchvision)
    assert found[str(bad)].startswith(isolate.CRASHED) and "SIGSEGV" in found[str(bad)], found


def _weights(out):
    last = sorted((out / "checkpoints").glob("step-*.pt"))[-1]
    return torch.load(last, map_location="cpu", weights_only=False)


def _bad(out):
    return [x["bad_samples"] for x in read_metrics(out) if x["kind"] == "train"]


@pytest.mark.slow
@pytest.mark.parametrize("decode_on", ["workers", "device"])
def test_a_crash_costs_one_sample_and_equals_excluding_the_file(crashing, decode_on, tmp_path):
    root, bad = crashing
    args = ARGS + ["--data-dir", str(root), "--epochs", "1", "--decode-on", decode_on]
    hit = train_here(args + ["--output-dir", str(tmp_path / "hit")])
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert hit.stderr.count(f"{bad} {isolate.CRASHED} (SIGSEGV)") == 1, hit.stderr[-3000:]
    listing = (tmp_path / "hit" / "bad_samples.txt").read_text().split()
    assert listing == [str(bad)]
    told = train_here(
        args + ["--output-dir", str(tmp_path / "told"), "--exclude-files", str(tmp_path / "hit" / "bad_samples.txt")]
    )
    assert told.returncode == 0, told.stderr[-3000:]
    assert isolate.CRASHED not in told.stderr
    a, b = _weights(tmp_path / "hit"), _weights(tmp_path / "told")
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name
    assert _bad(tmp_path / "hit") == _bad(tmp_path / "told") and _bad(tmp_path / "hit")[-1] == 1
    assert a["excluded"][0] == {str(bad.resolve()): f"{decode.EXCLUDED}: {isolate.CRASHED} (SIGSEGV)"}


@pytest.mark.slow
def test_a_resumed_run_leaves_the_file_out(crashing, tmp_path):
    root, bad = crashing
    out = tmp_path / "run"
    args = ARGS + ["--data-dir", str(root), "--output-dir", str(out)]
    first = train_here(args + ["--epochs", "1"])
    assert first.returncode == 0 and isolate.CRASHED in first.stderr, first.stderr[-3000:]
    resumed = train_here(args + ["--epochs", "2", "--resume", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"{bad} {isolate.CRASHED}" not in resumed.stderr  # no worker died: the file was excluded from the start
    assert f"skipping unreadable image {bad} ({decode.EXCLUDED}" in resumed.stderr


def test_images_over_the_pixel_limit_are_skipped_undecoded(tmp_path):
    root = make_imagefolder(tmp_path / "d", {"train": {"a": 4, "b": 3}, "val": {"a": 2, "b": 2}})
    big = write(root / "train" / "b" / "big.png", huge_png())
    run = train_here(ARGS + ["--data-dir", str(root), "--epochs", "1", "--output-dir", str(tmp_path / "o")])
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"skipping unreadable image {big} (30000x30000 pixels, over --max-image-pixels 89478485)" in run.stderr
    assert _bad(tmp_path / "o")[-1] == 1


def test_predict_lists_the_crashing_file_and_classifies_the_rest(crashing, tmp_path):
    from distres.predict import main as predict

    root, bad = crashing
    out = tmp_path / "run"
    assert (
        train_here(
            ARGS + ["--data-dir", str(root), "--epochs", "1", "--max-steps", "1", "--output-dir", str(out)]
        ).returncode
        == 0
    )
    pred = run_here(
        predict,
        ["--checkpoint", str(out / "checkpoints" / "last.pt"), str(root / "train"), "--output", str(tmp_path / "p.csv"),
         "--workers", "1", "--batch-size", "4", "--device", "cpu"],
    )  # fmt: skip
    assert pred.returncode == 0, pred.stderr[-3000:]
    assert f"unreadable: {bad}: {decode.EXCLUDED}: {isolate.CRASHED} (SIGSEGV)" in pred.stderr
    rows = (tmp_path / "p.csv").read_text().splitlines()
    assert len(rows) == 1 + 23 and str(bad) not in "".join(rows)


def test_prepare_skips_images_over_the_pixel_limit(tmp_path):
    from distres.prepare import Unreadable, resize_image

    big = write(tmp_path / "big.png", huge_png())
    with pytest.raises(Unreadable, match="30000x30000 pixels, over --max-image-pixels"):
        resize_image(big, tmp_path / "out.jpg", 64, 90)


@pytest.mark.slow
def test_two_ranks_that_meet_the_crash_equal_two_told_to_exclude_it(crashing, tmp_path):
    """2 ranks over 2 epochs (the file falls to one rank or the other each epoch):
    the run ends as the run that excluded the file from the start, weights bit for bit."""
    root, bad = crashing
    args = ARGS + ["--data-dir", str(root), "--epochs", "2"]
    hit = train_ranks(args + ["--output-dir", str(tmp_path / "hit")])
    assert hit.returncode == 0, hit.stderr[-3000:]
    assert f"{bad} {isolate.CRASHED} (SIGSEGV)" in hit.stderr, hit.stderr[-3000:]
    assert (tmp_path / "hit" / "bad_samples.txt").read_text().split() == [str(bad)]
    told = train_ranks(
        args + ["--output-dir", str(tmp_path / "told"), "--exclude-files", str(tmp_path / "hit" / "bad_samples.txt")]
    )
    assert told.returncode == 0 and isolate.CRASHED not in told.stderr, told.stderr[-3000:]
    a, b = _weights(tmp_path / "hit"), _weights(tmp_path / "told")
    for name, t in a["model"].items():
        assert torch.equal(t, b["model"][name]), name


def test_prepare_shards_leaves_out_the_crashing_file_and_training_reads_the_rest(crashing, tmp_path):
    from distres.prepare import main as prepare

    root, bad = crashing
    out = tmp_path / "shards"
    r = run_here(prepare, ["shards", str(root), str(out), "--workers", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [x["reason"] for x in manifest["left_out"] if x["name"].endswith("crash.png")] == [
        f"{isolate.CRASHED} (SIGSEGV)"
    ]
    assert manifest["splits"]["train"]["samples"] == 23
    args = ARGS[: ARGS.index("--data")] + ARGS[ARGS.index("--data") + 2 :]
    run = train_here(
        args + ["--data", "shards", "--data-dir", str(out), "--epochs", "1", "--output-dir", str(tmp_path / "o")]
    )
    assert run.returncode == 0 and isolate.CRASHED not in run.stderr, run.stderr[-3000:]
