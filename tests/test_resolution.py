"""Resolution: progressive resizing (FFCV's schedule, per epoch, resumed at the right size) and
the evaluation crop and resize (FixRes), recorded in the model file and used after training."""

import json

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from distres import evaluate, inference, resolution
from distres.config import parse_args
from distres.data import build
from distres.dist import DistContext
from distres.errors import UserError
from tests.helpers import TINY, make_imagefolder, read_metrics, train_here

CPU = DistContext(0, 0, 1, 1, torch.device("cpu"), None)


def _ffcv(epoch, min_res, max_res, end_ramp, start_ramp):
    """FFCV's ImageNet example (train_imagenet.py, ``get_resolution``), as published."""
    if epoch <= start_ramp:
        return min_res
    if epoch >= end_ramp:
        return max_res
    interp = np.interp([epoch], [start_ramp, end_ramp], [min_res, max_res])
    return int(np.round(interp[0] / 32)) * 32


@pytest.mark.parametrize(
    "start,end,a,b,epochs", [(160, 192, 11, 13, 16), (160, 192, 65, 76, 88), (128, 256, 2, 10, 12), (160, 171, 0, 2, 4)]
)
def test_schedule_is_ffcvs(start, end, a, b, epochs):
    s = resolution.parse(f"{start}:{end}", f"{a}:{b}")
    want = [_ffcv(e, start, end, b, a) for e in range(epochs)]
    want = [min(max(w, start), end) for w in want]  # distres keeps the sizes within START..END
    assert s.sizes(epochs) == want
    assert s.size(0) == start and s.size(epochs + 5) == end


def test_schedule_examples_and_errors():
    assert resolution.parse("160:192", "11:13").sizes(16) == [160] * 12 + [192] * 4
    assert resolution.parse("128:256", "2:10").sizes(12) == [128] * 4 + [
        160,
        192,
        192,
        192,
        224,
        256,
        256,
        256,
    ]  # half to even
    assert resolution.parse(None, None) is None
    for sizes, epochs, msg in (
        ("160", "1:2", "START:END"),
        ("160:192", None, "needs --progressive-epochs"),
        (None, "1:2", "needs --progressive-resize"),
        ("160:192", "5:2", "0 <= A <= B"),
        ("0:192", "1:2", "must be > 0"),
    ):
        with pytest.raises(UserError, match=msg):
            resolution.parse(sizes, epochs)
    with pytest.raises(UserError, match="two final training sizes"):
        parse_args(["--progressive-resize", "160:192", "--progressive-epochs", "1:2", "--image-size", "224"])
    cfg = parse_args(["--progressive-resize", "160:192", "--progressive-epochs", "1:2"])
    assert cfg.data.train_image_size == 192 and cfg.data.eval_sizes == (192, 0)
    with pytest.raises(UserError, match="smaller than the evaluation crop"):
        parse_args(["--eval-image-size", "224", "--eval-resize", "200"])


@pytest.mark.slow
def test_progressive_run_resumes_at_the_scheduled_size_and_evaluates_at_the_eval_size(tmp_path, monkeypatch):
    # 2 steps per epoch; sizes by epoch 32, 64, 96, 96 (the ImageNet stem keeps 96 px cheap).
    out = tmp_path / "run"
    base = (
        TINY[: TINY.index("--image-size")]
        + TINY[TINY.index("--image-size") + 2 :]
        + [
            "--cifar-stem",
            "off",
            "--batch-size",
            "8",
            "--synthetic-samples",
            "16",
            "--epochs",
            "4",
            "--progressive-resize",
            "32:96",
            "--progressive-epochs",
            "0:2",
            "--eval-image-size",
            "64",
            "--eval-resize",
            "72",
            "--eval-every",
            "0",
            "--output-dir",
            str(out),
        ]
    )
    r = train_here(base + ["--max-steps", "3"])  # stops in epoch 2, at 64 px
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 1: training at 32 px" in r.stderr and "epoch 2: training at 64 px" in r.stderr
    r = train_here(base + ["--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "epoch 2: training at 64 px" in r.stderr and "epoch 3: training at 96 px" in r.stderr
    sizes = {x["step"]: x["image_size"] for x in read_metrics(out) if x["kind"] == "train"}
    assert sizes == {s: [32, 64, 96, 96][(s - 1) // 2] for s in range(1, 9)}, sizes

    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert {k: state["meta"][k] for k in ("image_size", "resize", "train_image_size")} == {
        "image_size": 64,
        "resize": 72,
        "train_image_size": 96,
    }
    # distres.evaluate feeds the model the training run's evaluation crop and resize.
    seen = []

    def spy(cfg, *args, **kw):
        bundle = build(cfg, *args, **kw)
        seen.append((bundle.eval_image_size, bundle.eval_resize))
        return bundle

    monkeypatch.setattr(evaluate.data, "build", spy)
    assert (
        evaluate.main(
            [
                "--checkpoint",
                str(out / "checkpoints" / "last.pt"),
                "--device",
                "cpu",
                "--output-dir",
                str(tmp_path / "eval"),
            ]
        )
        == 0
    )
    assert seen == [(64, 72)]
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    last = [x for x in read_metrics(out) if x["kind"] == "eval"][-1]
    assert summary["top1"] == pytest.approx(last["top1"])


def test_eval_crop_and_resize_in_loaders_and_predict(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=100)
    cfg = parse_args(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--image-size",
            "32",
            "--batch-size",
            "2",
            "--eval-image-size",
            "48",
            "--eval-resize",
            "60",
            "--workers",
            "0",
        ]
    )
    bundle = build(cfg, CPU, torch.contiguous_format)
    ((x, _),) = list(bundle.val)
    assert x.shape == (2, 3, 48, 48) and next(iter(bundle.train))[0].shape == (2, 3, 32, 32)
    path = bundle.val.source.name(0)
    want = TF.center_crop(TF.resize(inference.decode_torchvision(path), [60], antialias=True), [48, 48])
    mean = torch.tensor(bundle.mean).view(3, 1, 1) * 255
    std = torch.tensor(bundle.std).view(3, 1, 1) * 255
    assert torch.equal((x[0] * std + mean).round().to(torch.uint8), want)
    assert torch.equal(inference.read_image(path, {"image_size": 48, "resize": 60}), want)
    # 0: the crop / 0.875, as before
    assert inference.read_image(path, {"image_size": 70, "resize": 0}).shape == (3, 70, 70)


def test_torch_and_gpu_backends_change_size_per_epoch_alike(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}}, size=32)
    batches = {}
    for backend in ("torch", "gpu"):
        cfg = parse_args(
            [
                "--data",
                "imagefolder",
                "--data-dir",
                str(root),
                "--batch-size",
                "4",
                "--workers",
                "0",
                "--data-backend",
                backend,
                "--progressive-resize",
                "16:32",
                "--progressive-epochs",
                "0:1",
            ]
        )
        loader = build(cfg, CPU, torch.contiguous_format).train
        batches[backend] = []
        for epoch in (0, 1, 0):  # back to 16 px: as a resumed run would need it
            loader.set_epoch(epoch)
            batches[backend].append(torch.cat([x for x, _ in loader]))
    assert [b.shape[-1] for b in batches["torch"]] == [16, 32, 16]
    for t, g in zip(batches["torch"], batches["gpu"]):
        assert torch.equal(t, g)


def test_dali_refuses_progressive_resizing(tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    root = make_imagefolder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=32)
    cfg = parse_args(
        [
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--batch-size",
            "2",
            "--data-backend",
            "dali",
            "--progressive-resize",
            "16:32",
            "--progressive-epochs",
            "0:1",
        ]
    )
    with pytest.raises(UserError, match="dali pipeline is built for one image size"):
        build(cfg, CPU, torch.contiguous_format)
