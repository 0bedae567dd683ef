"""The loader protocol, the same for every --data-backend: per-rank disjoint shards, exact
evaluation counts, per-epoch reshuffle, exact resume, device tensors in the model's layout,
and the same samples and crops whichever backend decodes them.

The ranks are real loaders built for rank r of a world of 2 in this process (the sharding is
the loaders' own arithmetic; tests/test_sharding.py runs two processes under torchrun)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distres.config import parse_args
from distres.data import build
from distres.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from distres.dist import DistContext
from distres.train import main
from tests.helpers import closed_at_the_end

DALI_REASON = "NVIDIA DALI not installed (the [dali] extra: pip install -e '.[dali]')"
BACKENDS = ["torch", "gpu", "dali"]
N_TRAIN, N_VAL, BATCH = 37, 13, 4


def _need(backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason=DALI_REASON)


@pytest.fixture(scope="module")
def coded(module_dir):
    """32-px PNG images (lossless), each a flat colour whose red channel is its index among
    the split's files in ImageFolder order, so any output pixel names its sample."""
    from PIL import Image

    root = module_dir
    for split, n in (("train", N_TRAIN), ("val", N_VAL)):
        for i in range(n):
            cls = "a" if i < n // 2 else "b"  # sorted class folders keep the index order
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (i * 5, 255 - i * 5, 128)).save(folder / f"{i:03d}.png")
    return root


def _bundle(root, backend, rank, world=2, cpu_channels_last=True, size=32, extra=()):
    cfg = parse_args(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--image-size",
            str(size),
            "--seed",
            "3",
            "--batch-size",
            str(BATCH),
            "--data-backend",
            backend,
            "--workers",
            "0" if backend == "torch" else "1",  # torch: decode in this process
            *extra,
        ]
    )  # (a flag given again in extra wins)
    ctx = DistContext(rank, rank, world, world, torch.device("cpu"), "gloo" if world > 1 else None)
    fmt = torch.channels_last if cpu_channels_last else torch.contiguous_format
    return closed_at_the_end(build(cfg, ctx, fmt))


def _ids(images: torch.Tensor) -> list[int]:
    """The sample behind each image: its centre pixel's red value / 5 (the centre survives
    every pad-crop and flip)."""
    red = images[:, 0, 16, 16] * (255 * IMAGENET_STD[0]) + 255 * IMAGENET_MEAN[0]  # an ImageFolder's statistics
    return [int(round(v / 5)) for v in red.tolist()]


def _epoch(loader, epoch, start=0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def _children() -> set[int]:
    """The processes this test's main thread started (the loaders' workers among them)."""
    return {int(pid) for pid in Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read_text().split()}


def test_closing_a_bundle_ends_its_worker_processes(coded):
    """A run in this process (autotune's trials, the tests) ends its loaders' workers when it
    ends: the persistent workers of a DataLoader left to the garbage collector would end only
    when it comes, seconds each, in whatever the process is doing then."""
    before = _children()
    bundle = build(parse_args(["--data", "imagefolder", "--data-dir", str(coded), "--workers", "1", "--batch-size", "4"]),
                   DistContext(0, 0, 1, 1, torch.device("cpu"), None), torch.contiguous_format)  # fmt: skip
    _epoch(bundle.train, 0), _epoch(bundle.val, 0)
    assert len(_children() - before) == 2  # the two loaders' workers, kept for the next epoch
    bundle.close()
    assert _children() - before == set()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shards_counts_reshuffle_and_resume(coded, backend):
    _need(backend)
    ranks = [_bundle(coded, backend, r) for r in range(2)]
    train_seen, val_seen = [], []
    for b in ranks:
        epoch0 = _epoch(b.train, 0)
        # every rank: the same number of full batches, (37 // 2) // 4 = 4
        assert len(epoch0) == 4 and all(len(y) == BATCH for _, y in epoch0)
        x, y = epoch0[0]
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.device.type == "cpu"
        assert x.shape == (BATCH, 3, 32, 32) and x.is_contiguous(memory_format=torch.channels_last)
        ids = [i for x, _ in epoch0 for i in _ids(x)]
        labels = [int(v) for _, y in epoch0 for v in y]
        assert labels == [0 if i < N_TRAIN // 2 else 1 for i in ids]
        train_seen += ids
        epoch1 = _epoch(b.train, 1)
        assert [i for x, _ in epoch1 for i in _ids(x)] != ids  # reshuffled from (seed, epoch)
        # resume at batch 2 of epoch 1: the same samples and the same crops, bit for bit
        resumed = _epoch(b.train, 1, start=2 * BATCH * 2)  # 2 global micro-batches of BATCH x 2 ranks
        assert len(resumed) == 2
        for (xa, ya), (xb, yb) in zip(resumed, epoch1[2:]):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        val = _epoch(b.val, 0)
        val_seen += [i for x, _ in val for i in _ids(x)]
    assert len(train_seen) == len(set(train_seen)) == 2 * 4 * BATCH  # disjoint shards
    assert sorted(val_seen) == list(range(N_VAL))  # every validation image exactly once: 7 + 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_continues_where_it_stopped(coded, backend):
    _need(backend)
    a = _bundle(coded, backend, 0, world=1).train
    a.set_epoch(2)
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    assert state == {"epoch": 2, "sample": 3 * BATCH}
    rest = [(x.clone(), y) for x, y in it]
    b = _bundle(coded, backend, 0, world=1).train  # a fresh loader, as after a restart
    b.load_state_dict(state)
    assert len(b) == len(rest) == 9 - 3 and len(first) == 3
    for (xa, ya), (xb, yb) in zip(b, rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


@pytest.mark.parametrize("backend", ["gpu", "dali"])
def test_backends_match_the_torch_backend(coded, backend):
    """Same seed, same batches: the gpu backend bit for bit, DALI to float rounding (its
    normalisation runs in crop_mirror_normalize), for both the training crops and evaluation,
    and in both memory formats."""
    _need(backend)
    for channels_last in (True, False):
        ref, other = (_bundle(coded, b, 1, cpu_channels_last=channels_last) for b in ("torch", backend))
        for split in ("train", "val"):
            want, got = _epoch(getattr(ref, split), 1), _epoch(getattr(other, split), 1)
            assert len(want) == len(got)
            for (xa, ya), (xb, yb) in zip(want, got):
                assert torch.equal(ya, yb)
                assert xb.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
                torch.testing.assert_close(xb, xa, rtol=0, atol=0 if backend == "gpu" else 1e-5)


def test_dali_matches_torch_statistics_on_photos_with_resizing(tmp_path):
    """224-px training crops (RandomResizedCrop boxes) and resize + centre-crop evaluation of
    real photo crops: DALI resamples with its own filter, so the pixels differ slightly, but the
    normalised statistics must agree with the torch backend's."""
    pytest.importorskip("nvidia.dali", reason=DALI_REASON)
    from matplotlib import cbook
    from PIL import Image

    photo = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for i in range(n):
            folder = tmp_path / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            x, y = rng.integers(0, 250, 2)
            photo.crop((x, y, x + 260, y + 200)).save(folder / f"{i}.jpg", quality=90)
    ctx = DistContext(0, 0, 1, 1, torch.device("cpu"), None)
    outs = {}
    for backend in ("torch", "dali"):
        cfg = parse_args(
            [
                "--data",
                "imagefolder",
                "--data-dir",
                str(tmp_path),
                "--image-size",
                "224",
                "--batch-size",
                "4",
                "--data-backend",
                backend,
                "--workers",
                "1",
            ]
        )
        b = closed_at_the_end(build(cfg, ctx, torch.channels_last))
        outs[backend] = [torch.cat([x for x, _ in _epoch(loader, 0)]) for loader in (b.train, b.val)]
    for want, got in zip(outs["torch"], outs["dali"]):
        assert got.shape == want.shape == (len(want), 3, 224, 224)
        torch.testing.assert_close(got.mean((0, 2, 3)), want.mean((0, 2, 3)), rtol=0, atol=0.01)
        torch.testing.assert_close(got.std((0, 2, 3)), want.std((0, 2, 3)), rtol=0, atol=0.01)
        assert (got - want).abs().mean() < 0.02  # the same boxes: a mean difference of ~1 grey level


def test_auto_backend_choice():
    from distres.data.loaders import resolve_backend

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_backend("auto", "cifar10", cuda) == "gpu"
    assert resolve_backend("auto", "cifar10", cpu) == "torch"
    assert resolve_backend("auto", "imagefolder", cuda) == "torch"
    assert resolve_backend("auto", "synthetic", cpu) == "synthetic"
    assert resolve_backend("dali", "imagefolder", cpu) == "dali"


def test_missing_dali_is_one_clear_line(coded, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)  # as if the extra were not installed
    code = main(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(coded),
            "--data-backend",
            "dali",
            "--device",
            "cpu",
            "--image-size",
            "32",
            "--output-dir",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1] == (
        "distres: error: --data-backend dali needs NVIDIA DALI, which is not installed; "
        "pip install -e '.[dali]' (or use --data-backend torch)"
    )


def test_gpu_backend_refuses_large_images(coded, tmp_path, capsys):
    code = main(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(coded),
            "--data-backend",
            "gpu",
            "--device",
            "cpu",
            "--image-size",
            "224",
            "--output-dir",
            str(tmp_path / "o"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "--data-backend gpu is for small images" in capsys.readouterr().err


def test_decoder_reads_what_torchvision_cannot_and_refuses_broken_files(tmp_path):
    from PIL import Image

    from distres.data.decode import DECODE_ERRORS, decode_torchvision

    for ext in ("bmp", "tiff"):  # torchvision.io has no BMP/TIFF decoder: PIL takes over
        Image.new("RGB", (6, 4), (9, 8, 7)).save(tmp_path / f"x.{ext}")
        img = decode_torchvision(str(tmp_path / f"x.{ext}"))
        assert img.shape == (3, 4, 6) and img[:, 0, 0].tolist() == [9, 8, 7]
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DECODE_ERRORS):
        decode_torchvision(str(tmp_path / "bad.jpg"))


def test_dali_keeps_one_pipeline_across_whole_epochs(coded):
    """A pass that ran to its end leaves the pipeline reusable: the next epoch resets it
    instead of building another, and its batches are still the torch backend's; a pass
    abandoned halfway (its prefetched batches belong to that pass) is not reused."""
    _need("dali")
    ref, dali = (_bundle(coded, b, 0, world=1) for b in ("torch", "dali"))
    _epoch(dali.train, 1)
    pipe = dali.train._pipe
    assert pipe is not None
    for epoch in (2, 3):
        want, got = _epoch(ref.train, epoch), _epoch(dali.train, epoch)
        assert dali.train._pipe is pipe
        assert len(want) == len(got) == 9
        for (xa, ya), (xb, yb) in zip(want, got):
            assert torch.equal(ya, yb)
            torch.testing.assert_close(xb, xa, rtol=0, atol=1e-5)
    dali.train.set_epoch(4)
    it = iter(dali.train)
    next(it)
    it.close()  # abandoned after one batch
    got = _epoch(dali.train, 4, start=1)
    assert dali.train._pipe is not pipe
    for (xa, ya), (xb, yb) in zip(_epoch(ref.train, 4, start=1), got):
        assert torch.equal(ya, yb)
        torch.testing.assert_close(xb, xa, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["gpu", "synthetic"])
def test_device_resident_backends_copy_once_per_epoch(coded, backend, monkeypatch):
    """The gpu and synthetic backends send the epoch's order (and crop boxes) to the device in
    one copy per epoch, never one per batch: a per-batch host-to-device copy from pageable
    memory would make the host wait for the GPU at every step."""
    import importlib

    module = importlib.import_module(f"distres.data.{backend}")
    copies = []
    real = module.to_device
    monkeypatch.setattr(module, "to_device", lambda t, device: (copies.append(t.shape), real(t, device))[1])
    if backend == "gpu":
        loader = _bundle(coded, "gpu", 0, world=1).train
    else:
        cfg = parse_args(
            [
                "--data",
                "synthetic",
                "--image-size",
                "32",
                "--synthetic-classes",
                "4",
                "--synthetic-samples",
                "64",
                "--batch-size",
                str(BATCH),
            ]
        )
        loader = closed_at_the_end(
            build(cfg, DistContext(0, 0, 1, 1, torch.device("cpu"), None), torch.channels_last)
        ).train
    for epoch in (0, 1):
        copies.clear()
        batches = _epoch(loader, epoch)
        assert len(batches) == loader.sampler.num_batches() > 3
        assert len(copies) == (2 if backend == "gpu" else 1), copies  # order (+ boxes), once


@pytest.fixture(scope="module")
def photos(module_dir):
    """JPEGs of mixed sizes and aspect ratios (smooth gradients, as photos are, so that the
    crops' resampling matters), a PNG in each split, and one truncated and one corrupt JPEG in
    train/."""
    from torchvision.io import encode_jpeg, encode_png

    from tests.helpers import break_jpeg

    g = torch.Generator().manual_seed(0)
    root = module_dir / "photos"
    for split, n in (("train", 22), ("val", 6)):
        for i in range(n):
            h, w = 40 + 13 * (i % 5), 48 + 11 * (i % 7)
            base = torch.rand(3, 1, 1, generator=g) * torch.linspace(0, 1, h)[:, None] * torch.linspace(0.5, 1, w)
            img = (255 * (base + 0.2 * torch.rand(3, h, w, generator=g)).clamp(0, 1)).to(torch.uint8)
            folder = root / split / ("a" if i % 2 else "b")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:03d}.jpg").write_bytes(encode_jpeg(img, quality=90).numpy().tobytes())
    break_jpeg(root / "train/a/001.jpg", "truncated")
    break_jpeg(root / "train/b/002.jpg", "corrupt")
    for split in ("train", "val"):  # a PNG among the JPEGs: the workers decode it in either mode
        ramp = torch.linspace(0, 255, 70).to(torch.uint8).expand(3, 45, 70)
        (root / split / "a" / "ramp.png").write_bytes(encode_png(ramp).numpy().tobytes())
    return root


@pytest.mark.parametrize("size", [32, 72])
def test_decoding_on_the_device_gives_the_workers_batches(photos, size):
    """--decode-on device on a CPU device decodes with the workers' libjpeg-turbo and crops with
    the same code, so its batches are the workers' bit for bit: the pad-crops of small images
    and the RandomResizedCrop boxes of larger ones, with --auto-augment, the evaluation crops,
    a resume mid-epoch, and the same undecodable files left out and counted."""
    workers, device = (
        _bundle(
            photos,
            "torch",
            0,
            world=1,
            size=size,
            extra=("--auto-augment", "ta_wide", "--decode-on", where, "--workers", "1"),
        )  # through a worker process, as in use
        for where in ("workers", "device")
    )
    assert device.train.loader.dataset.encoded and not workers.train.loader.dataset.encoded
    for split in ("train", "val"):
        for start in (0, BATCH):
            want, got = _epoch(getattr(workers, split), 1, start), _epoch(getattr(device, split), 1, start)
            assert len(want) == len(got) > 0
            for (xa, ya), (xb, yb) in zip(want, got):
                assert torch.equal(ya, yb) and torch.equal(xa, xb)
                assert xb.shape[-1] == size and xb.is_contiguous(memory_format=torch.channels_last)
    assert workers.train.bad_samples == device.train.bad_samples >= 2  # both broken files, in every pass
