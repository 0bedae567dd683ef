"""The model of a run: a torchvision ResNet (with the CIFAR stem for small images) in the chosen
memory format, then ``parallelize`` wraps it for training: DDP across processes, then
``torch.compile``. ``unwrap`` and ``find_ddp`` see through those wrappers."""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from distres.errors import UserError

_BUILDERS = {
    "resnet18": torchvision.models.resnet18,
    "resnet50": torchvision.models.resnet50,
    "resnext50_32x4d": torchvision.models.resnext50_32x4d,
}


def use_cifar_stem(setting: str, image_size: int) -> bool:
    # At 32 px the ImageNet stem (7x7 stride 2 + max-pool) leaves layer4 with 1x1 maps and
    # costs several points of accuracy; a 3x3 stride-1 stem keeps the resolution.
    if setting == "auto":
        return image_size <= 64
    return setting == "on"


def build_model(arch: str, num_classes: int, cifar_stem: bool = False,
                zero_init_residual: bool = True) -> nn.Module:
    if arch not in _BUILDERS:
        raise UserError(f"unknown --arch {arch!r}; choose one of {', '.join(_BUILDERS)}")
    model = _BUILDERS[arch](weights=None, num_classes=num_classes,
                            zero_init_residual=zero_init_residual)
    if cifar_stem:
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
        model.maxpool = nn.Identity()
    return model


def memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


def prepare(model: nn.Module, device: torch.device, channels_last: bool, sync_bn: bool,
            distributed: bool) -> nn.Module:
    """Move to the device in the chosen memory format; convert BN to SyncBN when asked."""
    if sync_bn and distributed:
        if device.type != "cuda":
            raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
                            "drop --sync-bn on CPU runs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device=device, memory_format=memory_format(channels_last))


def build(cfg, num_classes: int, image_size: int, ctx) -> nn.Module:
    """The run's model, on its device, ready to load a checkpoint into."""
    model = build_model(cfg.arch, num_classes, use_cifar_stem(cfg.cifar_stem, image_size), cfg.zero_init_residual)
    return prepare(model, ctx.device, cfg.channels_last, cfg.sync_bn, ctx.distributed)


def parallelize(model: nn.Module, cfg, ctx) -> nn.Module:
    """DDP across the processes (when there are several), then torch.compile (when asked)."""
    if ctx.distributed:
        model = nn.parallel.DistributedDataParallel(
            model,
            device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
            bucket_cap_mb=cfg.bucket_cap_mb,
            # Gradients become views into the all-reduce buckets: one copy less per step.
            gradient_as_bucket_view=True,
            static_graph=cfg.static_graph,
            broadcast_buffers=cfg.broadcast_buffers,
        )
    if cfg.compile:
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)
    return model


def _layers(model: nn.Module):
    """The model and every module it wraps, outermost first (torch.compile wraps DDP)."""
    while True:
        yield model
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile (for checkpoints and evaluation)."""
    *_, plain = _layers(model)
    return plain


def find_ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    """The DDP wrapper inside model (itself, or under torch.compile), or None."""
    return next((m for m in _layers(model) if isinstance(m, nn.parallel.DistributedDataParallel)), None)
