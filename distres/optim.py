"""Optimizer (no weight decay on BatchNorm and bias), learning-rate schedule, loss."""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decaying BN scales and biases only shrinks them towards zero and costs accuracy
    # (Goyal et al. 2017); every 1-D parameter in a ResNet is one of those.
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def peak_lr(cfg, world_size: int) -> float:
    if cfg.lr > 0:
        return cfg.lr
    if cfg.optimizer == "sgd":  # linear scaling rule: 0.1 per 256 images
        return 0.1 * cfg.batch_size * cfg.grad_accum * world_size / 256
    return 1e-3


def build_optimizer(cfg, model: nn.Module, lr: float, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    # foreach kernels batch the per-parameter updates; fused is only for accelerators here.
    fast = {"fused": True} if device.type == "cuda" else {"foreach": True}
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **fast)
    return torch.optim.AdamW(groups, lr=lr, **fast)


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


def build_scheduler(cfg, optimizer, total_steps: int, steps_per_epoch: int):
    warmup = min(round(cfg.warmup_epochs * steps_per_epoch), max(0, total_steps - 1))
    milestones = cfg.lr_step_epochs()

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, warmup, cfg.schedule, steps_per_epoch, milestones, cfg.lr_gamma)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def build_loss(cfg) -> nn.Module:
    return nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
