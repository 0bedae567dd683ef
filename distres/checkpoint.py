"""The training state on disk: which checkpoint a run starts from, every key it holds, and
how it is read back.

``Checkpointer`` is the trainer's side: at start it finds the checkpoint to resume from (the
newest one after a restart or requeue, the one --resume names, or none, refusing to overwrite
an earlier run), ``restore`` loads it into the run's ``TrainingState`` and returns the step to
continue at, and ``save`` writes the state (a collective: every rank's RNG state is gathered).

Writes cannot be corrupted by a crash: each goes to a temporary file in the same folder, is
fsynced, and is renamed into place (rename is atomic on POSIX), so ``last.pt`` is always a
whole checkpoint. Step checkpoints are kept as a short history; ``last.pt`` is a hard link to
the newest one (no second write). Loads use ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from distres import dist
from distres.errors import UserError, console
from distres.optim import Resumed

FORMAT = 2

LAST = "last.pt"
BEST = "best.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch's zip writer turns the file's OSError (a full disk) into its own error.
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _point_last_at(target: Path) -> None:
    last = target.with_name(LAST)
    tmp = target.with_name(f".{LAST}.link-{os.getpid()}")
    try:
        os.link(target, tmp)
    except OSError:  # filesystems without hard links: copy instead
        import shutil

        shutil.copyfile(target, tmp)
    os.replace(tmp, last)
    _fsync_dir(target.parent)


def step_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict, folder: Path, step: int, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    atomic_save(state, path)
    _point_last_at(path)
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check --resume") from None
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}); "
            "resume from an earlier one with --resume PATH"
        ) from None
    if isinstance(state, dict) and "best" in state:
        raise UserError(
            f"{path} holds the best weights only, not a training state; resume from last.pt, "
            "or start a new run from it with --weights"
        )
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"{path} is not a distres checkpoint; pass one from OUTPUT_DIR/checkpoints")
    return state


def load_latest(folder: Path) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint in folder, falling back past corrupt ones; None if empty."""
    candidates = [folder / LAST] if (folder / LAST).exists() else []
    candidates += reversed(step_checkpoints(folder))
    errors = []
    for path in candidates:
        try:
            return load(path), path
        except UserError as e:
            errors.append(str(e))
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
    if errors:
        raise UserError(f"no loadable checkpoint in {folder}; {errors[-1]}")
    return None


def rng_state(device: torch.device | None = None) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        # This rank's GPU only: the job may resume on nodes where each process sees a different
        # number of GPUs. A CPU rank never asks CUDA (that alone would create a CUDA context).
        "cuda": [torch.cuda.get_rng_state(device)] if device is not None and device.type == "cuda" else [],
    }


def rank_rng(state: dict, rank: int) -> dict:
    """This rank's saved RNG state. Format 1 held rank 0's only; a job resumed on more
    processes than it was saved from gives the extra ranks the last saved rank's state."""
    rng = state["rng"]
    if isinstance(rng, dict):
        return rng
    return rng[min(rank, len(rng) - 1)]


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


@dataclass
class TrainingState:
    """What a checkpoint restores besides the RNG: the plain model (not its DDP or compile
    wrapper), optimizer, lr schedule, GradScaler, the training loader, whose position is
    where training stands within an epoch, and the EMA of the weights. ``meta`` (the model's
    description, ``models.describe``) is written into every checkpoint for evaluate, predict
    and export."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loader: object  # data.Loader
    meta: dict | None = None
    ema: object = None  # ema.EMA, or None without --ema-decay
    axis: object = None  # optim.Axis, the lr schedule's clock


# What an epoch's sample order depends on (data/sharding.py derives it from these alone). How
# each step's global batch is split over processes and micro-batches does not change it.
ORDER_KEYS = ("seed", "data", "data_dir", "repeated_aug")
SPLIT_KEYS = ("world_size", "batch_size", "grad_accum")


def data_order(cfg, world_size: int) -> dict:
    return {
        "seed": cfg.run.seed,
        "world_size": world_size,
        "batch_size": cfg.optim.batch_size,
        "grad_accum": cfg.optim.grad_accum,
        "data": cfg.data.dataset,
        "data_dir": cfg.data.data_dir,
        "repeated_aug": cfg.data.repeated_aug,
    }


def _global_batch(order: dict) -> int:
    return order["batch_size"] * order["grad_accum"] * order["world_size"]


def saved_order(state: dict, cfg) -> dict:
    """The data order a checkpoint was written with. Older formats lack some keys: the first
    had no record but the world size, the second no --repeated-aug (there was none)."""
    return {**data_order(cfg, state.get("world_size", 1)), "repeated_aug": 1, **state.get("data_order", {})}


def order_changes(saved: dict, now: dict) -> list[str]:
    """What the epoch's order depends on and changed from the saved order to this run's."""
    return [k for k in ORDER_KEYS if saved[k] != now[k]]


def resumed_position(state: dict, cfg, world_size: int) -> Resumed:
    """Where a checkpoint stands, for ``optim.plan``: the interrupted epoch continues at the
    samples consumed, or restarts when its order changed."""
    saved = saved_order(state, cfg)
    sample = state.get("samples_in_epoch")
    if sample is None:  # saved by a version that counted optimizer steps
        sample = state["step_in_epoch"] * _global_batch(saved)
    if order_changes(saved, data_order(cfg, world_size)):
        sample = 0
    return Resumed(state["step"], state["epoch"], sample, _global_batch(saved), state.get("schedule_axis"))


class Checkpointer:
    def __init__(self, cfg, ctx, folder: Path):
        self.cfg, self.ctx, self.folder = cfg, ctx, folder
        if folder.parent.exists() and not folder.parent.is_dir():
            raise UserError(f"--output-dir {folder.parent} is a file, not a folder; choose another --output-dir")
        if ctx.is_main and folder.is_dir():  # what a process killed mid-write left behind
            for stale in folder.glob(".*.tmp-*"):
                stale.unlink(missing_ok=True)
        self.found = self._find()  # (state, path) to resume from, or None
        # A resume that found no checkpoint still continues the output directory (the logger
        # drops the records of an attempt that died before its first checkpoint).
        self.resume_step: int | None = 0 if cfg.checkpoint.resume is not None or ctx.restart > 0 else None
        self._writer: threading.Thread | None = None  # rank 0's background write
        self._error: BaseException | None = None
        self.best_top1 = self._best_so_far() if self.resume_step is not None else None
        self.last_saved: Path | None = None  # the newest checkpoint of this run, once written or resumed from

    def _find(self) -> tuple[dict, Path] | None:
        resume = self.cfg.checkpoint.resume
        if self.ctx.restart > 0:
            # torchrun --max-restarts restarted the workers, or SLURM requeued the job, with the
            # original command line: continue from this run's newest checkpoint, also when that
            # command line named an older one with --resume PATH (the first attempt's start).
            found = load_latest(self.folder)
            if found is not None:
                return found
            resume = resume or "latest"
        if resume is None:
            if step_checkpoints(self.folder) or (self.folder / LAST).exists():
                raise UserError(
                    f"{self.folder} already holds checkpoints; pass --resume to continue that run "
                    "or choose a new --output-dir"
                )
            return None
        if resume == "latest":
            found = load_latest(self.folder)
            if found is None and self.ctx.is_main:
                console(f"distres: no checkpoint in {self.folder}; starting from scratch")
            return found
        return load(Path(resume)), Path(resume)

    def _best_so_far(self) -> float | None:
        """The top-1 of the run's best.pt (rank 0 alone decides what to write there)."""
        path = self.folder / BEST
        if not self.ctx.is_main or not path.exists():
            return None
        try:
            return float(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["best"]["top1"])
        except Exception:  # torn or foreign: the next evaluation replaces it
            return None

    def restore(self, ts: TrainingState) -> int:
        """Load the found checkpoint into ts (and the RNG); the optimizer step to continue at."""
        step = 0
        if self.found is not None:
            state, path = self.found
            self._load(state, path, ts)
            step = self.resume_step = state["step"]
            self.last_saved = path
            if self.ctx.is_main:
                console(f"distres: resumed from {path} at step {step} (epoch {ts.loader.epoch + 1})")
            self.found = None  # the state's tensors are in the run now; free the copy
        # Each rank found its checkpoint itself. Where the output directory is not one shared
        # folder (node-local disks, stale NFS caches) they could differ, and the first
        # collective would hang.
        steps = sorted(set(dist.gather_objects(step)))
        if len(steps) > 1:
            raise UserError(
                f"the processes resumed from different steps {steps}; put --output-dir on a "
                "file system that every node shares"
            )
        return step

    def _load(self, state: dict, path: Path, ts: TrainingState) -> None:
        cfg, saved = self.cfg, state.get("config", {})
        if saved.get("amp", cfg.optim.amp) != cfg.optim.amp:
            raise UserError(
                f"checkpoint {path} was trained with --amp {saved['amp']}; resume with --amp "
                f"{saved['amp']} or start a new --output-dir"
            )
        try:
            ts.model.load_state_dict(state["model"])
            ts.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise UserError(
                f"checkpoint {path} does not fit this run (saved with --arch {saved.get('arch')} "
                f"--optimizer {saved.get('optimizer')}; {str(e).splitlines()[0][:120]}); resume with "
                "the settings of its config.yaml or start a new --output-dir"
            ) from None
        ts.scheduler.load_state_dict(state["scheduler"])
        ts.scaler.load_state_dict(state["scaler"])
        if ts.ema is not None:
            if state.get("ema") is not None:
                ts.ema.load_state_dict(state["ema"])
            else:
                ts.ema.reset(ts.model)
                if self.ctx.is_main:
                    console(f"distres: {path} has no EMA; the EMA starts from its weights")
        set_rng_state(rank_rng(state, self.ctx.rank), self.ctx.device)
        position = resumed_position(state, cfg, self.ctx.world_size)
        saved, now = saved_order(state, cfg), data_order(cfg, self.ctx.world_size)
        changed = order_changes(saved, now)
        if changed and (state.get("samples_in_epoch") or state.get("step_in_epoch")):
            warnings.warn(
                f"{', '.join(changed)} changed since the checkpoint, so the order of the "
                "interrupted epoch differs: that epoch restarts from its beginning",
                stacklevel=1,
            )
        if any(saved[k] != now[k] for k in SPLIT_KEYS):
            self._resplit(saved, now, position, ts)
        ts.loader.load_state_dict({"epoch": state["epoch"], "sample": position.sample})

    def roll_back(self, ts: TrainingState) -> int:
        """Load this run's newest checkpoint into ts again (a collective: every write has
        ended first); the step it holds."""
        self.finish()
        path = self.last_saved
        self.found = load(path), path
        return self.restore(ts)

    def _resplit(self, saved: dict, now: dict, position: Resumed, ts: TrainingState) -> None:
        """A run resumed with another split of its global batch continues the epoch's order at
        the sample it had reached; with another global batch size, its lr stays unless
        --rescale-lr-on-resume asks to follow the batch."""

        def split(o):
            return f"{o['world_size']} x {o['batch_size']} x grad-accum {o['grad_accum']}"

        old, new = position.global_batch, _global_batch(now)
        line = (
            f"distres: resumed on {split(now)} (global batch {new}), saved on {split(saved)} "
            f"({old}): epoch {position.epoch + 1} continues at sample {position.sample}"
        )
        if old and new != old:
            peak = max(ts.scheduler.base_lrs)
            if self.cfg.checkpoint.rescale_lr_on_resume:
                factor = new / old
                ts.scheduler.base_lrs = [lr * factor for lr in ts.scheduler.base_lrs]
                for group in ts.optimizer.param_groups:
                    group["lr"] *= factor
                line += f"; lr scaled by {new}/{old} to a peak of {peak * factor:g} (--rescale-lr-on-resume)"
            else:
                line += f"; lr kept at a peak of {peak:g} (--rescale-lr-on-resume scales it by {new}/{old})"
        if self.ctx.is_main:
            console(line)

    def save(self, ts: TrainingState, step: int) -> None:
        """Write the training state after optimizer step ``step``. A collective: every rank calls it.

        Rank 0 copies the state to host memory (on CUDA: queued copies into pinned memory, no
        wait) and a background thread writes it, so training goes on during the write. The
        next save and ``finish`` wait for it; a write that failed stops every rank there."""
        rng = self._gather(rng_state(self.ctx.device))
        self.last_saved = self.folder / f"step-{step:08d}.pt"  # (on every rank: roll_back reads it)
        if not self.ctx.is_main:
            return
        position = ts.loader.state_dict()
        order = data_order(self.cfg, self.ctx.world_size)
        state = _host_copy(
            {
                "format": FORMAT,
                "model": ts.model.state_dict(),
                "optimizer": ts.optimizer.state_dict(),
                "scheduler": ts.scheduler.state_dict(),
                "scaler": ts.scaler.state_dict(),
                "epoch": position["epoch"],
                "samples_in_epoch": position["sample"],  # of the epoch's global order, all ranks
                "step_in_epoch": position["sample"] // _global_batch(order),  # optimizer steps done in `epoch`
                "step": step,
                "world_size": self.ctx.world_size,
                "data_order": order,
                "schedule_axis": ts.axis.state_dict() if ts.axis is not None else None,
                "config": self.cfg.options(),
                "rng": rng,  # one entry per rank
                "meta": ts.meta,
                "ema": ts.ema.state_dict() if ts.ema is not None else None,
            }
        )
        self._start_write(lambda: save(state, self.folder, step, self.cfg.checkpoint.keep_checkpoints))

    def save_best(self, weights: dict, meta: dict, record: dict) -> bool:
        """Keep ``weights`` as best.pt when ``record["top1"]`` beats the best so far (rank 0
        writes it in the background, as ``save``; its failure surfaces there). Whether it did."""
        if not self.ctx.is_main or (self.best_top1 is not None and record["top1"] <= self.best_top1):
            return False
        if not self._join():  # the previous write failed: the next collective raises its error
            return False
        self.best_top1 = record["top1"]
        state = _host_copy(
            {"format": FORMAT, "model": weights, "meta": meta, "best": record, "config": self.cfg.options()}
        )
        self.folder.mkdir(parents=True, exist_ok=True)
        self._start_write(lambda: atomic_save(state, self.folder / BEST))
        return True

    def _start_write(self, write) -> None:
        copied = torch.cuda.Event() if self.ctx.device.type == "cuda" else None
        if copied is not None:
            copied.record()
        self._writer = threading.Thread(
            target=self._write, args=(write, copied), name="distres-checkpoint", daemon=False
        )
        self._writer.start()

    def finish(self) -> None:
        """Wait until the last checkpoint is on disk. A collective: no rank goes on (or exits,
        which would make the launcher kill the rest, rank 0 mid-write) before it is."""
        self._gather(None)

    def _gather(self, mine) -> list:
        """Every rank's ``mine``, once rank 0's write in flight has ended; if that write failed,
        every rank raises the same error (rank 0 alone would leave the others waiting)."""
        error = None
        if self.ctx.is_main:
            try:
                self.wait()
            except UserError as e:
                error = str(e)
        gathered = dist.gather_objects((mine, error))
        if gathered[0][1] is not None:
            raise UserError(gathered[0][1])
        return [m for m, _ in gathered]

    def _write(self, write, copied) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the device-to-host copies have landed
            write()
        except BaseException as e:  # handed to the training thread by wait()
            self._error = e

    def wait(self) -> None:
        """Block until this process's write is on disk; raise what it raised (rank 0 only:
        ``finish`` is the collective form)."""
        if not self._join():
            error, self._error = self._error, None
            if isinstance(error, OSError):
                raise UserError(
                    f"cannot write a checkpoint to {self.folder} ({error.strerror or error}); "
                    "free space or fix permissions there, then resume with --resume"
                ) from None
            raise error

    def _join(self) -> bool:
        """Wait for the write in flight, if any; whether every write so far succeeded."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        return self._error is None

    def close(self) -> None:
        """Let a write in flight finish (the run is ending, maybe on another error: a failed
        write is then reported, not raised over that error)."""
        try:
            self.wait()
        except Exception as e:
            console(f"distres: warning: {e}")


def _host_copy(obj):
    """obj with every tensor copied to host memory, detached from the live training state
    (which the next optimizer step changes in place). CUDA tensors go to pinned memory with
    non_blocking copies: the caller records an event and the writer waits on it."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cuda":
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return host.copy_(obj.detach(), non_blocking=True)
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj
