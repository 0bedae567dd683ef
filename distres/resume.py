"""How a run continues from a checkpoint: the decisions, apart from the files.

``Progress`` is the Stateful part that says where training stands (the loader's epoch and its
position in the epoch's global sample order, the order's inputs, the schedule's clock). Loading
it plans the resume: the interrupted epoch continues at the sample it had reached, restarts
when its order changed, and a run resumed with another global batch keeps its learning rate
unless --rescale-lr-on-resume asks it to follow the batch. ``FlagsRecord`` is the run's flags, kept
as every checkpoint's record; loading it refuses a resume with another --amp.

Nothing here reads the config: the checkpointer hands over the values (``checkpoint.data_order``).
"""

from __future__ import annotations

import warnings

from distres import optim
from distres.ckptformat import PROGRESS, global_batch, unpack
from distres.errors import UserError, console

# What an epoch's sample order depends on (data/sharding.py derives it from these alone). How
# each step's global batch is split over processes and micro-batches does not change it.
ORDER_KEYS = ("seed", "data", "data_dir", "repeated_aug")
SPLIT_KEYS = ("world_size", "batch_size", "grad_accum")


def order_changes(saved: dict, now: dict) -> list[str]:
    """What the epoch's order depends on and changed from the saved order to this run's."""
    return [k for k in ORDER_KEYS if saved[k] != now[k]]


def _sample(progress: dict, now: dict) -> int:
    """Where the saved epoch continues in this run: at the samples consumed, or at its start
    when its order changed."""
    return 0 if order_changes(progress["data_order"], now) else progress["samples_in_epoch"]


def resumed(saved: dict, now: dict) -> optim.Resumed:
    """Where a checkpoint (any format) stands, for ``optim.plan``; ``now``: this run's order."""
    step, parts = unpack(saved, now)
    progress = parts[PROGRESS]
    return optim.Resumed(
        step,
        progress["epoch"],
        _sample(progress, now),
        global_batch(progress["data_order"]),
        progress["schedule_axis"],
    )


def _split(order: dict) -> str:
    return f"{order['world_size']} x {order['batch_size']} x grad-accum {order['grad_accum']}"


class Progress:
    def __init__(self, loader, clock, order: dict, lr: tuple, rescale_lr: bool, announce: bool):
        self.loader, self.clock, self.order = loader, clock, order
        self.optimizer, self.scheduler = lr  # what --rescale-lr-on-resume scales
        self.rescale_lr, self.announce = rescale_lr, announce

    def state_dict(self) -> dict:
        position = self.loader.state_dict()
        return {
            "epoch": position["epoch"],
            "samples_in_epoch": position["sample"],  # of the epoch's global order, all ranks
            "step_in_epoch": position["sample"] // global_batch(self.order),  # optimizer steps done in `epoch`
            "world_size": self.order["world_size"],
            "data_order": self.order,
            "schedule_axis": self.clock.state_dict() if self.clock is not None else None,
        }

    def load_state_dict(self, progress: dict) -> None:
        """Continue at the saved position (after the optimizer and schedule are loaded: a change
        of global batch may rescale their learning rate)."""
        saved, sample = progress["data_order"], _sample(progress, self.order)
        changed = order_changes(saved, self.order)
        if changed and progress["samples_in_epoch"]:
            warnings.warn(
                f"{', '.join(changed)} changed since the checkpoint, so the order of the "
                "interrupted epoch differs: that epoch restarts from its beginning",
                stacklevel=1,
            )
        if any(saved[k] != self.order[k] for k in SPLIT_KEYS):
            self._resplit(saved, progress["epoch"], sample)
        self.loader.load_state_dict({"epoch": progress["epoch"], "sample": sample})

    def _resplit(self, saved: dict, epoch: int, sample: int) -> None:
        """Another split of the global batch continues the epoch's order at the sample it had
        reached; another global batch keeps the lr unless asked to scale it by new/old."""
        old, new = global_batch(saved), global_batch(self.order)
        line = (
            f"distres: resumed on {_split(self.order)} (global batch {new}), saved on {_split(saved)} "
            f"({old}): epoch {epoch + 1} continues at sample {sample}"
        )
        if old and new != old:
            peak = max(self.scheduler.base_lrs)
            if self.rescale_lr:
                optim.scale_lr(self.optimizer, self.scheduler, new / old)
                line += f"; lr scaled by {new}/{old} to a peak of {peak * new / old:g} (--rescale-lr-on-resume)"
            else:
                line += f"; lr kept at a peak of {peak:g} (--rescale-lr-on-resume scales it by {new}/{old})"
        if self.announce:
            console(line)


class Misfit(ValueError):
    """A checkpoint that this run's flags cannot continue from (the message follows its path)."""


class FlagsRecord:
    """The run's flags as a record (``config.TrainConfig.options``). A resume must keep fp16 or
    its absence: the GradScaler's state belongs to it (bf16, fp32 and auto share no such state)."""

    def __init__(self, record: dict):
        self.record = record

    def state_dict(self) -> dict:
        return self.record

    def load_state_dict(self, saved: dict | None) -> None:
        amp = (saved or {}).get("amp", self.record["amp"])
        if (amp == "fp16") != (self.record["amp"] == "fp16"):
            raise Misfit(f"was trained with --amp {amp}; resume with --amp {amp} or start a new --output-dir")


def misfit(path, states: dict, error: Exception) -> UserError:
    """The one-line error for a checkpoint whose parts do not load into this run."""
    if isinstance(error, Misfit):
        return UserError(f"checkpoint {path} {error}")
    saved = states.get("config") or {}
    first = (str(error).splitlines() or [type(error).__name__])[0]
    return UserError(
        f"checkpoint {path} does not fit this run (saved with --arch {saved.get('arch')} "
        f"--optimizer {saved.get('optimizer')}; {first[:120]}); resume with "
        "the settings of its config.yaml or start a new --output-dir"
    )
