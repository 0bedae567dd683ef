"""The layout of a checkpoint file, and the upgrade of older ones to it.

A training-state file holds ``format``, ``step``, the entries of the ``progress`` part at the top
level (epoch, position in the epoch, the data order: where people and scripts look for them),
and every other named part's state under its name: model, optimizer, scheduler, scaler, ema,
rng (one entry per rank), config and meta (the record that evaluate, predict and export read).
``best.pt`` holds weights and that record only.

Formats: 1 kept rank 0's RNG state alone and no data order but the world size; 2 keeps every
rank's RNG state and the order. Within 2, the earliest files counted the position in optimizer
steps only (no ``samples_in_epoch``) and predate ``--repeated-aug`` in the order.
"""

from __future__ import annotations

FORMAT = 2

PROGRESS = "progress"
PROGRESS_KEYS = ("epoch", "samples_in_epoch", "step_in_epoch", "world_size", "data_order", "schedule_axis")


def global_batch(order: dict) -> int:
    return order["batch_size"] * order["grad_accum"] * order["world_size"]


def upgrade(saved: dict, order: dict) -> dict:
    """Any saved training state in the current format. ``order`` (this run's ``data_order``)
    stands in for what format 1 did not record, taken as unchanged but for the world size."""
    state = dict(saved)
    if isinstance(state.get("rng"), dict):
        state["rng"] = [state["rng"]]
    state["world_size"] = state.get("world_size", 1)
    state["data_order"] = {
        **order,
        "world_size": state["world_size"],
        "repeated_aug": 1,  # (there was no --repeated-aug yet)
        **state.get("data_order", {}),
    }
    if state.get("samples_in_epoch") is None:
        state["samples_in_epoch"] = state["step_in_epoch"] * global_batch(state["data_order"])
    state.setdefault("schedule_axis", None)
    state["format"] = FORMAT
    return state


def pack(step: int, states: dict) -> dict:
    """The file for the named parts' states after optimizer step ``step``."""
    parts = dict(states)
    return {"format": FORMAT, "step": step, **parts.pop(PROGRESS, {}), **parts}


def unpack(saved: dict, order: dict) -> tuple[int, dict]:
    """(step, the named parts' states) of a file of any format (see ``upgrade`` for order)."""
    parts = upgrade(saved, order)
    progress = {k: parts.pop(k) for k in PROGRESS_KEYS}
    del parts["format"]
    return parts.pop("step"), {**parts, PROGRESS: progress}


def epoch(states: dict) -> int:
    """The epoch a checkpoint's ``unpack``ed states stand in."""
    return states[PROGRESS]["epoch"]


def best(weights: dict, meta: dict | None, record: dict, config: dict) -> dict:
    """The file of the best weights so far; ``record`` says when and how good (``top1``)."""
    return {"format": FORMAT, "model": weights, "meta": meta, "best": record, "config": config}
