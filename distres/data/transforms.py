"""Augmentation on uint8 CHW tensors, driven by an explicit per-sample generator.

Working on uint8 keeps worker-to-trainer traffic at a quarter of float32; the conversion to
float and the normalisation happen on the training device (see ``to_device``).
"""

from __future__ import annotations

import math

import torch
import torchvision.transforms.v2.functional as TF

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize 256 -> centre crop 224


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand((), generator=g).item()


def _maybe_flip(img: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return img.flip(-1) if torch.rand((), generator=g).item() < 0.5 else img


def pad_crop_flip(img: torch.Tensor, g: torch.Generator, size: int, pad: int = 4) -> torch.Tensor:
    """CIFAR training augmentation: zero-pad, random crop back to size, horizontal flip."""
    img = TF.pad(img, [pad]) if pad else img
    h, w = img.shape[-2:]
    top = int(torch.randint(0, h - size + 1, (), generator=g))
    left = int(torch.randint(0, w - size + 1, (), generator=g))
    return _maybe_flip(img[..., top:top + size, left:left + size], g)


def random_resized_crop_flip(img: torch.Tensor, g: torch.Generator, size: int,
                             scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """ImageNet training augmentation (torchvision's RandomResizedCrop sampling) + flip."""
    h, w = img.shape[-2:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * _uniform(g, *scale)
        aspect = math.exp(_uniform(g, *log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(torch.randint(0, h - ch + 1, (), generator=g))
            left = int(torch.randint(0, w - cw + 1, (), generator=g))
            break
    else:  # fall back to a centre crop at the nearest allowed aspect ratio
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            ch, cw = h, round(h * ratio[1])
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    img = TF.resized_crop(img, top, left, ch, cw, [size, size], antialias=True)
    return _maybe_flip(img, g)


def resize_center_crop(img: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation: shorter side to size / 0.875, centre crop size."""
    img = TF.resize(img, [round(size / EVAL_CROP_RATIO)], antialias=True)
    return TF.center_crop(img, [size, size])


def fit(img: torch.Tensor, size: int) -> torch.Tensor:
    """Evaluation for small images: only resize when the stored size differs."""
    if img.shape[-2:] == (size, size):
        return img
    return TF.center_crop(TF.resize(img, [size], antialias=True), [size, size])
