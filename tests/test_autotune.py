"""--autotune through the real CLI: real JPEG folders, real trials, DDP over gloo.

The starting point is deliberately slow: 1024-px JPEGs decoded in the training process
(--data-backend torch --workers 0) for 16-px crops, about half of each step waiting for data.
The tuner must find a faster input pipeline, and because it only picks settings with identical
batches, the tuned run (tuned, stopped, resumed without re-tuning) ends with weights bitwise
equal to an untuned run's. These runs are one process in a gloo group of one (DDP and the
collectives as with N): with two processes on two shared cores the all-reduce and the load of
other work swamp the input pipeline's share. The stand-alone CLI runs as two ranks (forked, as
torchrun would start them: torchrun itself is tested with distres.train), which must agree on
every trial and on the stop the budget forces."""

import json

import pytest
import torch

from distres import autotune
from distres.config import load_yaml, parse_args
from distres.errors import UserError
from tests.helpers import TINY, make_imagefolder, run_ranks, train_here

STEPS = 4  # 32 images / 8


def _common(data_dir):
    # A constant lr: a run stopped by --max-steps and resumed follows the same schedule as one
    # that runs through.
    return [
        *TINY,
        "--data",
        "imagefolder",
        "--data-dir",
        str(data_dir),
        "--image-size",
        "16",
        "--cifar-stem",
        "off",
        "--batch-size",
        "8",
        "--epochs",
        "1",
        "--eval-every",
        "0",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "0",
        "--deterministic",
        "--data-backend",
        "torch",
        "--workers",
        "0",
        "--threads",
        "1",
        "--dist-backend",
        "gloo",
    ]


@pytest.fixture(scope="module")
def runs(module_dir):
    root = module_dir
    data_dir = make_imagefolder(root / "data", {"train": {"a": 16, "b": 16}, "val": {"a": 4, "b": 4}}, size=1024)
    tune = ["--autotune", "--autotune-levers", "workers,data_backend", "--autotune-steps", "4"]
    tuned, plain = root / "tuned", root / "plain"
    first = train_here(_common(data_dir) + tune + ["--max-steps", "2", "--output-dir", str(tuned)])
    assert first.returncode == 0, first.stderr[-3000:]
    table = json.loads((tuned / "autotune.json").read_text())
    saved = load_yaml(str(tuned / "config.yaml"))
    resumed = train_here(_common(data_dir) + tune + ["--resume", "--output-dir", str(tuned)])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    untuned = train_here(_common(data_dir) + ["--output-dir", str(plain)])
    assert untuned.returncode == 0, untuned.stderr[-3000:]
    return {"table": table, "saved": saved, "first": first, "resumed": resumed, "tuned": tuned, "plain": plain}


@pytest.mark.slow
def test_finds_a_faster_input_pipeline(runs):
    table, err = runs["table"], runs["first"].stderr
    start, *tried = table["trials"]
    assert start["lever"] == "start" and start["data_wait_frac"] >= 0.10  # input-bound, as built
    levers = [t["lever"] for t in tried]
    assert set(levers) <= {"workers", "data_backend", "start, again", "chosen, again"}
    # the verdict's lever first: more --workers
    assert levers[0] == "workers"
    kept = [t for t in tried if t["kept"] and not t["lever"].endswith("again")]
    assert len(kept) == 1 and not start["kept"]
    assert kept[0]["images_per_sec"] > 1.05 * start["images_per_sec"]
    assert kept[0]["data_wait_frac"] < start["data_wait_frac"]
    # confirmed back to back against the start
    again = {t["lever"]: t for t in tried if t["lever"].endswith("again")}
    assert again["chosen, again"]["kept"] and not again["start, again"]["kept"]
    assert again["chosen, again"]["images_per_sec"] > 1.05 * again["start, again"]["images_per_sec"]
    chosen = table["chosen"]
    assert chosen["data_backend"] == "gpu" or chosen["workers"] > 0
    assert (chosen["data_backend"], chosen["workers"]) != ("torch", 0)
    # the table is printed once, by rank 0, and names the flags; config.yaml holds the choice
    assert err.count("distres: autotune, ") == 1 and f"chosen: {table['flags']}" in err
    for field, value in table["config"].items():
        assert runs["saved"][field] == value, field
    assert "autotune table: " in err


@pytest.mark.slow
def test_resume_reuses_the_choice_without_trials(runs):
    err = runs["resumed"].stderr
    assert "resuming with the settings chosen before" in err
    assert "distres: autotune: start" not in err and "at step 2" in err
    saved = load_yaml(str(runs["tuned"] / "config.yaml"))
    assert {k: saved[k] for k in runs["table"]["config"]} == runs["table"]["config"]


@pytest.mark.slow
def test_tuned_run_trains_bit_for_bit_like_an_untuned_one(runs):
    a = torch.load(runs["tuned"] / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(runs["plain"] / "checkpoints" / "last.pt", weights_only=True)
    assert a["step"] == b["step"] == STEPS
    assert (
        a["config"]["data_backend"] != b["config"]["data_backend"] or a["config"]["workers"] != b["config"]["workers"]
    )
    for name, t in b["model"].items():
        assert torch.equal(a["model"][name], t), name


@pytest.mark.slow
def test_standalone_cli_respects_the_budget(tmp_path):
    """Two ranks and a budget that the first trial already uses up: the rest is listed as not
    tried, and the flags printed (stdout, rank 0) are those of the configuration as given: none."""
    out = tmp_path / "o"
    args = [*TINY, "--cifar-stem", "off", "--batch-size", "4", "--synthetic-samples", "16"]
    r = run_ranks(
        autotune.main, args + ["--autotune-budget", "0.01", "--autotune-steps", "2", "--output-dir", str(out)]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    table = json.loads((out / "autotune.json").read_text())
    assert [t["lever"] for t in table["trials"]] == ["start"]
    assert {"channels_last=False", "broadcast_buffers=False"} <= set(table["not_tried"])
    assert r.stderr.count("not tried (budget)") == 1
    assert r.stdout.strip() == "" and table["flags"] == ""
    assert load_yaml(str(out / "config.yaml"))["channels_last"] is True


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--autotune-budget", "0"], "--autotune-budget must be > 0"),
        (["--autotune-levers", "lr"], "unknown setting lr"),
        (["--autotune-steps", "0"], "--autotune-steps must be > 0"),
    ],
)
def test_bad_autotune_flags_are_user_errors(args, needle):
    with pytest.raises(UserError, match=needle):
        parse_args(args)
