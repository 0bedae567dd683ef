"""The divergence guard (--on-nonfinite), the hang guard (--dist-timeout) and a data worker
that dies: each ends in one line naming what happened, with the checkpoints intact."""

import math
import os
import signal
import threading
import time

import pytest
import torch

from distres import train
from tests.helpers import TINY, one_error_line, read_metrics, start_one, start_ranks, train_here, wait_for

# Epoch 1 trains at lr 0.003125 (global batch 8); the step schedule then multiplies the lr by
# 1e5, and epoch 2's loss turns non-finite within a few steps. Epoch 1's checkpoint is good.
BLOWS_UP = TINY + [
    "--image-size",
    "16",
    "--batch-size",
    "8",
    "--synthetic-samples",
    "64",
    "--epochs",
    "2",
    "--warmup-epochs",
    "0",
    "--schedule",
    "step",
    "--lr-steps",
    "1",
    "--lr-gamma",
    "1e5",
    "--checkpoint-every",
    "0",
    "--eval-every",
    "0",
]


def _finite_checkpoints(out) -> list[str]:
    names = []
    for p in sorted((out / "checkpoints").glob("step-*.pt")):
        state = torch.load(p, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point()), p
        names.append(p.name)
    return names


def test_a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "stop"
    r = train_here(BLOWS_UP + ["--output-dir", str(out)])
    assert r.returncode == 2, r.stderr[-3000:]
    line = one_error_line(r.stderr)
    step = int(line.split(" at step ")[1].split()[0])
    assert 8 < step <= 16 and "(lr 312.5)" in line, line
    assert f"the last good checkpoint is {out / 'checkpoints' / 'step-00000008.pt'}" in line
    assert "--on-nonfinite rollback" in line
    assert _finite_checkpoints(out) == ["step-00000008.pt"]  # nothing non-finite was saved


@pytest.mark.slow
def test_rollback_reloads_the_last_good_checkpoint_with_a_lower_lr(tmp_path):
    out = tmp_path / "rollback"
    # Epoch 1 trains the head alone: the rollback goes back to a checkpoint without the
    # backbone's momentum buffers, into the epoch where the backbone trains.
    r = train_here(
        BLOWS_UP
        + [
            "--output-dir",
            str(out),
            "--on-nonfinite",
            "rollback",
            "--rollback-lr-factor",
            "1e-5",
            "--freeze-backbone-epochs",
            "1",
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "rollback 1 of 3: back to" in r.stderr and "with the lr x 1e-05 (now 0.003125)" in r.stderr
    records = read_metrics(out)
    [back] = [x for x in records if x["kind"] == "rollback"]
    assert back["step"] == 8 and back["diverged_at"] > 8
    train = [x for x in records if x["kind"] == "train"]
    assert [x["step"] for x in train] == list(range(1, 17))  # the rolled-back steps once, as redone
    assert all(math.isclose(x["lr"], 312.5 * 1e-5) and math.isfinite(x["loss"]) for x in train[8:])
    assert _finite_checkpoints(out) == ["step-00000008.pt", "step-00000016.pt"]

    out = tmp_path / "give-up"  # lr x 0.5 is not enough: gives up after one rollback
    r = train_here(BLOWS_UP + ["--output-dir", str(out), "--on-nonfinite", "rollback", "--rollback-tries", "1"])
    assert r.returncode == 2, r.stderr[-3000:]
    assert "after 1 rollback; the last good checkpoint is" in one_error_line(r.stderr)
    assert _finite_checkpoints(out) == ["step-00000008.pt"]


@pytest.mark.slow
def test_a_frozen_rank_is_named_by_the_others_after_dist_timeout(tmp_path):
    out = tmp_path / "run"
    args = [*TINY, "--image-size", "16", "--batch-size", "4", "--synthetic-samples", "4000", "--epochs", "1"]
    ranks = start_ranks(
        train.main, args + ["--checkpoint-every", "0", "--dist-timeout", "0.1", "--output-dir", str(out)]
    )
    frozen = ranks.procs[1].pid
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 3, 120, "three steps")
        os.kill(frozen, signal.SIGSTOP)  # frozen: alive, but never reaches the next all-reduce
        t0 = time.monotonic()
        line = wait_for(
            lambda: next(
                (ln for ln in ranks.stderr(0).splitlines() if ln.startswith("distres: error: rank 0 waited")), None
            ),
            90,
            "rank 0's line",
        )
        assert time.monotonic() - t0 < 60
    finally:
        os.kill(frozen, signal.SIGKILL)
        r = ranks.wait(timeout=120)
    assert r.returncode != 0
    assert "(--dist-timeout 0.1) in the training step at step " in line, line
    assert "rank(s) 1 did not arrive (rank 1: no answer (dead or frozen))" in line, line
    assert 'distres/train.py", line' not in r.stderr  # no traceback


def test_a_data_worker_that_dies_is_named(tmp_path):
    from tests.helpers import make_imagefolder

    data = make_imagefolder(tmp_path / "data", {"train": {"a": 200, "b": 200}, "val": {"a": 2, "b": 2}})
    out = tmp_path / "run"
    args = ["--arch", "resnet18", "--data", "imagefolder", "--data-dir", str(data), "--image-size", "16"]
    args += ["--batch-size", "2", "--epochs", "1", "--workers", "1", "--device", "cpu", "--threads", "1"]
    run = start_one(
        train.main, args + ["--no-progress", "--log-every", "1", "--wandb", "disabled", "--output-dir", str(out)]
    )
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() and len(read_metrics(out)) >= 2, 120, "two steps")
        pid = run.procs[0].pid
        kids = [int(p) for p in open(f"/proc/{pid}/task/{pid}/children").read().split()]
        assert kids, "no DataLoader worker process found"
        for kid in kids:
            os.kill(kid, signal.SIGKILL)
    finally:
        r = run.wait(timeout=120)
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert (
        line.startswith("distres: error: rank 0: a data loading worker died (DataLoader worker (pid ")
        and "Killed" in line
        and "--workers" in line
    ), line


class _SlowItems(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        time.sleep(60)
        return i


def test_a_worker_killed_while_the_loader_waits_is_named_by_its_signal():
    # The other path of a worker's death: its SIGCHLD arrives while the main thread waits on the
    # data queue, and torch's own message there only says the worker "exited unexpectedly".
    from distres.data.isolate import end_workers
    from distres.errors import process_death

    def children() -> set[int]:
        return {int(p) for p in open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()}

    before = children()  # (earlier in-process tests may have left processes of their own)
    it = iter(torch.utils.data.DataLoader(_SlowItems(), num_workers=1))
    kids = sorted(children() - before)
    assert len(kids) == 1, kids
    timer = threading.Timer(1.0, os.kill, (kids[0], signal.SIGKILL))
    timer.start()
    try:
        with pytest.raises(RuntimeError) as caught:
            next(it)
    finally:
        timer.cancel()
        end_workers(it)  # now, not at whichever later test the garbage collector comes by
    err = caught.value
    assert "exited unexpectedly" in str(err), err  # the path this test is for
    line = str(process_death(err, 0))
    assert (
        line.startswith(
            f"rank 0: a data loading worker died (DataLoader worker (pid {kids[0]}) is killed by signal: Killed)"
        )
        and "--workers" in line
    ), line


def test_an_fp16_scaler_that_keeps_skipping_counts_as_diverged():
    import pytest

    from distres import divergence

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    divergence.check_logged(2.3, scaler, 10, 0.1)  # healthy
    with pytest.raises(divergence.Diverged, match="the training loss is nan"):
        divergence.check_logged(float("nan"), scaler, 10, 0.1)
    # 17 skipped steps in a row halve the scale from 2**16 to below 1
    params = [torch.nn.Parameter(torch.ones(2))]
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(17):
        params[0].grad = torch.full((2,), float("inf"))
        scaler.scale(params[0].sum())  # (the scaler starts its bookkeeping on first use)
        scaler.step(opt)
        scaler.update()
    assert torch.equal(params[0].detach(), torch.ones(2))  # every step skipped
    with pytest.raises(divergence.Diverged, match="fp16 gradients stay non-finite"):
        divergence.check_logged(2.3, scaler, 27, 0.1)
    assert (
        divergence.give_up(divergence.Diverged("the weights became non-finite", 27, 0.1), None, 0)
        .args[0]
        .startswith("the weights became non-finite at step 27 (lr 0.1); no checkpoint was written before it")
    )
