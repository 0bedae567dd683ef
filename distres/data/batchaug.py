"""Augmentation of whole normalised batches on the training device: random erasing
(``--random-erase``) and mixup/cutmix (``--mixup-alpha``, ``--cutmix-alpha``).

They run after the backend has normalised the batch (``base.Loader.__iter__`` calls
``BatchAugment``), so every backend, dali and synthetic included, gets them from the same code.
Random erasing follows torchvision's RandomErasing (scale 0.02-0.33, ratio 0.3-3.3, 10 attempts,
value 0 after normalisation) with each sample's draws from its augmentation seed. Mixup and
cutmix follow torchvision/timm: one lambda from Beta(alpha, alpha) per batch, each image mixed
with the next one in the batch (``roll``), one of the two per batch with p = 0.5 when both are
on, and soft targets that the loss smooths as it would hard labels. Their draws come from
(run seed, epoch, batch), counter-based: nothing to checkpoint, a resumed run redraws
them. All parameters are host numbers: mixing passes them as scalars, and the erasing boxes
of an epoch cross to the device in one asynchronous copy, so nothing makes the host wait.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distres.data.autoaug import derived_seeds
from distres.data.base import to_device
from distres.data.transforms import uniforms

ERASE_SCALE, ERASE_RATIO, ERASE_ATTEMPTS = (0.02, 0.33), (0.3, 3.3), 10
_MASK63 = 0x7FFF_FFFF_FFFF_FFFF
_MIX_SALT = 0x5EED_B17C
_CHUNK = 1 << 16


def erase_boxes(seeds: np.ndarray, height: int, width: int, p: float) -> np.ndarray:
    """B x 4 int64 (top, left, height, width) of each sample's erased box; height 0: none."""
    u = uniforms(derived_seeds(seeds, "erase"), 1 + 4 * ERASE_ATTEMPTS)
    us, ur, ut, ul = (u[:, 1 + k * ERASE_ATTEMPTS : 1 + (k + 1) * ERASE_ATTEMPTS] for k in range(4))
    area = height * width * (ERASE_SCALE[0] + (ERASE_SCALE[1] - ERASE_SCALE[0]) * us)
    lo, hi = math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1])
    aspect = np.exp(lo + (hi - lo) * ur)
    h, w = np.rint(np.sqrt(area * aspect)), np.rint(np.sqrt(area / aspect))
    ok = (h < height) & (w < width)
    pick = ok.argmax(axis=1)[:, None]  # the first attempt that fits, as torchvision
    h, w = np.take_along_axis(h, pick, 1)[:, 0], np.take_along_axis(w, pick, 1)[:, 0]
    top = np.floor(np.take_along_axis(ut, pick, 1)[:, 0] * (height - h + 1))
    left = np.floor(np.take_along_axis(ul, pick, 1)[:, 0] * (width - w + 1))
    keep = ok.any(axis=1) & (u[:, 0] < p)
    return np.stack([top, left, np.where(keep, h, 0), w], 1).astype(np.int64)


def erase(images: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Zero each image's box (``erase_boxes``, on images' device), all in one masked fill."""
    top, left, h, w = boxes.T
    rows = torch.arange(images.shape[-2], device=images.device)
    cols = torch.arange(images.shape[-1], device=images.device)
    inside_r = (rows >= top[:, None]) & (rows < (top + h)[:, None])  # B x H
    inside_c = (cols >= left[:, None]) & (cols < (left + w)[:, None])  # B x W
    return images.masked_fill_((inside_r[:, :, None] & inside_c[:, None, :])[:, None], 0.0)


def batch_rng(seed: int, epoch: int, batch: int) -> np.random.Generator:
    """The mixing draws of one batch: a Philox stream keyed by (seed, epoch, batch), ``batch``
    the batch's key in the epoch (``ShardSampler.batch_key``: distinct for every rank's batch,
    and the same for the same images whatever the split of the global batch)."""
    key = np.random.SeedSequence([seed & _MASK63, epoch, batch, _MIX_SALT])
    return np.random.Generator(np.random.Philox(key))


def soft_targets(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    # scatter_, not one_hot: one_hot checks the labels' range on the host on some devices.
    return torch.zeros(len(labels), num_classes, device=labels.device).scatter_(1, labels[:, None], 1.0)


def mix(
    images: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    rng: np.random.Generator,
    mixup_alpha: float,
    cutmix_alpha: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or cutmix of a batch with itself rolled by one; returns (images, soft targets)."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix_alpha, cutmix_alpha) if use_cutmix else rng.beta(mixup_alpha, mixup_alpha))
    partner = images.roll(1, 0)
    if use_cutmix:
        height, width = images.shape[-2:]
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        half_h, half_w = int(0.5 * height * math.sqrt(1 - lam)), int(0.5 * width * math.sqrt(1 - lam))
        y0, y1 = max(cy - half_h, 0), min(cy + half_h, height)
        x0, x1 = max(cx - half_w, 0), min(cx + half_w, width)
        images[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (height * width)  # the share of the image actually kept
    else:
        images = images.mul_(lam).add_(partner, alpha=1.0 - lam)
    targets = soft_targets(labels, num_classes)
    return images, targets.roll(1, 0).mul_(1.0 - lam).add_(targets, alpha=lam)


class BatchAugment:
    """What a training loader applies to each normalised batch (None in ``Spec`` when all off).
    ``start_epoch`` takes the epoch's sample seeds; the erasing boxes of the whole epoch then go
    to the device in one copy, at its first batch (when the image size is known)."""

    def __init__(self, random_erase: float, mixup_alpha: float, cutmix_alpha: float, num_classes: int, seed: int):
        self.p, self.mixup_alpha, self.cutmix_alpha = random_erase, mixup_alpha, cutmix_alpha
        self.num_classes, self.seed = num_classes, seed
        self.epoch, self.seeds, self.boxes = 0, np.zeros(0, dtype=np.uint64), None

    @classmethod
    def from_config(cls, augment, num_classes: int, seed: int) -> BatchAugment | None:
        """From the augment section; None when it asks for no batch-level augmentation."""
        if augment.random_erase <= 0 and augment.mixup_alpha <= 0 and augment.cutmix_alpha <= 0:
            return None
        return cls(augment.random_erase, augment.mixup_alpha, augment.cutmix_alpha, num_classes, seed)

    def start_epoch(self, epoch: int, seeds: np.ndarray) -> None:
        """``seeds``: the augmentation seeds of this rank's samples of the epoch, in order."""
        self.epoch, self.seeds, self.boxes = epoch, seeds, None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, batch: int, rows: slice):
        """The batch whose key is ``batch`` (``ShardSampler.batch_key``), its samples ``rows`` of the
        epoch's seeds."""
        if self.p > 0:
            if self.boxes is None:
                # In chunks: the draws of a whole ImageNet epoch at once would take gigabytes.
                boxes = np.concatenate(
                    [
                        erase_boxes(self.seeds[k : k + _CHUNK], *images.shape[-2:], self.p)
                        for k in range(0, len(self.seeds), _CHUNK)
                    ]
                )
                self.boxes = to_device(torch.from_numpy(boxes), images.device)
            images = erase(images, self.boxes[rows])
        if self.mixup_alpha > 0 or self.cutmix_alpha > 0:
            rng = batch_rng(self.seed, self.epoch, batch)
            images, labels = mix(images, labels, self.num_classes, rng, self.mixup_alpha, self.cutmix_alpha)
        return images, labels
