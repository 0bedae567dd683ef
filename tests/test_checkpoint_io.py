"""The checkpoint's layers on their own, in one process: the files (ckptio), the background
writer (ckptwriter), the format and its upgrade (ckptformat), the Stateful parts and the
checkpointer that stores them, and the resume's lr decision (resume, optim.scale_lr)."""

import os
import random

import pytest
import torch

from distres import checkpoint, ckptformat, ckptio, optim, resume
from distres.ckptwriter import BackgroundWriter
from distres.config import TrainConfig
from distres.dist import DistContext
from distres.ema import EMA
from distres.errors import UserError

CPU = torch.device("cpu")


def _ctx(rank=0):
    return DistContext(rank, rank, 1, 1, CPU, None)


class _Loader:
    """The loader's Stateful side: an epoch and a position in its global order."""

    def __init__(self, epoch=0, sample=0):
        self.epoch, self.sample = epoch, sample

    def state_dict(self):
        return {"epoch": self.epoch, "sample": self.sample}

    def load_state_dict(self, state):
        self.epoch, self.sample = state["epoch"], state["sample"]


class _Counter:
    """A part whose keys only it knows."""

    def __init__(self, n=0, per_rank=False):
        self.n, self.per_rank = n, per_rank

    def state_dict(self):
        return {"n": torch.tensor(self.n)}

    def load_state_dict(self, state):
        self.n = int(state["n"])


def _training_state(lr=0.1, ema=False, loader=None):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return checkpoint.TrainingState(
        model,
        opt,
        sched,
        torch.amp.GradScaler("cpu", enabled=False),
        loader or _Loader(),
        {"arch": "linear"},
        EMA(model, 0.9) if ema else None,
        optim.ScheduleClock(256),
    )


def _checkpointer(tmp_path, rank=0, **flags):
    cfg = TrainConfig(output_dir=str(tmp_path), **flags)
    return checkpoint.Checkpointer(cfg, _ctx(rank), tmp_path / "checkpoints")


def test_files_rotate_keep_the_newest_and_last_links_to_it(tmp_path):
    folder = tmp_path / "ck"
    for step in range(1, 6):
        ckptio.save({"model": {}, "step": step}, folder, step, keep=2)
    assert [p.name for p in ckptio.step_checkpoints(folder)] == ["step-00000004.pt", "step-00000005.pt"]
    assert os.path.samefile(folder / ckptio.LAST, folder / "step-00000005.pt")
    assert ckptio.load_latest(folder)[0]["step"] == 5
    (folder / ".step-00000006.pt.tmp-123").write_bytes(b"half")
    ckptio.remove_partial(folder)
    assert sorted(os.listdir(folder)) == ["last.pt", "step-00000004.pt", "step-00000005.pt"]


def test_best_weights_are_not_a_training_state(tmp_path):
    ckptio.save_best(ckptformat.best({"w": torch.ones(1)}, None, {"top1": 42.0}, {}), tmp_path)
    assert ckptio.best_top1(tmp_path) == 42.0
    with pytest.raises(UserError, match="holds the best weights only"):
        ckptio.load(tmp_path / ckptio.BEST)


def test_the_writer_has_one_wait_and_a_close_that_reports(tmp_path, capsys):
    writer = BackgroundWriter(_ctx(), tmp_path)
    assert writer.submit({"x": torch.ones(2)}, lambda obj: ckptio.atomic_save(obj, tmp_path / "a.pt"))
    writer.wait()
    assert torch.equal(torch.load(tmp_path / "a.pt", weights_only=True)["x"], torch.ones(2))

    def full(obj):
        raise OSError(28, "No space left on device")

    assert writer.submit({}, full)
    assert not writer.submit({}, full)  # nothing more is written after a failure...
    with pytest.raises(UserError, match="cannot write a checkpoint to .*No space left"):
        writer.wait()  # ...until the collective wait has raised it
    writer.wait()
    assert writer.submit({}, full)
    writer.close()  # the run is ending: reported, not raised
    assert "distres: warning: cannot write a checkpoint" in capsys.readouterr().err


def test_the_checkpointer_stores_and_restores_parts_it_knows_nothing_about(tmp_path):
    ck = _checkpointer(tmp_path)
    model = torch.nn.Linear(2, 2)
    order = checkpoint.data_order(ck.cfg, 1)
    progress = resume.Progress(_Loader(2, 512), None, order, (None, None), False, False)
    parts = {"model": model, "counter": _Counter(7), "mine": _Counter(3, per_rank=True), "progress": progress}
    ck.save(parts, 5)
    ck.wait()
    saved = torch.load(tmp_path / "checkpoints" / ckptio.LAST, weights_only=True)
    assert saved["counter"]["n"] == 7 and [m["n"] for m in saved["mine"]] == [3]  # one per rank
    assert (saved["step"], saved["epoch"], saved["samples_in_epoch"], saved["step_in_epoch"]) == (5, 2, 512, 2)

    again = _checkpointer(tmp_path, resume="latest")
    fresh = {
        "model": torch.nn.Linear(2, 2),
        "counter": _Counter(),
        "mine": _Counter(per_rank=True),
        "progress": resume.Progress(_Loader(), None, order, (None, None), False, False),
    }
    assert again.restore(fresh) == 5
    assert fresh["counter"].n == 7 and fresh["mine"].n == 3
    assert fresh["progress"].loader.state_dict() == {"epoch": 2, "sample": 512}
    assert torch.equal(fresh["model"].weight, model.weight)


def test_a_rank_takes_its_own_per_rank_state_or_the_last_saved(tmp_path):
    order = checkpoint.data_order(TrainConfig(), 1)
    progress = {"epoch": 0, "samples_in_epoch": 0, "step_in_epoch": 0, "world_size": 1, "data_order": order}
    states = {"model": {}, "mine": [{"n": torch.tensor(i)} for i in (10, 11)], "progress": progress}
    folder = tmp_path / "checkpoints"
    ckptio.save(ckptformat.pack(3, states), folder, 3, keep=1)
    for rank, want in ((0, 10), (1, 11), (3, 11)):
        part = _Counter(per_rank=True)
        _checkpointer(tmp_path, rank=rank, resume="latest").restore({"mine": part})
        assert part.n == want, rank


def test_the_first_format_upgrades_to_the_current():
    now = checkpoint.data_order(TrainConfig(seed=5, batch_size=8, grad_accum=2), 4)
    first = {"step": 11, "epoch": 1, "step_in_epoch": 3, "world_size": 2, "rng": {"torch": 0}, "model": {}}
    state = ckptformat.upgrade(first, now)
    assert state["format"] == ckptformat.FORMAT and state["rng"] == [{"torch": 0}]
    assert state["data_order"] == {**now, "world_size": 2}  # all but the world size taken as unchanged
    assert state["samples_in_epoch"] == 3 * 8 * 2 * 2 and state["schedule_axis"] is None
    # before --repeated-aug: none
    state = ckptformat.upgrade({**first, "data_order": {k: v for k, v in now.items() if k != "repeated_aug"}}, now)
    assert state["data_order"]["repeated_aug"] == 1
    assert ckptformat.upgrade(state, now) == state  # the current format stays as it is


def test_a_checkpoint_of_the_first_format_restores_a_training_state(tmp_path):
    """The first format's file: rank 0's RNG state alone, no data order, no EMA. The EMA starts
    from the loaded weights, the RNG continues as saved, the loader at the step's samples."""
    old = _training_state(lr=0.5)
    torch.manual_seed(3), random.seed(3)
    rng = checkpoint.rng_state()
    want = torch.rand(2)
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    config = TrainConfig(batch_size=8).options()
    first = {
        "format": 1,
        "model": old.model.state_dict(),
        "optimizer": old.optimizer.state_dict(),
        "scheduler": old.scheduler.state_dict(),
        "scaler": old.scaler.state_dict(),
        **{"epoch": 1, "step_in_epoch": 3, "step": 11, "world_size": 1, "config": config, "rng": rng},
    }
    ckptio.atomic_save(first, folder / ckptio.LAST)
    loader = _Loader()
    ts = _training_state(lr=0.1, ema=True, loader=loader)
    with torch.no_grad():
        ts.model.weight.zero_()
    assert _checkpointer(tmp_path, resume="latest", batch_size=8).restore(ts) == 11
    assert torch.equal(ts.model.weight, old.model.weight) and torch.equal(ts.ema.module.weight, old.model.weight)
    assert ts.optimizer.param_groups[0]["lr"] == 0.5
    assert loader.state_dict() == {"epoch": 1, "sample": 3 * 8}
    assert torch.equal(torch.rand(2), want)


def test_resuming_with_another_amp_or_model_is_a_one_line_error(tmp_path):
    ck = _checkpointer(tmp_path, amp="bf16")
    ck.save(_training_state(), 1)
    ck.wait()
    with pytest.raises(UserError, match=r"^checkpoint .*last.pt was trained with --amp bf16; resume with --amp bf16"):
        _checkpointer(tmp_path, resume="latest", amp="fp16").restore(_training_state())
    other = _training_state()
    other.model = torch.nn.Linear(5, 3)
    with pytest.raises(UserError, match=r"does not fit this run \(saved with --arch resnet50 --optimizer sgd; "):
        _checkpointer(tmp_path, resume="latest", amp="bf16").restore(other)


def test_scale_lr_scales_the_peak_and_the_current_lr():
    ts = _training_state(lr=0.4)
    ts.optimizer.param_groups[0]["lr"] = 0.2  # mid-schedule
    optim.scale_lr(ts.optimizer, ts.scheduler, 0.25)
    assert ts.scheduler.base_lrs == [0.1] and ts.optimizer.param_groups[0]["lr"] == 0.05


@pytest.mark.parametrize("rescale", [False, True])
def test_a_resume_with_another_global_batch_keeps_the_lr_unless_asked(tmp_path, rescale, capsys):
    ck = _checkpointer(tmp_path, batch_size=8)
    ck.save(_training_state(lr=0.4, loader=_Loader(0, 16)), 2)
    ck.wait()
    ts = _training_state(lr=0.4)
    _checkpointer(tmp_path, resume="latest", batch_size=4, rescale_lr_on_resume=rescale).restore(ts)
    lr = 0.2 if rescale else 0.4
    assert ts.scheduler.base_lrs == [lr] and ts.optimizer.param_groups[0]["lr"] == lr
    assert ts.loader.state_dict() == {"epoch": 0, "sample": 16}
    err = capsys.readouterr().err
    assert "resumed on 1 x 4 x grad-accum 1 (global batch 4), saved on 1 x 8 x grad-accum 1 (8)" in err
    assert ("lr scaled by 4/8 to a peak of 0.2" if rescale else "lr kept at a peak of 0.4") in err
