"""An exponential moving average of the weights (``--ema-decay``), as torchvision's and timm's
``--model-ema``: often a point or more of top-1 at no training cost.

The average lives on the training device and is updated with foreach ops (a few fused
kernels, no host sync) every ``--ema-every`` optimizer steps:
``ema = decay * ema + (1 - decay) * weights``. BatchNorm's running statistics are not
averaged but copied: they are already averages. The EMA model is a plain module (no DDP,
no compile); every rank keeps the same one, since every rank holds the same weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn


class EMA:
    def __init__(self, model: nn.Module, decay: float, every: int = 1):
        self.decay, self.every = decay, every
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self._params = list(self.module.parameters())
        self._buffers = list(self.module.buffers())

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """After optimizer step ``step`` (1-based) of ``model`` (the plain module)."""
        if step % self.every:
            return
        torch._foreach_lerp_(self._params, list(model.parameters()), 1.0 - self.decay)
        torch._foreach_copy_(self._buffers, list(model.buffers()))

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)

    def reset(self, model: nn.Module) -> None:
        """Start the average at model's current weights."""
        self.module.load_state_dict(model.state_dict())
