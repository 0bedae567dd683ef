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
    return [{"params": params, "weight_decay": weight_decay if decay else 0.0,
             "lr": lr * (backbone_lr_scale if backbone else 1.0)}
            for (backbone, decay), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1]))]


@dataclass(frozen=True)
class Plan:
    steps_per_epoch: int  # optimizer steps
    epochs: int
    total_steps: int
    global_batch: int  # images per optimizer step, all processes
    lr: float  # peak learning rate


def plan(cfg, batches_per_epoch: int, world_size: int) -> Plan:
    """How long the run is, from --epochs / --max-steps and this rank's batches per epoch."""
    steps_per_epoch = batches_per_epoch // cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"--grad-accum {cfg.grad_accum} needs more batches than the "
                        f"{batches_per_epoch} each rank has per epoch; lower it or --batch-size")
    epochs = cfg.epochs if cfg.epochs > 0 else math.ceil(cfg.max_steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
        epochs = min(epochs, math.ceil(total_steps / steps_per_epoch))
    return Plan(steps_per_epoch, epochs, total_steps, cfg.batch_size * cfg.grad_accum * world_size,
                peak_lr(cfg, world_size))


def peak_lr(cfg, world_size: int) -> float:
    if cfg.lr > 0:
        return cfg.lr
    if cfg.optimizer == "sgd":  # linear scaling rule: 0.1 per 256 images
        return 0.1 * cfg.batch_size * cfg.grad_accum * world_size / 256
    return 1e-3


def build_optimizer(cfg, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, lr, cfg.backbone_lr_scale)
    # One fused kernel for all parameters' updates, on GPUs and CPUs alike (on the CPU, where
    # foreach falls back to a loop over tensors, it is several times faster).
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, fused=True)
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


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str,
              steps_per_epoch: int, milestones: list[int], gamma: float) -> float:
    """Multiplier of the peak lr at an optimizer step (0-based)."""
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


def build_scheduler(cfg, optimizer, plan: Plan):
    warmup = min(round(cfg.warmup_epochs * plan.steps_per_epoch), max(0, plan.total_steps - 1))
    milestones = cfg.lr_step_epochs()

    def factor(step: int) -> float:
        return lr_factor(step, plan.total_steps, warmup, cfg.schedule, plan.steps_per_epoch, milestones,
                         cfg.lr_gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(cfg) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
