"""Per-sample automatic augmentation (``--auto-augment``) on uint8 C x H x W tensors.

The op sets and magnitude bins are torchvision's TrivialAugmentWide, RandAugment (2 ops at
``--ra-magnitude``, 31 bins) and AugMix (severity 3, width 3, random depth, alpha 1). torchvision's
classes draw from the global RNG, so here every choice (op, bin, sign, AugMix weights) comes from
the sample's augmentation seed instead: the torch backend's workers and the gpu backend's device
then apply the same ops with the same parameters, and a resumed run redraws exactly the same.

The gpu backend calls ``apply_batch`` on the device, which loops the per-sample function over
the batch: one small kernel sequence per image, simple, and on a CPU device bit for bit the
workers' result. On a GPU the ops that resample (shear, translate and rotate go through
``grid_sample``) and AugMix's float blend may round a few pixels differently from the CPU's
kernels; the parameters, and so the augmentation's distribution, are the same.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF

from distres.data.transforms import uniforms

RA_OPS, RA_BINS = 2, 31
TA_BINS = 31
AUGMIX_SEVERITY, AUGMIX_WIDTH, AUGMIX_DEPTHS, AUGMIX_BINS = 3, 3, 3, 10
_DRAWS = {"ta_wide": 3, "ra": 3 * RA_OPS, "augmix": 5 + AUGMIX_WIDTH * (1 + 3 * AUGMIX_DEPTHS)}
_SALT = {"ta_wide": 0x7A17, "ra": 0x4A2D, "augmix": 0xA6A1, "erase": 0xE4A5}


def derived_seeds(seeds: np.ndarray, what: str) -> np.ndarray:
    """A separate seed per sample for one augmentation (splitmix64 of seed and a salt), so its
    uniform streams never overlap the crop's (``uniforms`` of the seeds themselves) or another's."""
    z = (np.asarray(seeds, dtype=np.uint64) ^ np.uint64(_SALT[what] << 40)) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _lin(top):
    return lambda n, h, w: torch.linspace(0.0, top, n)


def _posterize(start: int, span: int):
    return lambda n, h, w: (start - torch.arange(n) / ((n - 1) / span)).round().int()


def _space(shear, translate, rotate, colour, posterize, identity: bool, colours_last: bool) -> dict:
    """name -> (magnitudes(bins, height, width) or None, signed), in torchvision's order."""
    geometry = {
        "ShearX": (_lin(shear), True),
        "ShearY": (_lin(shear), True),
        "TranslateX": (lambda n, h, w: torch.linspace(0.0, translate(w), n), True),
        "TranslateY": (lambda n, h, w: torch.linspace(0.0, translate(h), n), True),
        "Rotate": (_lin(rotate), True),
    }
    colours = {name: (_lin(colour), True) for name in ("Brightness", "Color", "Contrast", "Sharpness")}
    rest = {
        "Posterize": (posterize, False),
        "Solarize": (lambda n, h, w: torch.linspace(1.0, 0.0, n), False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
    }
    space = {"Identity": (None, False)} if identity else {}
    return {**space, **geometry, **rest, **colours} if colours_last else {**space, **geometry, **colours, **rest}


SPACES = {
    "ta_wide": _space(0.99, lambda side: 32.0, 135.0, 0.99, _posterize(8, 6), identity=True, colours_last=False),
    "ra": _space(
        0.3, lambda side: 150.0 / 331.0 * side, 30.0, 0.9, _posterize(8, 4), identity=True, colours_last=False
    ),
    "augmix": _space(0.3, lambda side: side / 3.0, 30.0, 0.9, _posterize(4, 4), identity=False, colours_last=True),
}
INTERPOLATION = {
    "ta_wide": TF.InterpolationMode.NEAREST,
    "ra": TF.InterpolationMode.NEAREST,
    "augmix": TF.InterpolationMode.BILINEAR,
}


def apply_op(img: torch.Tensor, name: str, magnitude: float, interpolation) -> torch.Tensor:
    """One op on a uint8 image, with torchvision's meaning of the magnitude."""
    if name == "Identity":
        return img
    if name in ("ShearX", "ShearY"):
        shear = math.degrees(math.atan(magnitude))
        return TF.affine(
            img,
            angle=0.0,
            translate=[0, 0],
            scale=1.0,
            interpolation=interpolation,
            shear=[shear, 0.0] if name == "ShearX" else [0.0, shear],
            center=[0, 0],
        )
    if name in ("TranslateX", "TranslateY"):
        shift = [int(magnitude), 0] if name == "TranslateX" else [0, int(magnitude)]
        return TF.affine(img, angle=0.0, translate=shift, scale=1.0, shear=[0.0, 0.0], interpolation=interpolation)
    if name == "Rotate":
        return TF.rotate(img, angle=magnitude, interpolation=interpolation)
    colour = {
        "Brightness": TF.adjust_brightness,
        "Color": TF.adjust_saturation,
        "Contrast": TF.adjust_contrast,
        "Sharpness": TF.adjust_sharpness,
    }
    if name in colour:
        return colour[name](img, 1.0 + magnitude)
    if name == "Posterize":
        return TF.posterize(img, bits=int(magnitude))
    if name == "Solarize":
        return TF.solarize(img, threshold=255.0 * magnitude)
    if name == "AutoContrast":
        return TF.autocontrast(img)
    return TF.equalize(img)


def _pick(
    space: dict, u_op: float, u_bin: float, u_sign: float, bins: int, h: int, w: int, bin_index: int | None = None
) -> tuple[str, float]:
    """An op (u_op), its magnitude bin (``bin_index``, else u_bin of ``bins``) and sign (u_sign)."""
    names = list(space)
    name = names[int(u_op * len(names))]
    magnitudes, signed = space[name]
    if magnitudes is None:
        return name, 0.0
    table = magnitudes(bins, h, w)
    magnitude = float(table[bin_index if bin_index is not None else int(u_bin * len(table))])
    return name, -magnitude if signed and u_sign < 0.5 else magnitude


class Policy:
    """``--auto-augment`` with its parameters; picklable (it travels to DataLoader workers)."""

    def __init__(self, name: str, ra_magnitude: int = 9):
        self.name, self.ra_magnitude = name, ra_magnitude

    @property
    def active(self) -> bool:
        return self.name != "none"

    def apply_batch(self, images: torch.Tensor, seeds: np.ndarray) -> torch.Tensor:
        """B x C x H x W uint8 (any strides, any device) -> augmented, C x H x W contiguous each."""
        if not self.active:
            return images
        u = uniforms(derived_seeds(seeds, self.name), _DRAWS[self.name])
        return torch.stack([self.one(images[k].contiguous(), u[k]) for k in range(len(images))])

    def one(self, img: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        h, w = img.shape[-2:]
        space, interp = SPACES[self.name], INTERPOLATION[self.name]
        if self.name == "ta_wide":
            return apply_op(img, *_pick(space, *u[:3], TA_BINS, h, w), interp)
        if self.name == "ra":
            for k in range(RA_OPS):
                img = apply_op(img, *_pick(space, *u[3 * k : 3 * k + 3], RA_BINS, h, w, self.ra_magnitude), interp)
            return img
        return self._augmix(img, u, space, interp, h, w)

    @staticmethod
    def _augmix(img, u, space, interp, h, w) -> torch.Tensor:
        # Dirichlet(1, ..., 1) draws are normalised exponentials of the uniforms.
        e = -np.log1p(-u[:5])
        m = e[:2] / e[:2].sum()
        weights = e[2:5] / e[2:5].sum() * m[1]
        mix = float(m[0]) * img.float()
        for i in range(AUGMIX_WIDTH):
            chain = u[5 + i * (1 + 3 * AUGMIX_DEPTHS) : 5 + (i + 1) * (1 + 3 * AUGMIX_DEPTHS)]
            aug = img
            for d in range(1 + int(chain[0] * AUGMIX_DEPTHS)):
                u_op, u_bin, u_sign = chain[1 + 3 * d : 4 + 3 * d]
                # torchvision: one of the first ``severity`` of 10 bins
                name, mag = _pick(space, u_op, 0.0, u_sign, AUGMIX_BINS, h, w, bin_index=int(u_bin * AUGMIX_SEVERITY))
                aug = apply_op(aug, name, mag, interp)
            mix.add_(float(weights[i]) * aug)
        return mix.to(torch.uint8)
