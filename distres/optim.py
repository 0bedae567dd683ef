"""The run's plan (steps, epochs, global batch, peak lr), the optimizer (no weight decay on
BatchNorm and bias), the learning-rate schedule and the loss."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from distres.errors import UserError
from distres.weights import HEAD


def param_groups(model: nn.Module, weight_decay: float, lr: float, backbone_lr_scale: float = 1.0) -> list[dict]:
    # Decaying BN scales and biases only shrinks them towards zero and costs accuracy
    # (Goyal et al. 2017); every 1-D parameter in a ResNet is one of those.
    groups = {}  # (backbone?, decay?) -> parameters
    split = backbone_lr_scale != 1.0  # fine-tuning: the pretrained layers move more slowly than the head
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((split and not name.startswith(HEAD), p.ndim > 1), []).append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "lr": lr * (backbone_lr_scale if backbone else 1.0),
        }
        for (backbone, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))
    ]


@dataclass(frozen=True)
class ScheduleClock:
    """The lr schedule's clock: optimizer steps of the run's first global batch ``global_batch``.

    A run resumed with another global batch takes steps of another size; from its resume step
    ``base_step`` on, each step advances the clock by new/first global batch, so the schedule
    still ends with the last epoch. A run that never changed its global batch has ratio 1 and
    base 0: the clock is the step count itself."""

    global_batch: int  # the run's first
    base_step: int = 0
    base: float = 0.0
    ratio: float = 1.0

    def __call__(self, step: int) -> float:
        if self.ratio == 1.0 and self.base_step == 0:
            return step
        return self.base + (step - self.base_step) * self.ratio

    def step_at(self, clock: float) -> int:
        """The first step at which the clock reaches ``clock``."""
        if self.ratio == 1.0 and self.base_step == 0:
            return int(clock)
        return self.base_step + max(0, math.ceil((clock - self.base) / self.ratio - 1e-9))

    def state_dict(self) -> dict:
        return {"global_batch": self.global_batch, "base_step": self.base_step, "base": self.base}


@dataclass(frozen=True)
class Plan:
    steps_per_epoch: int  # optimizer steps
    epochs: int
    total_steps: int
    global_batch: int  # images per optimizer step, all processes
    lr: float  # peak learning rate
    clock: ScheduleClock  # the schedule's clock
    schedule_steps: tuple[int, int]  # (steps per epoch, total steps) on the clock


@dataclass(frozen=True)
class Resumed:
    """What ``plan`` needs from the checkpoint a run resumes from."""

    step: int
    epoch: int
    sample: int  # samples of ``epoch``'s order consumed
    global_batch: int  # the checkpoint's
    clock: dict | None  # its ScheduleClock.state_dict(); None: saved before there was one


def _horizon(opt, num_samples: int, global_batch: int) -> tuple[int, int, int]:
    """(steps per epoch, epochs, total steps) of a run over num_samples at this global batch."""
    steps_per_epoch = num_samples // global_batch
    epochs = opt.epochs if opt.epochs > 0 else math.ceil(opt.max_steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    if opt.max_steps > 0:
        total_steps = min(total_steps, opt.max_steps)
        epochs = min(epochs, math.ceil(total_steps / steps_per_epoch))
    return steps_per_epoch, epochs, total_steps


def plan(opt, num_samples: int, world_size: int, resumed: Resumed | None = None) -> Plan:
    """How long the run is, from --epochs / --max-steps and the samples of an epoch. The horizon
    (epochs, --max-steps, the schedule's length) is counted on the schedule's clock, in steps
    of the run's first global batch; a run resumed with another one finishes it at the new size,
    its steps left counted from the samples left."""
    micro = opt.batch_size * world_size
    batches = num_samples // micro
    if batches // opt.grad_accum == 0:
        raise UserError(
            f"--grad-accum {opt.grad_accum} needs more batches than the "
            f"{batches} each rank has per epoch; lower it or --batch-size"
        )
    global_batch = micro * opt.grad_accum
    clock = ScheduleClock(global_batch)
    if resumed is not None:
        then = ScheduleClock(**resumed.clock) if resumed.clock else ScheduleClock(resumed.global_batch)
        then = ScheduleClock(then.global_batch, then.base_step, then.base, resumed.global_batch / then.global_batch)
        clock = (
            then
            if resumed.global_batch == global_batch
            else ScheduleClock(
                then.global_batch, resumed.step, float(then(resumed.step)), global_batch / then.global_batch
            )
        )
    first_per_epoch, epochs, first_total = _horizon(opt, num_samples, clock.global_batch)
    steps_per_epoch = num_samples // global_batch
    total_steps = first_total
    if resumed is not None:
        left = 0
        if resumed.epoch < epochs:
            left = max(0, num_samples - resumed.sample) // global_batch + (epochs - resumed.epoch - 1) * steps_per_epoch
        total_steps = resumed.step + left
        if opt.max_steps > 0:
            total_steps = min(total_steps, clock.step_at(first_total))
    return Plan(
        steps_per_epoch,
        epochs,
        total_steps,
        global_batch,
        peak_lr(opt, world_size),
        clock,
        (first_per_epoch, first_total),
    )


def peak_lr(opt, world_size: int) -> float:
    if opt.lr > 0:
        return opt.lr
    if opt.optimizer == "sgd":  # linear scaling rule: 0.1 per 256 images
        return 0.1 * opt.batch_size * opt.grad_accum * world_size / 256
    return 1e-3


def build_optimizer(opt, model: nn.Module, lr: float, backbone_lr_scale: float = 1.0) -> torch.optim.Optimizer:
    groups = param_groups(model, opt.weight_decay, lr, backbone_lr_scale)
    # One fused kernel for all parameters' updates, on GPUs and CPUs alike (on the CPU, where
    # foreach falls back to a loop over tensors, it is several times faster).
    if opt.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=opt.momentum, nesterov=opt.nesterov, fused=True)
    return torch.optim.AdamW(groups, lr=lr, fused=True)


def init_momentum(optimizer: torch.optim.Optimizer) -> None:
    """Give every parameter an SGD momentum buffer: zeros, with which the first step sets the
    buffer to the gradient, exactly as SGD's own first step does. Fused SGD cannot step a mix
    of parameters with and without one, which a head trained alone leaves behind."""
    if not isinstance(optimizer, torch.optim.SGD) or not optimizer.defaults["momentum"]:
        return
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state[p]
            if state.get("momentum_buffer") is None:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def scale_lr(optimizer: torch.optim.Optimizer, scheduler, factor: float) -> None:
    """Multiply the learning rate by ``factor`` from now on: the schedule's peak (``base_lrs``,
    which every later step scales) and each group's current lr (which the optimizer's next step
    uses before the schedule steps again)."""
    scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
    for group in optimizer.param_groups:
        group["lr"] *= factor


def lr_factor(
    step: float,
    total_steps: int,
    warmup_steps: int,
    schedule: str,
    steps_per_epoch: int,
    milestones: list[int],
    gamma: float,
) -> float:
    """Multiplier of the peak lr at an optimizer step (0-based; on the ``ScheduleClock`` clock, which
    is fractional after a change of global batch)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "step":
        epoch = step // max(1, steps_per_epoch)
        return gamma ** sum(epoch >= m for m in milestones)
    return 1.0


def build_scheduler(opt, optimizer, plan: Plan):
    per_epoch, total = plan.schedule_steps
    warmup = min(round(opt.warmup_epochs * per_epoch), max(0, total - 1))
    milestones = opt.lr_step_epochs

    def factor(step: int) -> float:
        return lr_factor(plan.clock(step), total, warmup, opt.schedule, per_epoch, milestones, opt.lr_gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(opt) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=opt.label_smoothing)
