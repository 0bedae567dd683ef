"""Augmentation: where the random numbers come from, and the crops on uint8 CHW tensors.

The random parameters of every sample (crop box, flip) are a pure function of its
augmentation seed from ``sharding.sample_seeds``, computed for a whole batch at once with
numpy. The torch, gpu and dali backends all draw them here, so for the same (seed, epoch,
index) they cut the same box; a resumed run draws exactly what the uninterrupted one did.

Working on uint8 keeps worker-to-trainer traffic at a quarter of float32; the conversion to
float and the normalisation happen on the training device (see ``base.Normalize``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EVAL_CROP_RATIO = 0.875  # resize 256 -> centre crop 224
SMALL_IMAGES = 64  # at or below this size: CIFAR-style pad-crop-flip instead of RandomResizedCrop
RRC_SCALE, RRC_RATIO, RRC_ATTEMPTS = (0.08, 1.0), (3 / 4, 4 / 3), 10


def uniforms(seeds: np.ndarray, n: int) -> np.ndarray:
    """(len(seeds), n) floats in [0, 1): n independent streams of each sample seed.

    splitmix64 of (seed, stream) is a counter-based generator: no state to carry between
    samples, and fast to vectorise (uint64 arithmetic wraps, as the hash expects)."""
    z = np.asarray(seeds, dtype=np.uint64)[:, None] * np.uint64(n) + np.arange(n, dtype=np.uint64)
    z = (z + np.uint64(1)) * np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class Boxes:
    """Per-sample crop windows in source pixels (int64 arrays) and horizontal flips.

    A window may reach past the image (pad-crop): the outside is zero."""

    top: np.ndarray
    left: np.ndarray
    height: np.ndarray
    width: np.ndarray
    flip: np.ndarray

    def __getitem__(self, i: int) -> tuple[int, int, int, int, bool]:
        return (int(self.top[i]), int(self.left[i]), int(self.height[i]), int(self.width[i]), bool(self.flip[i]))


def pad_crop_boxes(seeds: np.ndarray, size: int, pad: int, flip: bool = True) -> Boxes:
    """CIFAR training augmentation on a size x size image: zero-pad, random crop, flip
    (``flip=False``: never, e.g. for digits; the crops stay those of the same seeds)."""
    u = uniforms(seeds, 3)
    offsets = np.floor(u[:, :2] * (2 * pad + 1)).astype(np.int64) - pad
    full = np.full(len(u), size, dtype=np.int64)
    return Boxes(offsets[:, 0], offsets[:, 1], full, full.copy(), (u[:, 2] < 0.5) & flip)


def rrc_boxes(seeds: np.ndarray, heights: np.ndarray, widths: np.ndarray, flip: bool = True) -> Boxes:
    """ImageNet training augmentation: torchvision's RandomResizedCrop sampling (10 attempts
    at a random area and aspect ratio, else a centre crop) for a batch, + flip (unless not ``flip``)."""
    h = np.asarray(heights, dtype=np.float64)[:, None]
    w = np.asarray(widths, dtype=np.float64)[:, None]
    u = uniforms(seeds, 4 * RRC_ATTEMPTS + 1)
    us, ur, ut, ul = (u[:, k * RRC_ATTEMPTS : (k + 1) * RRC_ATTEMPTS] for k in range(4))
    target = h * w * (RRC_SCALE[0] + (RRC_SCALE[1] - RRC_SCALE[0]) * us)
    lo, hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    aspect = np.exp(lo + (hi - lo) * ur)
    cw, ch = np.rint(np.sqrt(target * aspect)), np.rint(np.sqrt(target / aspect))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    pick = ok.argmax(axis=1)[:, None]  # the first attempt that fits
    cw, ch = np.take_along_axis(cw, pick, 1), np.take_along_axis(ch, pick, 1)
    top = np.floor(np.take_along_axis(ut, pick, 1) * (h - ch + 1))
    left = np.floor(np.take_along_axis(ul, pick, 1) * (w - cw + 1))
    # No attempt fitted: a centre crop at the nearest allowed aspect ratio (as torchvision).
    ratio = w / h
    fw = np.where(ratio < RRC_RATIO[0], w, np.where(ratio > RRC_RATIO[1], np.rint(h * RRC_RATIO[1]), w))
    fh = np.where(ratio < RRC_RATIO[0], np.rint(w / RRC_RATIO[0]), h)
    found = ok.any(axis=1, keepdims=True)
    cw, ch = np.where(found, cw, fw), np.where(found, ch, fh)
    top = np.where(found, top, (h - ch) // 2)
    left = np.where(found, left, (w - cw) // 2)

    def as_int(a):
        return a[:, 0].astype(np.int64)

    return Boxes(as_int(top), as_int(left), as_int(ch), as_int(cw), (u[:, -1] < 0.5) & flip)


def resized_crop_flip(img: torch.Tensor, box: tuple[int, int, int, int, bool], size: int) -> torch.Tensor:
    """Cut one (RandomResizedCrop) box out of a CHW image, resize it to size x size, maybe flip."""
    top, left, h, w, flip = box
    img = TF.resized_crop(img, top, left, h, w, [size, size], antialias=True)
    return img.flip(-1) if flip else img


def pad_crop_params(boxes: Boxes) -> torch.Tensor:
    """The pad-crop boxes as one 3 x B int64 tensor (top, left, flip) for ``gather_pad_crops``."""
    return torch.from_numpy(np.stack([boxes.top, boxes.left, boxes.flip.astype(np.int64)]))


def gather_pad_crops(
    padded: torch.Tensor, index: torch.Tensor, params: torch.Tensor, size: int, pad: int
) -> torch.Tensor:
    """The pad-crop boxes of a whole batch in one gather, on any device. ``padded`` is
    N x H x W x C, every image already inside a ``pad``-pixel zero border; ``index`` picks the
    batch's images and ``params`` (``pad_crop_params``, on padded's device) their boxes.
    Returns B x S x S x C, the columns reversed for the flipped images."""
    top, left, flip = params
    steps = torch.arange(size, device=padded.device)
    rows = (top + pad)[:, None] + steps  # B x S source rows
    cols = (left + pad)[:, None] + steps
    cols = torch.where(flip[:, None].bool(), cols.flip(1), cols)
    return padded[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def pad_nhwc(images: torch.Tensor, pad: int) -> torch.Tensor:
    """A zero border of ``pad`` pixels around N x H x W x C images."""
    return torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))


def pad_for(size: int) -> int:
    return max(1, size // 8)  # 4 px at CIFAR's 32


def train_boxes(seeds: np.ndarray, sizes: np.ndarray, size: int, flip: bool = True) -> Boxes:
    """The training boxes of a batch; ``sizes`` is (B, 2) of (height, width) of the images
    the boxes apply to (for small images: after ``resize_center_crop``)."""
    if size <= SMALL_IMAGES:
        return pad_crop_boxes(seeds, size, pad_for(size), flip)
    return rrc_boxes(seeds, sizes[:, 0], sizes[:, 1], flip)


def eval_size(size: int, resize: int = 0) -> int:
    """Evaluation resizes the shorter side to this, then centre-crops size: ``resize`` when
    given (--eval-resize), else size / 0.875 (size itself for small images)."""
    if resize:
        return resize
    return size if size <= SMALL_IMAGES else round(size / EVAL_CROP_RATIO)


def fit_geometry(sizes: np.ndarray, size: int, resize: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """What ``resize_center_crop`` does to images of these (height, width) rows, as numbers
    (for backends that cannot call it): the resized (height, width), with torchvision's
    rounding, and the centre crop's (top, left)."""
    h, w = sizes[:, 0].astype(np.float64), sizes[:, 1].astype(np.float64)
    s = eval_size(size, resize)
    new_long = (s * np.maximum(h, w) / np.minimum(h, w)).astype(np.int64)
    new_h = np.where(w <= h, new_long, s)
    new_w = np.where(w <= h, s, new_long)
    top, left = np.round((new_h - size) / 2.0), np.round((new_w - size) / 2.0)  # half to even, as round()
    return np.stack([new_h, new_w], 1), np.stack([top, left], 1).astype(np.int64)


def resize_center_crop(img: torch.Tensor, size: int, resize: int = 0) -> torch.Tensor:
    """Evaluation (and gpu-backend storage): shorter side to ``eval_size``, centre crop size;
    a small image already size x size is left alone (unless ``resize`` asks otherwise)."""
    if img.shape[-2:] == (size, size) and eval_size(size, resize) == size:
        return img
    img = TF.resize(img, [eval_size(size, resize)], antialias=True)
    return TF.center_crop(img, [size, size])
