"""The divergence guard: a run whose loss has become NaN or infinite stops, or rolls back to
its last good checkpoint with a lower learning rate, instead of training on and writing
non-finite weights into its checkpoints.

Reading every step's loss would make the host wait for the GPU every step. The meter already
sums the steps' losses on the device (a NaN or inf in any step stays in the sum), so the guard
looks where the host waits anyway: at log steps, at the loss the meter has just reduced across
ranks, and before every checkpoint, at the sum since the last log step and at the weights
themselves (a finite loss can be followed by a non-finite update). With fp16 a GradScaler that
keeps skipping steps (their gradients non-finite even after its scale has shrunk) counts as
diverged too. Every rank reaches the same verdict at the same step: the values checked are
reduced across ranks.
"""

from __future__ import annotations

import math

import torch

from distres import dist
from distres.errors import UserError

# From GradScaler's initial 2**16, 16 skipped steps in a row (or more, with growth between)
# bring the scale below 1: the gradients overflow fp16 even unscaled.
MIN_FP16_SCALE = 1.0


class Diverged(Exception):
    """Raised on every rank at the same step when the guard finds a non-finite value."""

    def __init__(self, what: str, step: int, lr: float):
        super().__init__(what)
        self.what, self.step, self.lr = what, step, lr


def check_logged(loss: float, scaler: torch.amp.GradScaler, step: int, lr: float) -> None:
    """At a log step: the window's loss (already reduced across ranks) and the fp16 scale."""
    if not math.isfinite(loss):
        raise Diverged(f"the training loss is {loss}", step, lr)
    if scaler.is_enabled() and scaler.get_scale() < MIN_FP16_SCALE:
        raise Diverged(f"fp16 gradients stay non-finite (GradScaler scale {scaler.get_scale():.3g})", step, lr)


def check_state(pending_loss: torch.Tensor, model: torch.nn.Module, step: int, lr: float) -> None:
    """Before a checkpoint (a collective): the loss summed since the last log step and every
    parameter and buffer of the model are finite on every rank."""
    tensors = [t for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point()]
    weights_bad = torch.zeros((), device=pending_loss.device)
    if tensors:  # a norm is non-finite when any element is (one kernel per dtype, not per tensor)
        weights_bad = (~torch.isfinite(torch.stack(torch._foreach_norm(tensors)).float())).sum().float()
    loss_bad = (~torch.isfinite(pending_loss.float())).sum().float()
    bad = dist.all_reduce_sum(torch.stack([loss_bad, weights_bad])).tolist()  # the host waits: once per checkpoint
    if bad[0] or bad[1]:
        raise Diverged(f"the {'training loss' if bad[0] else 'weights'} became non-finite", step, lr)


def give_up(err: Diverged, last_good: str | None, rollbacks: int) -> UserError:
    """The run's one-line error once it stops on a divergence."""
    where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written before it"
    tried = f" after {rollbacks} rollback{'s' * (rollbacks != 1)}" if rollbacks else ""
    return UserError(
        f"{err.what} at step {err.step} (lr {err.lr:.4g}){tried}; {where}. Resume from it with a lower "
        "--lr (or --clip-grad-norm, --warmup-epochs), or train with --on-nonfinite rollback"
    )
