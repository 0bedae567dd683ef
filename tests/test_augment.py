"""Training augmentation (--auto-augment, --random-erase, --mixup-alpha, --cutmix-alpha): the
same images from the torch and gpu backends, torchvision's op set and magnitudes, draws that
follow the seeds, soft targets through the smoothed loss, and an exact mid-epoch resume with
everything on. Real CIFAR-10 JPEGs, a few per class."""

import tarfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision.transforms.v2 as T

from distres.config import parse_args
from distres.data import build
from distres.data.autoaug import SPACES, Policy, apply_op
from distres.data.batchaug import batch_rng, erase, erase_boxes, mix, soft_targets
from distres.dist import DistContext
from distres.train import main
from tests.helpers import CIFAR10_TARBALL, read_metrics, train_here

PER_CLASS = {"train": 4, "test": 2}
BATCH = 8
CPU = DistContext(0, 0, 1, 1, torch.device("cpu"), None)


@pytest.fixture(scope="module")
def cifar(module_dir):
    """The first few real CIFAR-10 JPEGs of every class (train and test), as an ImageFolder."""
    if not CIFAR10_TARBALL.is_file():
        pytest.skip(f"real-data test: {CIFAR10_TARBALL} not present")
    root = module_dir
    taken: dict[tuple[str, str], int] = {}
    with tarfile.open(CIFAR10_TARBALL) as tar:
        for m in tar:
            parts = m.name.split("/")
            if not m.isfile() or len(parts) < 3 or parts[-3] not in PER_CLASS:
                continue
            key = (parts[-3], parts[-2])
            if taken.get(key, 0) < PER_CLASS[key[0]]:
                taken[key] = taken.get(key, 0) + 1
                dst = root / key[0] / key[1] / parts[-1]
                dst.parent.mkdir(parents=True, exist_ok=True)
                dst.write_bytes(tar.extractfile(m).read())
    assert len(taken) == 20
    return root


def _train_loader(root, backend, *flags):
    cfg = parse_args(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--image-size",
            "32",
            "--seed",
            "5",
            "--batch-size",
            str(BATCH),
            "--data-backend",
            backend,
            "--workers",
            "0",
            *flags,
        ]
    )
    return build(cfg, CPU, torch.channels_last).train


def _epoch(loader, epoch):
    loader.set_epoch(epoch)
    return [(x.clone(), y.clone()) for x, y in loader]


AUGMENTS = {
    "ta_wide": ["--auto-augment", "ta_wide"],
    "ra": ["--auto-augment", "ra"],
    "augmix": ["--auto-augment", "augmix"],
    "erase": ["--random-erase", "0.5"],
    "mixup+cutmix": ["--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"],
}


@pytest.fixture(scope="module")
def plain(cifar):
    """Epoch 1 without the augmentations under test (pad-crop and flip only)."""
    return _epoch(_train_loader(cifar, "torch"), 1)


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_torch_and_gpu_backends_augment_alike(cifar, plain, name):
    """The same batches, bit for bit, from both backends; the augmentation changed them; and
    another epoch draws otherwise (the seeds include the epoch)."""
    flags = AUGMENTS[name]
    gpu = _train_loader(cifar, "gpu", *flags)
    want, got = _epoch(_train_loader(cifar, "torch", *flags), 1), _epoch(gpu, 1)
    assert len(want) == len(got) == len(plain) == 40 // BATCH
    for (xa, ya), (xb, yb), (x0, _y0) in zip(want, got, plain):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        changed = (xa != x0).flatten(1).any(1)
        assert changed.float().mean() >= (0.25 if name == "erase" else 0.75), changed
    if name == "mixup+cutmix":  # soft targets: rows of probabilities, some on the sample's own label
        y, hard = want[0][1], plain[0][1]
        assert y.shape == (BATCH, 10) and torch.allclose(y.sum(1), torch.ones(BATCH))
        assert (y.gather(1, hard[:, None]) > 0).all()
    other = _epoch(gpu, 2)
    assert not torch.equal(
        torch.cat([x for x, _ in other]).sort(0).values, torch.cat([x for x, _ in got]).sort(0).values
    )


def test_erasing_boxes_go_to_the_device_once_per_epoch(cifar, monkeypatch):
    """Like the crop boxes: a per-batch host-to-device copy would make the host wait each step."""
    from distres.data import batchaug

    copies = []
    real = batchaug.to_device
    monkeypatch.setattr(batchaug, "to_device", lambda t, device: (copies.append(t.shape), real(t, device))[1])
    loader = _train_loader(cifar, "gpu", "--random-erase", "0.5", "--mixup-alpha", "0.2")
    for epoch in (0, 1):
        copies.clear()
        assert len(_epoch(loader, epoch)) == 5
        assert copies == [(40, 4)]


@pytest.mark.parametrize(
    "policy,reference", [("ta_wide", T.TrivialAugmentWide), ("ra", T.RandAugment), ("augmix", T.AugMix)]
)
def test_op_set_and_magnitudes_are_torchvisions(policy, reference):
    """The same ops, in the same order, with the same magnitude bins, and each op doing what
    torchvision's does with that magnitude."""
    ours, theirs = SPACES[policy], reference._AUGMENTATION_SPACE
    assert list(ours) == list(theirs)
    bins = 10 if policy == "augmix" else 31
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = reference()
    for name, (mags, signed) in theirs.items():
        our_mags, our_signed = ours[name]
        assert our_signed == signed, name
        if mags(bins, 32, 24) is None:
            assert our_mags is None, name
            magnitude = 0.0
        else:
            assert torch.equal(our_mags(bins, 32, 24), mags(bins, 32, 24)), name
            magnitude = float(mags(bins, 32, 32)[bins // 3])
        want = ref._apply_image_or_video_transform(
            img, name, magnitude, interpolation=ref.interpolation, fill=ref._fill
        )
        assert torch.equal(apply_op(img, name, magnitude, ref.interpolation), want), name


def test_draws_follow_the_seed_and_the_magnitude(plain):
    images = torch.cat([x for x, _ in plain[:2]])  # normalised: back to about the uint8 pixels
    img = (images * 60 + 120).clamp(0, 255).to(torch.uint8)
    seeds = np.arange(len(img), dtype=np.uint64) + 1000
    ta = Policy("ta_wide")
    assert torch.equal(ta.apply_batch(img, seeds), ta.apply_batch(img, seeds))
    differ = (ta.apply_batch(img, seeds) != ta.apply_batch(img, seeds + 7)).flatten(1).any(1)
    assert differ.float().mean() > 0.5
    change = {
        m: (Policy("ra", m).apply_batch(img, seeds).float() - img.float()).abs().mean().item() for m in (0, 9, 30)
    }
    assert change[0] < change[9] < change[30], change


def test_random_erasing_boxes_and_rate():
    seeds = np.arange(4000, dtype=np.uint64)
    boxes = erase_boxes(seeds, 32, 24, 0.25)
    erased = boxes[:, 2] > 0
    assert 0.22 < erased.mean() < 0.28
    top, left, h, w = boxes[erased].T
    assert (top >= 0).all() and (top + h <= 32).all() and (left >= 0).all() and (left + w <= 24).all()
    area = h * w / (32 * 24)
    assert 0.015 < area.min() and area.max() < 0.36  # torchvision's scale (0.02, 0.33), after rounding
    x = torch.ones(6, 3, 32, 24)
    out = erase(x.clone(), torch.from_numpy(boxes[:6]))
    for k, (t, left, hh, ww) in enumerate(boxes[:6].tolist()):
        assert (out[k] == 0).sum() == 3 * hh * ww
        assert (out[k, :, t : t + hh, left : left + ww] == 0).all()


def test_soft_targets_through_the_smoothed_loss():
    """Soft one-hot targets give the hard-label loss (label smoothing included); a mixed target
    gives the mix of the two hard losses; the draws are a function of (seed, epoch, batch)."""
    g = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(8, 10, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = nn.CrossEntropyLoss(label_smoothing=0.1)
    torch.testing.assert_close(loss(logits, soft_targets(labels, 10)), loss(logits, labels))
    images = torch.randn(8, 3, 16, 16, generator=g)
    for alphas in ((0.2, 0.0), (0.0, 1.0), (0.2, 1.0)):
        a = mix(images.clone(), labels, 10, batch_rng(3, 1, 7), *alphas)
        b = mix(images.clone(), labels, 10, batch_rng(3, 1, 7), *alphas)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        targets = a[1]
        # every target row: lam on its own label, 1 - lam on its neighbour's
        first = targets.gather(1, labels[:, None])[:, 0]
        second = targets.gather(1, labels.roll(1, 0)[:, None])[:, 0]
        same = labels == labels.roll(1, 0)
        torch.testing.assert_close(torch.where(same, first, first + second), torch.ones(8))
        lam = first[~same][0].item()
        torch.testing.assert_close(
            loss(logits, targets), lam * loss(logits, labels) + (1 - lam) * loss(logits, labels.roll(1, 0))
        )
    c = mix(images.clone(), labels, 10, batch_rng(3, 1, 8), 0.2, 1.0)
    d = mix(images.clone(), labels, 10, batch_rng(4, 1, 7), 0.2, 1.0)
    assert not torch.equal(c[1], a[1]) and not torch.equal(d[1], a[1])
    # cutmix: the kept share of the pixels is the target weight
    for batch in range(20):
        out, t = mix(images.clone(), labels, 10, batch_rng(0, 0, batch), 0.0, 1.0)
        kept = (out == images).all(1).float().mean((1, 2))
        i = int((~same).nonzero()[0])
        torch.testing.assert_close(kept[i], t[i, labels[i]])


@pytest.mark.slow
def test_resume_with_every_augmentation_is_bitwise_equal(cifar, tmp_path):
    """TrivialAugment, random erasing, mixup and cutmix on, a DataLoader worker: stopped at step 3
    of the 5 and resumed, the run ends with the uninterrupted run's weights and losses."""
    common = [
        "--arch",
        "resnet18",
        "--cifar-stem",
        "off",
        "--data",
        "imagefolder",
        "--data-dir",
        str(cifar),
        "--image-size",
        "32",
        "--data-backend",
        "torch",
        "--workers",
        "1",
        "--device",
        "cpu",
        "--batch-size",
        str(BATCH),
        "--epochs",
        "1",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "0",
        "--amp",
        "none",
        "--deterministic",
        "--checkpoint-every",
        "0",
        "--eval-every",
        "0",
        "--no-progress",
        "--log-every",
        "1",
        "--wandb",
        "disabled",
        "--auto-augment",
        "ta_wide",
        "--random-erase",
        "0.5",
        "--mixup-alpha",
        "0.2",
        "--cutmix-alpha",
        "1.0",
    ]
    full, cut = tmp_path / "full", tmp_path / "cut"
    r = train_here(common + ["--output-dir", str(full)])
    assert r.returncode == 0, r.stderr[-3000:]
    r = train_here(common + ["--output-dir", str(cut), "--max-steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert torch.load(cut / "checkpoints/last.pt", weights_only=True)["step_in_epoch"] == 3
    r = train_here(common + ["--output-dir", str(cut), "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(full / "checkpoints/last.pt", weights_only=True)
    b = torch.load(cut / "checkpoints/last.pt", weights_only=True)
    assert a["step"] == b["step"] == 5
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    losses = [[x["loss"] for x in read_metrics(d) if x["kind"] == "train"] for d in (full, cut)]
    assert losses[0] == losses[1] and len(losses[0]) == 5


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--data-backend", "dali", "--auto-augment", "ta_wide"],
            "distres: error: --auto-augment ta_wide runs in the torch and gpu backends only: DALI's auto_aug draws from "
            "its own generators, not from the per-sample seeds; use --data-backend torch (or gpu)",
        ),
        (["--random-erase", "1.5"], "distres: error: --random-erase is a probability in [0, 1] (got 1.5); e.g. 0.25"),
        (["--mixup-alpha", "-1"], "distres: error: --mixup-alpha must be >= 0, 0 for off (got -1); e.g. 0.2"),
        (
            ["--ra-magnitude", "31"],
            "distres: error: --ra-magnitude must be a bin from 0 to 30 (got 31); torchvision's default is 9",
        ),
    ],
)
def test_augmentation_mistakes_are_one_line_errors(tmp_path, capsys, flags, message):
    code = main(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(tmp_path),
            "--device",
            "cpu",
            "--image-size",
            "32",
            "--output-dir",
            str(tmp_path / "o"),
            "--no-progress",
            "--wandb",
            "disabled",
            *flags,
        ]
    )
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == message


def test_dali_gets_the_batch_augmentations_of_the_torch_backend(cifar):
    """Random erasing and mixup/cutmix act on the normalised batch, the same on every backend."""
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    flags = ["--random-erase", "0.5", "--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"]
    want, got = (_epoch(_train_loader(cifar, b, *flags), 1) for b in ("torch", "dali"))
    for (xa, ya), (xb, yb) in zip(want, got):
        torch.testing.assert_close(yb, ya, rtol=0, atol=0)
        torch.testing.assert_close(xb, xa, rtol=0, atol=1e-5)
