"""Model construction: torchvision ResNets, the CIFAR stem, memory format, DDP, compile."""

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
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model.to(device=device, memory_format=memory_format(channels_last))


def wrap_ddp(model: nn.Module, device: torch.device, bucket_cap_mb: float,
             static_graph: bool) -> nn.Module:
    return nn.parallel.DistributedDataParallel(
        model,
        device_ids=[device.index] if device.type == "cuda" else None,
        bucket_cap_mb=bucket_cap_mb,
        # Gradients become views into the all-reduce buckets: one copy less per step.
        gradient_as_bucket_view=True,
        static_graph=static_graph,
    )


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module under DDP and/or torch.compile (for checkpoints and evaluation)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
