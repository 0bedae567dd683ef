"""What evaluate, predict and export share: a trained model rebuilt from its file alone, and
image files turned into its input the way its validation images were."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from distres import models, weights
from distres.config import FIELDS, TrainConfig
from distres.data import transforms
from distres.data.base import Normalize
from distres.data.decode import decode_torchvision
from distres.data.formats import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from distres.errors import UserError

WEIGHT_CHOICES = ("auto", "ema", "raw")
WEIGHTS_HELP = "which weights of the checkpoint: auto (the EMA when it has one), ema or raw"


@dataclass
class Trained:
    model: nn.Module  # eval mode
    meta: dict  # models.describe
    weights: str  # "ema" or "raw"
    config: TrainConfig  # the training run's settings (defaults for a file without them)


def load(path: str | Path, which: str = "auto", device: torch.device | None = None, plain: bool = False) -> Trained:
    """The model in ``path`` on ``device`` (default CPU). Set up as training ran it (memory
    format, the CPU's matmul convolutions), so that its scores match training's, unless
    ``plain``: a stock torchvision module in fp32 (what exports trace)."""
    path = Path(path)
    file = weights.read_model_file(path, which)
    model = models.from_description(file.meta)
    try:
        model.load_state_dict(file.state)
    except RuntimeError as e:
        raise UserError(
            f"{path}: the weights do not fit the model it describes ({str(e).splitlines()[0][:100]}); "
            "the file is damaged: use another checkpoint"
        ) from None
    cfg = run_config(file.config)
    device = device or torch.device("cpu")
    if not plain:
        model = models.prepare(model, device, cfg.model.channels_last, sync_bn=False, distributed=False)
    return Trained(model.eval().requires_grad_(False), file.meta, file.weights, cfg)


# Settings of the training run that mean nothing when a trained model is used.
_TRAINING_ONLY = {"weights": "none", "resume": None, "tensorboard": False, "autotune": False, "profile_steps": None}


def run_config(saved: dict | None) -> TrainConfig:
    """The training run's config from a checkpoint's record (unknown keys, from other
    versions, are left out), less what only training uses."""
    return TrainConfig(**{**{k: v for k, v in (saved or {}).items() if k in FIELDS}, **_TRAINING_ONLY})


def with_overrides(cfg: TrainConfig, **changes) -> TrainConfig:
    """cfg with the flags the user gave (None: keep the checkpoint's)."""
    return cfg.replace(**{k: v for k, v in changes.items() if v is not None})


def normalizer(meta: dict, device: torch.device, channels_last: bool) -> Normalize:
    return Normalize(meta["mean"], meta["std"], device, models.memory_format(channels_last))


def model_input(image: torch.Tensor, meta: dict) -> torch.Tensor:
    """A decoded image as the model's uint8 input: shorter side resized, centre crop, as the
    validation images of its training run were."""
    return transforms.resize_center_crop(image, meta["image_size"], meta.get("resize", 0))


def read_image(path: str, meta: dict) -> torch.Tensor:
    """An image file as the model's uint8 input (``model_input``)."""
    return model_input(decode_torchvision(path), meta)


def find_images(inputs: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """The image files among inputs (folders walked in name order), and what was left out."""
    files, skipped = [], []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                files += [
                    os.path.join(root, n)
                    for n in sorted(names)
                    if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith(".")
                ]
        elif path.suffix.lower() in VIDEO_EXTENSIONS:
            skipped.append((item, "a video: extract its frames with python -m distres.prepare video"))
        elif path.exists():
            files.append(item)  # named explicitly: tried whatever its extension
        else:
            skipped.append((item, "no such file"))
    return files, skipped
