"""Preemption by signal, elastic restarts after a killed worker, and a kill during a checkpoint
write: each must end in exactly the state of a run that was never interrupted."""

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from distres import checkpoint
from tests.helpers import TINY, read_metrics, start_one, start_train, train_here, train_ranks, wait_for

# 2 gloo ranks x batch 4 over 128 samples: 16 steps per epoch, 32 in all, a checkpoint every 4;
# deterministic kernels and fp32 so that "the same computation" means bitwise equal results.
EVERY = 4
ARGS = TINY + [
    "--batch-size",
    "4",
    "--synthetic-samples",
    "128",
    "--epochs",
    "2",
    "--amp",
    "none",
    "--deterministic",
    "--checkpoint-every",
    str(EVERY),
    "--eval-every",
    "0",
]
STEPS = 32


@pytest.fixture(scope="module")
def uninterrupted(module_dir):
    out = module_dir
    r = train_ranks(ARGS + ["--output-dir", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "checkpoints" / checkpoint.LAST, weights_only=True)


def _last_step(out) -> int:
    try:
        lines = (out / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return steps[-1] if steps else 0


def _worker_pid(torchrun_pid: int, rank: int) -> int:
    """The pid of the worker with this RANK among torchrun's children."""
    children = subprocess.run(["pgrep", "-P", str(torchrun_pid)], capture_output=True, text=True).stdout.split()
    for pid in map(int, children):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return 0


def _both_ranks(proc) -> bool:
    """Both workers of the torchrun ``proc`` are running (after a restart: both are back)."""
    return bool(_worker_pid(proc.pid, 0) and _worker_pid(proc.pid, 1))


def _starts(log) -> list[int]:
    """The step each restart of the job resumed at (0: no checkpoint yet, from scratch)."""
    found = re.findall(r"resumed from \S+ at step (\d+)|(no checkpoint in) ", log.read_text())
    return [int(step) if step else 0 for step, _ in found]


def _assert_same_final_state(out, expected):
    got = torch.load(out / "checkpoints" / checkpoint.LAST, weights_only=True)
    assert got["step"] == expected["step"] == STEPS
    for k, v in expected["model"].items():
        assert torch.equal(v, got["model"][k]), k
    for pid, st in expected["optimizer"]["state"].items():
        assert torch.equal(st["momentum_buffer"], got["optimizer"]["state"][pid]["momentum_buffer"])
    # resumed runs append to metrics.jsonl: every step exactly once
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"] == list(range(1, STEPS + 1))


def _save_and_block(argv: list[str]) -> int:
    # Block after the bytes are written and before the rename: the parent kills us there.
    os.fsync = lambda fd: time.sleep(600)
    checkpoint.save({"model": {"w": torch.zeros(1000)}, "step": 2}, Path(argv[0]), 2, keep=3)
    return 0


def test_kill_during_a_checkpoint_write_leaves_the_previous_one_loadable(tmp_path):
    folder = tmp_path / "ck"
    checkpoint.save({"model": {"w": torch.ones(1000)}, "step": 1}, folder, 1, keep=3)
    writer = start_one(_save_and_block, [str(folder)])
    wait_for(lambda: [p for p in os.listdir(folder) if ".tmp" in p], 60, "the temporary file")
    writer.procs[0].kill()
    writer.wait(timeout=60)
    state, path = checkpoint.load_latest(folder)
    assert state["step"] == 1 and path.name == checkpoint.LAST
    assert torch.equal(state["model"]["w"], torch.ones(1000))
    # the next save of the resumed run goes through and the stale temporary file is harmless
    checkpoint.save({"model": {"w": torch.zeros(1000)}, "step": 2}, folder, 2, keep=3)
    assert checkpoint.load_latest(folder)[0]["step"] == 2


def test_incompatible_checkpoint_is_a_one_line_error_and_stays_intact(tmp_path):
    out = tmp_path / "run"
    base = TINY + ["--batch-size", "4", "--synthetic-samples", "16", "--max-steps", "2", "--output-dir", str(out)]
    assert train_here(base).returncode == 0
    before = (out / "checkpoints" / checkpoint.LAST).read_bytes()
    r = train_here(base + ["--arch", "resnet50", "--resume"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("distres: error: checkpoint ")
    assert "does not fit this run (saved with --arch resnet18" in r.stderr
    assert (out / "checkpoints" / checkpoint.LAST).read_bytes() == before


@pytest.mark.slow
def test_chaos_soak_ends_in_a_preemption_and_the_resume_is_bitwise_exact(tmp_path, uninterrupted):
    """One job under torchrun --max-restarts 3, four faults. First a seeded driver sends SIGKILL,
    SIGTERM and SIGUSR1, in a random order, each to a random rank: at a random step, during a
    checkpoint write, and at the end of epoch 1 (its checkpoint write and evaluation). torchrun
    brings the job back every time, and each restart computes at most --checkpoint-every steps
    again. Then, with no restart left, SIGUSR1 to rank 1 alone, mid-epoch: every rank stops after
    the same step, with a checkpoint and the status for "preempted, requeue me", so the job ends
    there; a resume finishes it with the uninterrupted run's weights and every step once in
    metrics.jsonl. DISTRES_SOAK_SEED replays a run."""
    import random

    seed = int(os.environ.get("DISTRES_SOAK_SEED", random.randrange(1 << 16)))
    rng = random.Random(seed)
    print(f"chaos soak seed {seed} (replay with DISTRES_SOAK_SEED={seed})")
    out, log = tmp_path / "run", tmp_path / "log"
    folder = out / "checkpoints"
    args = ARGS + ["--eval-every", "1", "--output-dir", str(out)]
    proc = start_train(args, nproc=2, extra_torchrun=["--max-restarts", "3"], log=log)
    first_target = rng.randint(3, 10)
    moments = [
        ("step", lambda target=first_target: _last_step(out) >= target),
        ("checkpoint write", lambda: folder.is_dir() and any(".tmp" in p for p in os.listdir(folder))),
        ("epoch end", lambda: (folder / f"step-{STEPS // 2:08d}.pt").exists()),
    ]
    signals = rng.sample([signal.SIGKILL, signal.SIGTERM, signal.SIGUSR1], len(moments))
    faults = []  # (moment, signal, rank, last step logged when it was sent)
    try:
        for (moment, ready), sig in zip(moments, signals):
            # Each fault waits for the job to be back and past its resume point.
            wait_for(lambda ready=ready: ready() and _both_ranks(proc), 240, moment, poll=0.01)
            rank, step = rng.randint(0, 1), _last_step(out)
            os.kill(_worker_pid(proc.pid, rank), sig)
            faults.append((moment, sig.name, rank, step))
            started = len(_starts(log))
            wait_for(lambda started=started: len(_starts(log)) > started, 240, f"the restart after {moment}")
        # The preemption, two steps into the last restart.
        at = _starts(log)[-1] + 2
        wait_for(lambda: _last_step(out) >= at and _both_ranks(proc), 120, f"step {at}", poll=0.01)
        before = len(log.read_text())
        os.kill(_worker_pid(proc.pid, 1), signal.SIGUSR1)  # rank 1 only
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    resumed = _starts(log)
    redone = [max(0, step - at) for (_, _, _, step), at in zip(faults, resumed)]
    print(f"chaos soak seed {seed}: faults {faults}; resumed at {resumed}; steps computed again {redone}")
    assert len(resumed) == len(faults) == 3, (faults, resumed)
    assert max(redone) <= EVERY, (faults, resumed)

    text = log.read_text()[before:]
    assert "exitcode  : 75" in text, text[-3000:]  # the worker's status for "preempted, requeue me"
    assert "preempted (signal on another rank): stopped after step" in text  # rank 0 reports it
    state = torch.load(folder / checkpoint.LAST, weights_only=True)
    assert 0 < state["step"] < STEPS and state["step_in_epoch"] > 0, "expected a mid-epoch stop"
    assert len(state["rng"]) == 2  # every rank's RNG state
    r = train_ranks(args + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"at step {state['step']}" in r.stderr
    _assert_same_final_state(out, uninterrupted)
