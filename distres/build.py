"""What a training step needs, built one way for a training run and for an autotune trial.

``build_parts`` makes the data loaders, the model (unwrapped: a run restores a checkpoint into it
before DDP wraps it), the step plan, the optimizer, the precision policy and the loss. A tuning
trial that timed anything else than the run it tunes would tune the wrong thing, so both go
through here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from distres import data, engine, models, optim


@dataclass
class Parts:
    bundle: data.DataBundle
    net: nn.Module  # the plain model: DDP and torch.compile wrap it later (models.parallelize)
    plan: optim.Plan
    optimizer: torch.optim.Optimizer
    precision: engine.Precision
    loss_fn: nn.Module


def build_parts(cfg, ctx, pretrained=None, resumed: optim.Resumed | None = None) -> Parts:
    """``pretrained``: the starting weights (``weights.resolve``), whose normalisation the data
    then uses; ``resumed``: where a resumed run's checkpoint left the data order."""
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank (DDP also broadcasts)
    stats = (pretrained.mean, pretrained.std) if pretrained else None
    bundle = data.build(cfg, ctx, models.memory_format(cfg.model.channels_last), stats=stats)
    net = models.build(cfg, bundle.classes, bundle.image_size, ctx, pretrained)
    plan = optim.plan(cfg.optim, bundle.train.num_samples, ctx.world_size, resumed)
    optimizer = optim.build_optimizer(cfg.optim, net, plan.lr, cfg.finetune.backbone_lr_scale)
    return Parts(bundle, net, plan, optimizer, engine.Precision(cfg.optim.amp, ctx.device), optim.build_loss(cfg.optim))
