"""CUDA paths, run only where there is a GPU (`pytest -m gpu`; skipped elsewhere, as in CI).

Each drives the real components: the CLI under nccl, the gpu backend against itself on the
CPU, the RNG through a real checkpoint file, NVML on this GPU, and an audit of host-device
synchronisation in steady-state training steps of every backend."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.helpers import make_imagefolder, read_metrics, run_train, train_losses

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SMALL = [
    "--arch",
    "resnet18",
    "--data",
    "synthetic",
    "--image-size",
    "32",
    "--synthetic-classes",
    "10",
    "--device",
    "cuda",
    "--no-progress",
    "--wandb",
    "disabled",
    "--batch-size",
    "64",
    "--synthetic-samples",
    "4096",
    "--eval-every",
    "0",
]


def test_nccl_group_of_one_through_the_real_loop(tmp_path):
    out = tmp_path / "run"
    r = run_train(
        SMALL
        + [
            "--dist-backend",
            "nccl",
            "--max-steps",
            "20",
            "--log-every",
            "5",
            "--checkpoint-every",
            "10",
            "--output-dir",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "on 1 x cuda (nccl)" in r.stderr
    assert [x["step"] for x in read_metrics(out) if x["kind"] == "train"] == [5, 10, 15, 20]
    state = torch.load(out / "checkpoints/last.pt", weights_only=True)
    assert len(state["rng"]) == 1 and len(state["rng"][0]["cuda"]) == 1  # this rank's GPU only


def test_fp16_with_gradscaler_and_clipping(tmp_path):
    out = tmp_path / "run"
    r = run_train(
        SMALL
        + [
            "--amp",
            "fp16",
            "--clip-grad-norm",
            "1.0",
            "--max-steps",
            "20",
            "--log-every",
            "5",
            "--output-dir",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    losses = train_losses(out)
    assert len(losses) == 4 and all(map(lambda x: x == x and abs(x) < 100, losses))
    scaler = torch.load(out / "checkpoints/last.pt", weights_only=True)["scaler"]
    assert scaler["scale"] > 0


def _bundle(root, device: str, backend: str, workers: int = 0, size: int = 32, extra: tuple = ()):
    from distres.config import parse_args
    from distres.data import build
    from distres.dist import DistContext

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
            "16",
            "--data-backend",
            backend,
            "--workers",
            str(workers),
            *extra,
        ]
    )
    ctx = DistContext(0, 0, 1, 1, torch.device(device, 0) if device == "cuda" else torch.device("cpu"), None)
    return build(cfg, ctx, torch.channels_last)


def test_gpu_backend_on_the_gpu_matches_itself_on_the_cpu(tmp_path):
    root = make_imagefolder(tmp_path / "data", {"train": {"a": 40, "b": 40}, "val": {"a": 10, "b": 11}})
    gpu, cpu = _bundle(root, "cuda", "gpu"), _bundle(root, "cpu", "gpu")
    for split in ("train", "val"):
        for epoch in (0, 1):
            for loader in (getattr(gpu, split), getattr(cpu, split)):
                loader.set_epoch(epoch)
            pairs = list(zip(getattr(gpu, split), getattr(cpu, split)))
            assert len(pairs) == getattr(cpu, split).sampler.num_batches() > 0
            for (xg, yg), (xc, yc) in pairs:
                assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(yg.cpu(), yc) and torch.equal(xg.cpu(), xc)


def test_nvjpeg_decoding_matches_the_workers_and_trains(tmp_path):
    """--decode-on device on the GPU (nvJPEG, then crops on the device): the same samples, boxes
    and labels as the CPU workers, the pixels within nvJPEG's and the float resize's rounding;
    and a short training run on it. The JPEGs are 4:4:4: with subsampled chroma the decoders
    differ by design (nvJPEG's default replicates chroma, libjpeg-turbo interpolates it: about
    0.25 in these units on this noise, 0.16 after the resize to 80 px), and data/base.py says so."""
    from PIL import Image

    from tests.helpers import break_jpeg

    root = make_imagefolder(
        tmp_path / "data", {"train": {"a": 40, "b": 40}, "val": {"a": 10, "b": 11}}, size=96, chroma_444=True
    )
    break_jpeg(root / "train/a/0001.jpg", "truncated")  # fails in the workers, in either mode
    break_jpeg(root / "train/a/0002.jpg", "corrupt")  # fails nvJPEG, the retry and the CPU decoder
    Image.new("L", (90, 70), 77).save(root / "train/b/gray.jpg")  # 1 channel, expanded to RGB
    Image.new("RGB", (90, 70), (1, 2, 3)).save(root / "train/b/lossless.png")  # decoded by the workers
    for size in (32, 80):
        bundles = [
            _bundle(root, "cpu", "torch", 2, size),
            _bundle(root, "cuda", "torch", 2, size, ("--decode-on", "device")),
        ]
        for split in ("train", "val"):
            for b in bundles:
                getattr(b, split).set_epoch(1)
            pairs = list(zip(getattr(bundles[0], split), getattr(bundles[1], split)))
            assert len(pairs) == getattr(bundles[0], split).sampler.num_batches() > 0
            for (xc, yc), (xg, yg) in pairs:
                assert xg.is_cuda and xg.is_contiguous(memory_format=torch.channels_last)
                assert torch.equal(yg.cpu(), yc)
                # no chroma upsampling: the IDCTs' rounding, under 3 grey levels; another crop of this noise: tens
                assert (xg.cpu() - xc).abs().mean() < 0.05
        assert bundles[0].train.bad_samples == bundles[1].train.bad_samples == 2
    r = run_train(
        [
            "--arch",
            "resnet18",
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--image-size",
            "64",
            "--decode-on",
            "device",
            "--device",
            "cuda",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--no-progress",
            "--wandb",
            "disabled",
            "--output-dir",
            str(tmp_path / "run"),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert [x["epoch"] for x in read_metrics(tmp_path / "run") if x["kind"] == "eval"] == [1, 2]


def test_cuda_rng_round_trips_through_a_checkpoint(tmp_path):
    from distres import checkpoint

    device = torch.device("cuda", 0)
    torch.cuda.manual_seed(5)
    checkpoint.atomic_save({"rng": checkpoint.rng_state(device)}, tmp_path / "r.pt")
    expected = torch.rand(4, device=device)
    torch.rand(100, device=device)  # move the generator on
    checkpoint.set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"], device)
    assert torch.equal(torch.rand(4, device=device), expected)


def test_nvml_telemetry_samples_this_gpu():
    pytest.importorskip("pynvml")
    from distres import telemetry
    from distres.dist import DistContext

    ctx = DistContext(0, 0, 1, 1, torch.device("cuda", 0), None)
    sampler = telemetry.start(ctx, interval_s=0.1)
    try:
        assert isinstance(sampler, telemetry.Sampler)
        x = torch.randn(4096, 4096, device="cuda")
        for _ in range(50):
            x = x @ x / 4096
        torch.cuda.synchronize()
        summary = sampler.epoch_summary()
    finally:
        sampler.close()
    assert summary["gpu_count"] == 1 and summary["gpu_mem_used_mb_max"] > 0
    assert 0 <= summary["gpu_util_mean"] <= 100


@pytest.mark.parametrize("backend", ["synthetic", "gpu", "torch", "dali"])
def test_no_host_sync_in_steady_state_steps(tmp_path, backend, monkeypatch):
    """Between two log steps a training step must never make the host wait for the GPU: not in
    the loader (a pageable copy), not in the step. Log steps synchronise once, by design."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed")
    from distres import engine, train

    if backend == "synthetic":
        args = SMALL[:]
    else:
        root = make_imagefolder(tmp_path / "data", {"train": {"a": 600, "b": 600}, "val": {"a": 8, "b": 8}})
        args = [
            "--arch",
            "resnet18",
            "--data",
            "imagefolder",
            "--data-dir",
            str(root),
            "--image-size",
            "32",
            "--data-backend",
            backend,
            "--workers",
            "2",
            "--device",
            "cuda",
            "--batch-size",
            "32",
        ]
    steps, log_every = 30, 10
    marks, real = [], engine.train_step
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")

        def counted(*a, **k):
            marks.append(len(caught))  # warnings before step len(marks)
            return real(*a, **k)

        monkeypatch.setattr(engine, "train_step", counted)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            code = train.main(
                args
                + [
                    "--output-dir",
                    str(tmp_path / "run"),
                    "--max-steps",
                    str(steps),
                    "--log-every",
                    str(log_every),
                    "--checkpoint-every",
                    "0",
                    "--eval-every",
                    "0",
                    "--no-progress",
                    "--wandb",
                    "disabled",
                ]
            )
        finally:
            torch.cuda.set_sync_debug_mode(0)
    assert code == 0 and len(marks) == steps
    syncs = lambda i: [str(w.message) for w in caught[marks[i] : marks[i + 1]] if "synchroniz" in str(w.message)]  # noqa: E731
    # From step 3 on (warm-up over), every step but the log steps (whose flush synchronises).
    steady = [i for i in range(2, steps - 1) if (i + 1) % log_every != 0]
    bad = {i + 1: syncs(i) for i in steady if syncs(i)}
    assert not bad, f"host-device syncs in steady-state steps: {bad}"


def test_ema_frozen_head_and_evaluate_predict_export_on_the_gpu(tmp_path):
    """Fine-tuning machinery on CUDA: a head-only first epoch, EMA and best.pt under nccl; then
    evaluate on the GPU reproduces the run's last figures, predict scores on the GPU, and the
    export's parity check passes from a GPU-trained checkpoint. The run is --deterministic:
    under cudnn.benchmark each process times its own convolution algorithms, and another
    algorithm can flip a near-tie between two classes (evaluate takes the run's flags)."""
    import importlib.util
    import json
    import subprocess
    import sys

    from tests.helpers import REPO, cli_env

    data = make_imagefolder(tmp_path / "data", {"train": {"a": 64, "b": 64}, "val": {"a": 10, "b": 11}}, size=40)
    out = tmp_path / "run"
    r = run_train(
        [
            "--arch",
            "resnet18",
            "--data",
            "imagefolder",
            "--data-dir",
            str(data),
            "--image-size",
            "32",
            "--device",
            "cuda",
            "--dist-backend",
            "nccl",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--freeze-backbone-epochs",
            "1",
            "--ema-decay",
            "0.9",
            "--deterministic",
            "--no-progress",
            "--wandb",
            "disabled",
            "--output-dir",
            str(out),
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    last = [m for m in read_metrics(out) if m["kind"] == "eval"][-1]
    fmt = "onnx" if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript") else "torchscript"
    for tool, args in (
        ("evaluate", ["--weights", "raw", "--output-dir", str(tmp_path / "eval")]),
        ("predict", [str(data / "val"), "--output", str(tmp_path / "p.csv")]),
        # ONNX where the export extra is installed (a bare GPU image may lack it), else TorchScript
        ("export", ["--format", fmt, "--output", str(tmp_path / f"m.{fmt}")]),
    ):
        p = subprocess.run(
            [sys.executable, "-m", f"distres.{tool}", "--checkpoint", str(out / "checkpoints/last.pt"), *args],
            cwd=REPO,
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert p.returncode == 0, (tool, p.stderr[-3000:])
    summary = json.loads((tmp_path / "eval/summary.json").read_text())
    assert summary["top1"] == last["top1"] and summary["eval_samples"] == 21
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 22


def test_smoke_run_of_the_gpu_paths(tmp_path):
    """Profile, autotune, augmentation on the gpu backend, EMA, TensorBoard, reduce-overhead
    compilation and a resume, in one short run (tests/test_gpu_paths.py says what it checks)."""
    from tests.test_gpu_paths import smoke_run

    smoke_run(tmp_path, "cuda", compiled=True)


# The compile-heavy tests last: a visit's time may end inside them, after every other result.
def test_compiled_ddp_with_gradient_accumulation_resumes(tmp_path):
    """torch.compile over DDP (a group of one, nccl) with 2 micro-batches per step; stopped and
    resumed on the GPU, the run ends where an uninterrupted one does."""
    common = SMALL + [
        "--dist-backend",
        "nccl",
        "--compile",
        "--grad-accum",
        "2",
        "--log-every",
        "4",
        "--checkpoint-every",
        "0",
        "--epochs",
        "1",
        "--synthetic-samples",
        "1024",
        "--schedule",
        "constant",
        "--warmup-epochs",
        "0",
    ]
    r = run_train(common + ["--max-steps", "4", "--output-dir", str(tmp_path / "run")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(common + ["--resume", "--output-dir", str(tmp_path / "run")], timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from" in r.stderr and "at step 4" in r.stderr
    assert [x["step"] for x in read_metrics(tmp_path / "run") if x["kind"] == "train"] == [4, 8]
