"""The training state's checkpoints: which one a run starts from, and the state stored into and
restored from it as named Stateful parts.

Every part of the state has ``state_dict``/``load_state_dict`` (torch's objects have them; the
RNG, the position in the data and the run's record are small wrappers): ``TrainingState.parts``
names them, and the ``Checkpointer`` stores and restores that mapping without knowing what is
inside a part. The file layout and older formats are ``ckptformat``'s, the files ``ckptio``'s,
the background write ``ckptwriter``'s, and what a resume decides (the data position, the lr
after a change of global batch) ``resume``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
import torch.nn as nn

from distres import ckptformat, ckptio, dist, resume
from distres.ckptio import BEST, LAST, atomic_save, load, load_latest, save, step_checkpoints
from distres.ckptwriter import BackgroundWriter
from distres.data.isolate import Excluded
from distres.errors import UserError, console
from distres.optim import Resumed
from distres.rng import RngState, rng_state, set_rng_state

# The file layer and the RNG, for callers that know checkpoints by this module's name.
__all__ = [
    "BEST",
    "LAST",
    "Checkpointer",
    "Record",
    "Stateful",
    "TrainingState",
    "atomic_save",
    "data_order",
    "load",
    "load_latest",
    "resumed_position",
    "rng_state",
    "save",
    "set_rng_state",
    "step_checkpoints",
]


class Stateful(Protocol):
    def state_dict(self): ...

    def load_state_dict(self, state) -> None: ...


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


def resumed_position(state: dict, cfg, world_size: int) -> Resumed:
    """Where a saved state (any format) stands, for ``optim.plan``, in a run with these flags."""
    return resume.resumed(state, data_order(cfg, world_size))


@dataclass(frozen=True)
class Settings:
    """What the parts of a checkpoint take from the run's flags and process."""

    record: dict  # the flags (config.TrainConfig.options), kept in every checkpoint
    order: dict  # data_order: what the epoch's sample order depends on, and its split
    rescale_lr: bool  # --rescale-lr-on-resume
    device: torch.device
    announce: bool  # this process prints (rank 0)


class Record:
    """A value kept in the checkpoint as it is, for its readers (the model's description for
    evaluate, predict and export); a resumed run describes its own model afresh."""

    def __init__(self, value):
        self.value = value

    def state_dict(self):
        return self.value

    def load_state_dict(self, state) -> None:
        pass


class _Ema:
    """The EMA of the weights; from a checkpoint without one, it starts at the loaded weights."""

    def __init__(self, ema, model: nn.Module, announce: bool):
        self.ema, self.model, self.announce = ema, model, announce

    def state_dict(self) -> dict:
        return self.ema.state_dict()

    def load_state_dict(self, state: dict | None) -> None:
        if state is not None:
            self.ema.load_state_dict(state)
            return
        self.ema.reset(self.model)
        if self.announce:
            console("distres: the checkpoint has no EMA; the EMA starts from its weights")


@dataclass
class TrainingState:
    """What a run trains and a checkpoint restores: the plain model (not its DDP or compile
    wrapper), optimizer, lr schedule, GradScaler, the training loader, whose position is where
    training stands within an epoch, and the EMA of the weights. ``meta`` (the model's
    description, ``models.describe``) is written into every checkpoint for evaluate, predict
    and export."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    scaler: torch.amp.GradScaler
    loader: object  # data.Loader
    meta: dict | None = None
    ema: object = None  # ema.EMA, or None without --ema-decay
    clock: object = None  # optim.ScheduleClock, the lr schedule's clock

    def parts(self, s: Settings) -> dict[str, Stateful | None]:
        """The named parts, in the order they load: the record first (it refuses a misfit
        before anything changes), the model before its EMA (which may start from it), the
        progress last (a change of global batch may rescale the optimizer's and schedule's lr)."""
        return {
            "config": resume.FlagsRecord(s.record),
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": self.scaler,
            "ema": _Ema(self.ema, self.model, s.announce) if self.ema is not None else None,
            "rng": RngState(s.device),
            "meta": Record(self.meta),
            "excluded": Excluded(),  # the files that crashed a decoder
            ckptformat.PROGRESS: resume.Progress(
                self.loader, self.clock, s.order, (self.optimizer, self.scheduler), s.rescale_lr, s.announce
            ),
        }


def _per_rank(part) -> bool:
    return getattr(part, "per_rank", False)


class Checkpointer:
    """At start, finds the checkpoint to resume from (the newest one after a restart or requeue,
    the one --resume names, or none, refusing to overwrite an earlier run). ``restore`` loads it
    into the run's parts and returns the step to continue at; ``save`` writes them (rank 0, in
    the background: ``ckptwriter``); ``wait`` and ``close`` end the writing.

    A part that is None is saved as None and not loaded. A ``per_rank`` part is saved once per
    rank; a job resumed on more processes gives the extra ranks the last saved rank's state."""

    def __init__(self, cfg, ctx, folder: Path):
        self.ctx, self.folder = ctx, folder
        self.cfg = cfg
        if folder.parent.exists() and not folder.parent.is_dir():
            raise UserError(f"--output-dir {folder.parent} is a file, not a folder; choose another --output-dir")
        if ctx.is_main:
            ckptio.remove_partial(folder)
        self.writer = BackgroundWriter(ctx, folder)
        self.found = self._find()  # (state, path) to resume from, or None
        # A resume that found no checkpoint still continues the output directory (the logger
        # drops the records of an attempt that died before its first checkpoint).
        self.resume_step: int | None = 0 if self._resume is not None or ctx.restart > 0 else None
        # rank 0 alone decides what to write to best.pt
        self.best_top1 = ckptio.best_top1(folder) if self.resume_step is not None and ctx.is_main else None
        self.last_saved: Path | None = None  # the newest checkpoint of this run, once written or resumed from

    @property
    def cfg(self):
        return self._cfg

    @cfg.setter
    def cfg(self, cfg) -> None:
        """The run's flags: the one place the checkpointer reads them. Autotune hands over its
        tuned flags here, before anything is saved (they are the checkpoints' record)."""
        self._cfg = cfg
        self._resume, self._keep = cfg.checkpoint.resume, cfg.checkpoint.keep_checkpoints
        self.settings = Settings(
            cfg.options(),
            data_order(cfg, self.ctx.world_size),
            cfg.checkpoint.rescale_lr_on_resume,
            self.ctx.device,
            self.ctx.is_main,
        )

    def _find(self) -> tuple[dict, Path] | None:
        resume_from = self._resume
        if self.ctx.restart > 0:
            # torchrun --max-restarts restarted the workers, or SLURM requeued the job, with the
            # original command line: continue from this run's newest checkpoint, also when that
            # command line named an older one with --resume PATH (the first attempt's start).
            found = ckptio.load_latest(self.folder)
            if found is not None:
                return found
            resume_from = resume_from or "latest"
        if resume_from is None:
            if ckptio.holds_checkpoints(self.folder):
                raise UserError(
                    f"{self.folder} already holds checkpoints; pass --resume to continue that run "
                    "or choose a new --output-dir"
                )
            return None
        if resume_from == "latest":
            found = ckptio.load_latest(self.folder)
            if found is None and self.ctx.is_main:
                console(f"distres: no checkpoint in {self.folder}; starting from scratch")
            return found
        return ckptio.load(Path(resume_from)), Path(resume_from)

    def _named(self, state: TrainingState | Mapping[str, Stateful | None]) -> Mapping[str, Stateful | None]:
        return state.parts(self.settings) if isinstance(state, TrainingState) else state

    def restore(self, state: TrainingState | Mapping[str, Stateful | None]) -> int:
        """Load the found checkpoint into the state's parts; the optimizer step to continue at."""
        step = 0
        if self.found is not None:
            saved, path = self.found
            step, epoch = self._load(self._named(state), saved, path)
            self.resume_step, self.last_saved = step, path
            self.ctx.say(f"distres: resumed from {path} at step {step} (epoch {epoch + 1})")
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

    def _load(self, parts: Mapping[str, Stateful | None], saved: dict, path: Path) -> tuple[int, int]:
        """Each part's saved state into it, in the mapping's order; (step, epoch) saved."""
        step, states = ckptformat.unpack(saved, self.settings.order)
        for name, part in parts.items():
            if part is None:
                continue
            entry = states.get(name)
            if _per_rank(part) and entry is not None:  # (None: a file from before the part)
                entry = entry[min(self.ctx.rank, len(entry) - 1)]
            try:
                part.load_state_dict(entry)
            except (resume.Misfit, RuntimeError, ValueError, KeyError) as e:
                raise resume.misfit(path, states, e) from None
        return step, ckptformat.epoch(states)

    def roll_back(self, state: TrainingState | Mapping[str, Stateful | None]) -> int:
        """Load this run's newest checkpoint into the state again (a collective: every write has
        ended first); the step it holds."""
        self.wait()
        path = self.last_saved
        self.found = ckptio.load(path), path
        return self.restore(state)

    def save(self, state: TrainingState | Mapping[str, Stateful | None], step: int) -> None:
        """Write the state after optimizer step ``step``. A collective: every rank calls it (the
        per-rank parts are gathered); rank 0 writes in the background, and the next ``save`` or
        ``wait`` raises on every rank what that write raised."""
        parts = self._named(state)
        everyone = self.writer.gather({n: p.state_dict() for n, p in parts.items() if _per_rank(p)})
        self.last_saved = ckptio.step_path(self.folder, step)  # (on every rank: roll_back reads it)
        if not self.ctx.is_main:
            return
        states = {
            n: [mine[n] for mine in everyone] if _per_rank(p) else (p.state_dict() if p is not None else None)
            for n, p in parts.items()
        }
        self.writer.submit(ckptformat.pack(step, states), lambda file: ckptio.save(file, self.folder, step, self._keep))

    def save_best(self, weights: dict, meta: dict, record: dict) -> bool:
        """Keep ``weights`` as best.pt when ``record["top1"]`` beats the best so far (rank 0
        writes it in the background, as ``save``; its failure surfaces there). Whether it did."""
        if not self.ctx.is_main or (self.best_top1 is not None and record["top1"] <= self.best_top1):
            return False
        best = ckptformat.best(weights, meta, record, self.settings.record)
        if not self.writer.submit(best, lambda file: ckptio.save_best(file, self.folder)):
            return False  # an earlier write failed: the next collective raises its error
        self.best_top1 = record["top1"]
        return True

    def wait(self) -> None:
        """Wait until the last checkpoint is on disk; raise its failure on every rank. A
        collective."""
        self.writer.wait()

    def close(self) -> None:
        """Let a write in flight finish (the run is ending, maybe on another error: a failed
        write is then reported, not raised over that error)."""
        self.writer.close()
