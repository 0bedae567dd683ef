"""GPU telemetry (NVML) and the per-epoch input-bound / compute-bound verdict."""

import statistics
import time

import pytest
import torch

from distres import perf, telemetry
from distres.config import TrainConfig
from distres.dist import DistContext


def _nvml_present() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
        return True
    except Exception:
        return False


def _ctx(device: str) -> DistContext:
    return DistContext(
        rank=0, local_rank=0, world_size=1, local_world_size=1, device=torch.device(device), backend=None
    )


def test_no_driver_is_a_noop_with_one_info_line(capsys):
    if _nvml_present():
        pytest.skip("an NVIDIA driver is present: this test is for machines without one")
    tel = telemetry.start(_ctx("cuda:0"))  # real NVML: nvmlInit fails, no torch.cuda call happens
    assert type(tel) is telemetry.Telemetry
    assert tel.epoch_summary() == {}
    tel.close()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("distres: GPU telemetry off: NVML unavailable"), lines


def test_cpu_run_is_a_noop_with_one_info_line(capsys):
    tel = telemetry.start(_ctx("cpu"))
    assert tel.epoch_summary() == {}
    tel.close()
    assert capsys.readouterr().err.splitlines() == ["distres: GPU telemetry off: training on CPU"]


def test_sampler_thread_summarises_its_samples():
    seen = []

    def read():
        seen.append(len(seen))
        if len(seen) == 2:
            raise RuntimeError("a failed query is skipped")
        return {"util": 10.0 * len(seen), "power_w": None, "temp_c": 60}

    tel = telemetry.Sampler(read, interval_s=0.005)
    deadline = time.monotonic() + 10
    while len(seen) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    tel.close()
    assert not tel._thread.is_alive()
    got = tel.epoch_summary()  # takes one more sample itself
    utils = [10.0 * (i + 1) for i in range(len(seen)) if i != 1]
    assert got["gpu_count"] == 1
    assert got["gpu_util_mean"] == pytest.approx(statistics.mean(utils))
    assert got["gpu_util_max"] == max(utils)
    assert got["gpu_temp_c_mean"] == 60 and got["gpu_temp_c_max"] == 60
    assert "gpu_power_w_mean" not in got  # never reported: not a zero
    assert tel.epoch_summary()["gpu_util_mean"] == 10.0 * (len(seen))  # a new epoch starts empty


def test_summarise_combines_gpus_by_sample_count():
    a = {"util": [2, 100.0, 60.0], "mem_used_mb": [2, 2000.0, 1000.0]}
    b = {"util": [1, 90.0, 90.0]}
    got = telemetry.summarise([a, b])
    assert got["gpu_count"] == 2
    assert got["gpu_util_mean"] == pytest.approx(190 / 3)
    assert got["gpu_util_max"] == 90.0
    assert got["gpu_util_low"] == 50.0  # GPU a averaged 50%
    assert got["gpu_mem_used_mb_mean"] == 1000.0
    assert telemetry.summarise([]) == {}


def test_verdict_input_bound_names_the_lever():
    assert perf.verdict(0.41, None, "--data-backend dali", "--compile") == (
        "input-bound",
        "input-bound: 41% of step time waiting for data — try --data-backend dali",
    )
    assert perf.verdict(perf.INPUT_BOUND_FRAC, None, "x", "y")[0] == "input-bound"


def test_verdict_compute_bound_and_host_bound():
    label, msg = perf.verdict(0.02, None, "--workers", "--compile")
    assert label == "compute-bound" and msg == "compute-bound: 2% of step time waiting for data — try --compile"
    label, msg = perf.verdict(0.02, 95.0, "--workers", "--compile")
    assert label == "compute-bound" and "GPU 95% busy" in msg and "--compile" in msg
    label, msg = perf.verdict(0.02, 40.0, "--workers", "--amp bf16")
    assert label == "compute-bound" and "only 40% busy" in msg and "reduce-overhead" in msg


def test_levers_follow_the_config():
    cfg = TrainConfig(data="imagefolder", data_dir="x", amp="none")
    assert perf.levers(cfg, "cpu", "torch") == ("more --workers", "--amp bf16")
    cfg = TrainConfig(data="imagefolder", data_dir="x", workers=4)
    data, compute = perf.levers(cfg, "cuda", "torch")
    assert compute == "--compile"
    assert data.startswith("--data-backend dali")
    cfg.model.compile = True
    assert perf.levers(cfg, "cuda", "torch")[1].startswith("more GPUs")


@pytest.mark.parametrize(
    "data,device,wrong",
    [
        ("cifar10", "cuda", "--data-backend gpu"),
        ("synthetic", "cuda", "--data-backend dali"),
        ("synthetic", "cpu", "--workers"),
    ],
)
def test_levers_follow_the_resolved_backend(data, device, wrong):
    """With the default --data-backend auto, CIFAR-10 on CUDA already runs on the gpu backend and
    synthetic data on the synthetic one: neither is told to switch to what it already uses, nor
    to DALI or more workers, which would not touch its data path."""
    from distres.data.loaders import resolve_backend

    cfg = TrainConfig(data=data)
    backend = resolve_backend(cfg.data_backend, data, torch.device(device))
    advice, _ = perf.levers(cfg, device, backend)
    assert wrong not in advice and "dali" not in advice and "--workers" not in advice
    assert advice.startswith("a larger --batch-size")
    assert perf.levers(cfg, device, "torch")[0] != advice  # the torch backend gets other advice
