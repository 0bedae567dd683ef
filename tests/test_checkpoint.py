import os
import shutil

import pytest
import torch

from distres import checkpoint
from distres.errors import UserError
from tests.helpers import TINY, read_metrics, train_here, train_ranks


@pytest.mark.slow
def test_resume_continues_from_the_latest_checkpoint(tmp_path):
    out = tmp_path / "run"
    base = TINY + [
        "--batch-size",
        "8",
        "--synthetic-samples",
        "64",
        "--epochs",
        "3",
        "--checkpoint-every",
        "3",
        "--keep-checkpoints",
        "2",
        "--output-dir",
        str(out),
    ]
    r = train_here(base + ["--max-steps", "11"])
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert (state["step"], state["epoch"], state["step_in_epoch"]) == (11, 1, 3)
    assert set(state) >= {"model", "optimizer", "scheduler", "scaler", "rng", "config"}
    # keep-checkpoints 2: only the two newest step files stay
    assert [p.name for p in checkpoint.step_checkpoints(out / "checkpoints")] == [
        "step-00000009.pt",
        "step-00000011.pt",
    ]

    r = train_here(base + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 11" in r.stderr
    steps = [x["step"] for x in read_metrics(out) if x["kind"] == "train"]
    assert steps == list(range(1, 25)), steps  # no step twice, none missing
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 24


def test_atomic_save_keeps_the_previous_checkpoint_when_a_write_fails(tmp_path, monkeypatch):
    folder = tmp_path / "ck"
    checkpoint.save({"model": {"w": torch.ones(2)}, "step": 1}, folder, 1, keep=3)

    def broken_save(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpoint.save({"model": {"w": torch.zeros(2)}, "step": 2}, folder, 2, keep=3)
    monkeypatch.undo()
    state, path = checkpoint.load_latest(folder)
    assert state["step"] == 1 and torch.equal(state["model"]["w"], torch.ones(2))
    assert not [p for p in os.listdir(folder) if ".tmp" in p]


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    folder = tmp_path / "ck"
    for step in (1, 2):
        checkpoint.save({"model": {"w": torch.full((2,), float(step))}, "step": step}, folder, step, keep=3)
    (folder / "step-00000002.pt").write_bytes(b"garbage")  # last.pt is a hard link to it
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        state, path = checkpoint.load_latest(folder)
    assert state["step"] == 1 and path.name == "step-00000001.pt"
    with pytest.raises(UserError, match="unreadable or corrupt"):
        checkpoint.load(folder / "step-00000002.pt")


def test_rng_state_round_trips_through_weights_only_load(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    checkpoint.atomic_save({"rng": checkpoint.rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), random.random(), np.random.rand())
    checkpoint.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], got[0]) and expected[1:] == got[1:]


@pytest.mark.slow
def test_mid_epoch_resume_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    """Two gloo ranks; the run stops at step 5 of an 8-step epoch (a constant schedule, so
    stopping early does not change the learning rates), resumes, and must end with exactly the
    weights, BN statistics, optimizer state and EMA of a run that never stopped. The first epoch
    trains the head alone (--freeze-backbone-epochs 1): the stop falls in that phase, and DDP is
    rebuilt for the second."""
    common = TINY + [
        "--batch-size",
        "4",
        "--synthetic-samples",
        "64",
        "--epochs",
        "2",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "0",
        "--amp",
        "none",
        "--deterministic",
        "--checkpoint-every",
        "0",
        "--eval-every",
        "0",
        "--ema-decay",
        "0.8",
        "--ema-every",
        "2",
        "--freeze-backbone-epochs",
        "1",
        "--threads",
        "1",
    ]  # (the thread count changes the order of a convolution's sums)
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert train_ranks(common + ["--output-dir", str(full)]).returncode == 0
    r = train_ranks(common + ["--output-dir", str(cut), "--max-steps", "5"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(cut / "checkpoints/last.pt", weights_only=True)["step_in_epoch"] == 5
    shutil.copytree(cut, tmp_path / "one")  # resumed on one process below
    shutil.copytree(cut, tmp_path / "half")
    r = train_ranks(common + ["--output-dir", str(cut), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the backbone trains from now on" in r.stderr
    a = torch.load(full / "checkpoints/last.pt", weights_only=True)
    b = torch.load(cut / "checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 16
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k
    for pid, st in a["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert [x["loss"] for x in read_metrics(full) if x["kind"] == "train"] == [
        x["loss"] for x in read_metrics(cut) if x["kind"] == "train"
    ]
    # The frozen epoch moved the head only (step 5 and the epoch's end, step 8, share the
    # backbone); the second moved the backbone too.
    at5 = torch.load(cut / "checkpoints/step-00000005.pt", weights_only=True)["model"]
    at8 = torch.load(full / "checkpoints/step-00000008.pt", weights_only=True)["model"]
    backbone = [k for k in at5 if not k.startswith("fc.") and k.endswith((".weight", ".bias"))]
    assert len(backbone) == 60 and all(torch.equal(at5[k], at8[k]) for k in backbone)
    assert not torch.equal(at5["bn1.running_mean"], at8["bn1.running_mean"])  # BN statistics still adapt
    assert not torch.equal(at5["fc.weight"], at8["fc.weight"])
    assert not torch.equal(at8["layer1.0.conv1.weight"], a["model"]["layer1.0.conv1.weight"])
    assert not torch.equal(a["model"]["fc.weight"], a["ema"]["fc.weight"])  # the EMA lags the weights
    # Resumed exactly where the backbone starts to train (the epoch-end checkpoint of the frozen
    # epoch): the same end again.
    edge = tmp_path / "edge"
    r = train_ranks(common + ["--output-dir", str(edge), "--resume", str(full / "checkpoints/step-00000008.pt")])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the backbone trains from now on" in r.stderr
    c = torch.load(edge / "checkpoints/last.pt", weights_only=True)
    assert all(torch.equal(v, c["model"][k]) and torch.equal(a["ema"][k], c["ema"][k]) for k, v in a["model"].items())

    # Stopped on 2 processes, resumed on 1 with --grad-accum 2: the same global batch, each
    # micro-batch the images one rank had (sharding.py), so the same weights bit for bit. (Not
    # the BatchNorm running statistics: under DDP those follow rank 0's batches alone.)
    one = tmp_path / "one"
    r = train_here(common + ["--output-dir", str(one), "--resume", "--grad-accum", "2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "resumed on 1 x 4 x grad-accum 2 (global batch 8), saved on 2 x 4 x grad-accum 1 (8): "
        "epoch 1 continues at sample 40" in r.stderr
    )
    d = torch.load(one / "checkpoints/last.pt", weights_only=True)
    params = [k for k in a["model"] if k.endswith((".weight", ".bias"))]
    assert d["step"] == 16 and all(torch.equal(a["model"][k], d["model"][k]) for k in params)
    assert all(torch.equal(a["ema"][k], d["ema"][k]) for k in params)

    # Resumed on 1 process with the same per-process batch: global batch 4, so the 24 samples
    # left in epoch 1 take 6 steps and epoch 2 takes 16; the lr follows the batch on request.
    half = tmp_path / "half"
    r = train_here(common + ["--output-dir", str(half), "--resume", "--rescale-lr-on-resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert (
        "global batch 4), saved on 2 x 4 x grad-accum 1 (8): epoch 1 continues at sample 40; "
        "lr scaled by 4/8" in r.stderr
    )
    train = [x for x in read_metrics(half) if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 28))
    lrs = {x["lr"] for x in train}
    assert len(lrs) == 2 and max(lrs) == 2 * min(lrs)  # constant schedule, halved at the resume
    e = torch.load(half / "checkpoints/last.pt", weights_only=True)
    assert (e["step"], e["epoch"], e["samples_in_epoch"]) == (27, 2, 0)


def test_resume_with_another_amp_is_a_one_line_error(tmp_path):
    out = tmp_path / "run"
    base = TINY + ["--batch-size", "4", "--synthetic-samples", "16", "--max-steps", "2", "--output-dir", str(out)]
    assert train_here(base + ["--amp", "bf16"]).returncode == 0
    before = (out / "checkpoints" / checkpoint.LAST).read_bytes()
    r = train_here(base + ["--amp", "fp16", "--resume"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1].startswith("distres: error: checkpoint ")
    assert "trained with --amp bf16; resume with --amp bf16" in r.stderr and "Traceback" not in r.stderr
    assert (out / "checkpoints" / checkpoint.LAST).read_bytes() == before


def _checkpointer(tmp_path, keep=3):
    from distres.config import TrainConfig
    from distres.dist import DistContext

    cfg = TrainConfig(output_dir=str(tmp_path), keep_checkpoints=keep)
    ctx = DistContext(0, 0, 1, 1, torch.device("cpu"), None)
    return checkpoint.Checkpointer(cfg, ctx, tmp_path / "checkpoints")


class _Loader:
    def state_dict(self):
        return {"epoch": 1, "sample": 3 * 256}  # 3 steps of the default global batch


def test_background_write_holds_the_state_of_its_step(tmp_path, monkeypatch):
    """save() returns while a thread writes; training then changes the weights and momentum in
    place. The file must hold the state at the save, not what the thread sees later."""
    import threading

    from distres import ckptio

    mutated, write = threading.Event(), ckptio.save
    monkeypatch.setattr(ckptio, "save", lambda *a, **k: (mutated.wait(10), write(*a, **k))[1])
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 64)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ts = checkpoint.TrainingState(model, opt, sched, torch.amp.GradScaler("cpu", enabled=False), _Loader())
    ck = _checkpointer(tmp_path)
    want_w = model.weight.detach().clone()
    want_m = opt.state[model.weight]["momentum_buffer"].clone()
    ck.save(ts, 7)
    with torch.no_grad():  # the next steps, while the write may still run
        model.weight.add_(1.0)
        opt.state[model.weight]["momentum_buffer"].mul_(0)
    mutated.set()
    ck.wait()
    state, path = checkpoint.load_latest(tmp_path / "checkpoints")
    assert path.name == checkpoint.LAST and state["step"] == 7
    assert (state["epoch"], state["step_in_epoch"]) == (1, 3)
    assert torch.equal(state["model"]["weight"], want_w)
    assert torch.equal(state["optimizer"]["state"][0]["momentum_buffer"], want_m)
    assert not [p for p in os.listdir(tmp_path / "checkpoints") if ".tmp" in p]


def test_a_failed_background_write_is_a_user_error_and_keeps_the_previous(tmp_path, monkeypatch):
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ts = checkpoint.TrainingState(
        model,
        opt,
        torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        torch.amp.GradScaler("cpu", enabled=False),
        _Loader(),
    )
    ck = _checkpointer(tmp_path)
    ck.save(ts, 1)
    ck.wait()

    def full_disk(obj, f):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    ck.save(ts, 2)  # returns: the write fails in the background
    with pytest.raises(UserError, match="cannot write a checkpoint to .*No space left on device"):
        ck.wait()  # the collective wait: every rank raises it, not rank 0 alone
    monkeypatch.undo()
    assert checkpoint.load_latest(tmp_path / "checkpoints")[0]["step"] == 1


def test_the_horizon_stays_on_the_schedules_clock_across_a_change_of_global_batch():
    """--max-steps and the lr schedule count steps of the run's first global batch: a run of
    250 steps of 20 samples resumed at step 150 with batch 10 takes 200 more steps (not none),
    and with batch 40 50 more, each ending exactly where the schedule does."""
    from distres import optim
    from distres.config import TrainConfig

    first = {"global_batch": 20, "base_step": 0, "base": 0.0}
    for batch, total in ((10, 350), (40, 200), (20, 250)):
        cfg = TrainConfig(epochs=0, max_steps=250, batch_size=batch)
        plan = optim.plan(cfg.optim, 1000, 1, optim.Resumed(150, 3, 0, 20, first))
        assert plan.total_steps == total and plan.schedule_steps == (50, 250)
        assert plan.clock(plan.total_steps) == 250


def test_a_checkpoint_of_the_first_format_resumes_with_the_current_split():
    """The first format recorded only the world size: the steps done in the epoch are counted
    in the current global batch (no division by an unknown one)."""
    from distres.config import TrainConfig

    state = {"step": 11, "epoch": 1, "step_in_epoch": 3, "world_size": 2}
    cfg = TrainConfig(batch_size=8, grad_accum=1)
    pos = checkpoint.resumed_position(state, cfg, 2)
    assert (pos.step, pos.epoch, pos.sample, pos.global_batch, pos.clock) == (11, 1, 3 * 16, 16, None)
    assert (
        checkpoint.resumed_position(
            dict(
                state,
                data_order={
                    "seed": 5,
                    "world_size": 2,
                    "batch_size": 8,
                    "grad_accum": 1,
                    "data": "cifar10",
                    "data_dir": None,
                },
            ),
            cfg,
            2,
        ).sample
        == 0
    )  # another seed: the epoch restarts
