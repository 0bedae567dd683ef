"""The random number generators' state (Python, NumPy, torch, this rank's CUDA device), as a
Stateful part of a checkpoint: each rank saves and restores its own."""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state(device: torch.device | None = None) -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],  # lists: weights_only loads them
        "torch": torch.get_rng_state(),
        # This rank's GPU only: the job may resume on nodes where each process sees a different
        # number of GPUs. A CPU rank never asks CUDA (that alone would create a CUDA context).
        "cuda": [torch.cuda.get_rng_state(device)] if device is not None and device.type == "cuda" else [],
    }


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"][0], device)


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


class RngState:
    """This process's generators. ``per_rank``: the checkpointer keeps one state per rank."""

    per_rank = True

    def __init__(self, device: torch.device | None = None):
        self.device = device

    def state_dict(self) -> dict:
        return rng_state(self.device)

    def load_state_dict(self, state: dict) -> None:
        set_rng_state(state, self.device)
