"""Every committed recipe (configs/*.yaml) parses into a valid config, with the settings its
comments promise."""

from pathlib import Path

import pytest

from distres.config import FIELDS, parse_args

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# The V2 recipes use the augmentation options (auto_augment, mixup_alpha, ...).
AUGMENTATION_KEYS = ("auto_augment", "random_erase", "mixup_alpha", "cutmix_alpha", "repeated_aug")


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_parses(path):
    if "auto_augment" in path.read_text() and not all(k in FIELDS for k in AUGMENTATION_KEYS):
        pytest.skip("needs the augmentation options")
    cfg = parse_args(["--config", str(path)])
    assert cfg.epochs > 0 and cfg.arch in ("resnet18", "resnet50", "resnext50_32x4d")


def test_recipe_settings():
    fast = parse_args(["--config", str(CONFIGS[0].parent / "imagenet-rn50-fast.yaml")])
    assert fast.data.resize_schedule.sizes(32)[22:28] == [160, 160, 160, 192, 192, 192]
    assert fast.data.eval_sizes == (256, 0) and fast.blurpool and fast.data.train_image_size == 192
    classic = parse_args(["--config", str(CONFIGS[0].parent / "imagenet-rn50-90ep.yaml"), "--data-dir", "/x"])
    assert (classic.epochs, classic.schedule, classic.optim.lr_step_epochs, classic.weight_decay) == (
        90,
        "step",
        (30, 60),
        1e-4,
    )
    mnist = parse_args(["--config", str(CONFIGS[0].parent / "mnist.yaml")])
    assert mnist.dataset == "mnist" and mnist.data.train_image_size == 28
