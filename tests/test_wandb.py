"""Weights & Biases through the real CLI, offline only (never a server), read back with wandb's
own reader (`wandb leet inspect`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from distres import tracking
from tests.helpers import TINY, WANDB_VARS, read_metrics, train_here

WANDB_CLI = Path(sys.executable).with_name("wandb")


@pytest.fixture
def clean_home(tmp_path, monkeypatch):
    """An empty HOME and no W&B variables: nothing may leak in from the machine, and
    whatever W&B writes outside the output directory shows up here."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in WANDB_VARS:
        monkeypatch.delenv(var, raising=False)
    return home


def _inspect(run_dir: Path, *flags: str):
    out = subprocess.run(
        [str(WANDB_CLI), "leet", "inspect", "--json", *flags, str(run_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    if "--summary" in flags:
        return json.loads(out)
    return [json.loads(x) for x in out.splitlines() if x.strip()]


def _history(run_dir: Path) -> list[dict]:
    return [rec["history"]["item"] for rec in _inspect(run_dir) if rec["type"] == "history"]


def _runs(out: Path) -> list[Path]:
    return sorted((out / "wandb").glob("offline-run-*"))


@pytest.mark.slow
def test_two_process_job_writes_one_offline_run(synthetic_run):
    """The shared 2-rank run (conftest.synthetic_run, --wandb offline, an empty HOME): batch 8 x
    2 ranks, 4 epochs of 8 steps, every step logged."""
    out, home, r = synthetic_run
    runs = _runs(out)
    assert len(runs) == 1, runs  # rank 0 only: one run per job, never one per process

    metrics = read_metrics(out)
    train = [m for m in metrics if m["kind"] == "train"]
    final_eval = [m for m in metrics if m["kind"] == "eval"][-1]
    epoch = [m for m in metrics if m["kind"] == "epoch"]
    assert len(epoch) == 4 and all(e["verdict"] == "compute-bound" for e in epoch)
    assert "distres: epoch 1: compute-bound:" in r.stderr

    got = _inspect(runs[0], "--summary")
    assert got["state"] == "finished" and got["run_id"] == (out / "wandb" / "run-id").read_text().strip()
    cfg = got["config"]
    assert cfg["arch"] == "resnet18" and cfg["batch_size"] == 8 and cfg["world_size"] == 2
    assert cfg["global_batch"] == 16 and cfg["wandb"] == "offline"
    summary = got["summary"]
    assert summary["train/loss"] == pytest.approx(train[-1]["loss"])
    assert summary["eval/top1"] == pytest.approx(final_eval["top1"])
    assert summary["perf/verdict"] == "compute-bound"

    hist = [h for h in _history(runs[0]) if "train/loss" in h]
    assert [h["_step"] for h in hist] == [m["step"] for m in train]
    assert [h["train/loss"] for h in hist] == pytest.approx([m["loss"] for m in train])
    assert all(0 <= h["train/data_wait_frac"] < 1 and h["train/images_per_sec"] > 0 for h in hist)
    # every W&B file under the output dir: nothing in HOME
    assert not [p for p in home.rglob("*") if "wandb" in p.name.lower()]


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path, clean_home):
    out = tmp_path / "run"
    common = TINY + [
        "--wandb",
        "offline",
        "--batch-size",
        "4",
        "--synthetic-samples",
        "16",
        "--epochs",
        "2",
        "--eval-every",
        "0",
        "--output-dir",
        str(out),
    ]
    first = train_here(common + ["--max-steps", "4"])
    assert first.returncode == 0, first.stderr[-3000:]
    second = train_here(common + ["--resume", "latest"])  # what a requeued job runs
    assert second.returncode == 0, second.stderr[-3000:]
    runs = _runs(out)
    assert len(runs) == 2
    ids = {_inspect(d, "--summary")["run_id"] for d in runs}
    assert ids == {(out / "wandb" / "run-id").read_text().strip()}, ids
    later = [h["_step"] for h in _history(runs[1]) if "train/loss" in h]
    assert later == [5, 6, 7, 8]


def test_wandb_failure_is_a_warning(tmp_path, clean_home):
    (tmp_path / "wandb").write_text("a file where W&B wants its folder")
    with pytest.warns(UserWarning, match="W&B disabled"):
        lg = tracking.WandbLogger("offline", tmp_path, {"a": 1}, "x", resume=False)
    lg.log({"kind": "train", "step": 1, "loss": 1.0})
    lg.close()


def test_mode_resolution_never_prompts(tmp_path):
    home = {"HOME": str(tmp_path)}
    assert tracking.resolve_wandb_mode("auto", home) == ("offline", None)
    assert tracking.resolve_wandb_mode("auto", {**home, "WANDB_API_KEY": "k"}) == ("online", None)
    assert tracking.resolve_wandb_mode("auto", {**home, "WANDB_MODE": "disabled"}) == ("disabled", None)
    mode, note = tracking.resolve_wandb_mode("online", home)
    assert mode == "offline" and "no API key" in note
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password secret\n")
    assert tracking.resolve_wandb_mode("auto", home) == ("online", None)
    # a key for another host than the configured one does not count
    (tmp_path / "settings").write_text("[default]\nbase_url = https://wandb.example.org\n")
    assert tracking.resolve_wandb_mode("auto", {**home, "WANDB_CONFIG_DIR": str(tmp_path)}) == ("offline", None)
