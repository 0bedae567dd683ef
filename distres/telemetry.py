"""GPU telemetry from NVML (``nvidia-ml-py``): utilisation, memory, power, temperature, SM clock.

Each rank samples the one GPU it trains on, in a daemon thread, every few seconds. Per rank
rather than "local rank 0 samples the node": the rank knows exactly which physical GPU it
drives (found by UUID, whatever CUDA_VISIBLE_DEVICES or SLURM's GPU binding did to the
numbering), GPUs the job does not use are never reported, and a slow or throttled GPU stays
tied to its rank. One NVML query set costs microseconds, so N threads per node cost nothing
measurable. At each epoch end the per-GPU summaries are gathered to rank 0 (one small
collective, only on CUDA runs) and summarised as mean/max over all samples of all GPUs.

Without a driver (or on a CPU run) ``start`` prints one info line and returns a no-op.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch

SAMPLE_EVERY_S = 2.0
# What one sample holds; each is averaged and maxed per epoch.
FIELDS = ("util", "mem_used_mb", "power_w", "temp_c", "sm_clock_mhz")


class Telemetry:
    """Does nothing (CPU runs, no driver); the base of the NVML sampler.

    On a distributed CUDA run every rank must call ``epoch_summary`` (it is a collective),
    including ranks whose NVML failed, so ``collective`` is decided by the device alone.
    """

    def __init__(self, collective: bool = False):
        self.collective = collective

    def _take(self) -> dict | None:
        return None

    def epoch_summary(self) -> dict:
        """gpu_<field>_mean/_max over the epoch's samples of all GPUs (rank 0); {} without data."""
        local = self._take()
        if not self.collective:
            return summarise([local] if local else [])
        gathered: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, local)
        return summarise([g for g in gathered if g])

    def close(self) -> None:
        pass


class Sampler(Telemetry):
    """Calls ``read()`` (a dict of FIELDS) every ``interval_s`` in a daemon thread and keeps
    count, sum and max per field until the next ``_take``."""

    def __init__(
        self,
        read: Callable[[], dict],
        interval_s: float = SAMPLE_EVERY_S,
        collective: bool = False,
        close_fn: Callable[[], None] | None = None,
    ):
        super().__init__(collective)
        self._read, self._interval, self._close_fn = read, interval_s, close_fn
        self._lock = threading.Lock()
        self._stats: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="distres-telemetry", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(self._interval):
                return

    def _sample(self) -> None:
        try:
            values = self._read()
        except Exception:  # a failed query (GPU fell off the bus, ...) must not kill training
            return
        with self._lock:
            for k, v in values.items():
                if v is None:
                    continue
                n, s, m = self._stats.get(k, (0, 0.0, float("-inf")))
                self._stats[k] = [n + 1, s + float(v), max(m, float(v))]

    def _take(self) -> dict | None:
        self._sample()  # at least one sample, even for an epoch shorter than the interval
        with self._lock:
            stats, self._stats = self._stats, {}
        return stats or None

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._close_fn is not None:
            try:
                self._close_fn()
            except Exception:
                pass


def summarise(per_gpu: list[dict]) -> dict:
    """Combine per-GPU {field: [count, sum, max]} into gpu_<field>_mean / gpu_<field>_max, plus
    gpu_count and gpu_util_low (the lowest per-GPU mean utilisation: a starved or slow GPU)."""
    if not per_gpu:
        return {}
    out: dict = {"gpu_count": len(per_gpu)}
    for f in FIELDS:
        parts = [g[f] for g in per_gpu if f in g and g[f][0] > 0]
        if parts:
            out[f"gpu_{f}_mean"] = sum(p[1] for p in parts) / sum(p[0] for p in parts)
            out[f"gpu_{f}_max"] = max(p[2] for p in parts)
    utils = [g["util"][1] / g["util"][0] for g in per_gpu if "util" in g and g["util"][0] > 0]
    if utils:
        out["gpu_util_low"] = min(utils)
    return out


def _nvml_reader(pynvml, handle) -> Callable[[], dict]:
    def query(fn):
        try:
            return fn()
        except pynvml.NVMLError:  # e.g. power readings are not supported on every board
            return None

    def read() -> dict:
        return {
            "util": query(lambda: pynvml.nvmlDeviceGetUtilizationRates(handle).gpu),
            "mem_used_mb": query(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used / 2**20),
            "power_w": query(lambda: pynvml.nvmlDeviceGetPowerUsage(handle) / 1000.0),
            "temp_c": query(lambda: pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU)),
            "sm_clock_mhz": query(lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM)),
        }

    return read


def _handle(pynvml, device: torch.device):
    # CUDA's device numbering follows CUDA_VISIBLE_DEVICES, NVML's does not: match by UUID.
    uuid = getattr(torch.cuda.get_device_properties(device), "uuid", None)
    if uuid is not None:
        try:
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
        except pynvml.NVMLError:
            pass
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def start(ctx, interval_s: float = SAMPLE_EVERY_S) -> Telemetry:
    """The sampler for this rank's GPU, or a no-op (with one info line on rank 0)."""
    collective = ctx.device.type == "cuda" and ctx.distributed
    if ctx.device.type != "cuda":
        return _off(ctx, "training on CPU", collective)
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception as e:  # ImportError, NVMLError_LibraryNotFound, NVMLError_DriverNotLoaded
        return _off(ctx, f"NVML unavailable ({type(e).__name__}: {e})", collective)
    try:
        reader = _nvml_reader(pynvml, _handle(pynvml, ctx.device))
    except Exception as e:
        pynvml.nvmlShutdown()
        return _off(ctx, f"no NVML handle for {ctx.device} ({type(e).__name__}: {e})", collective)
    ctx.say(f"distres: GPU telemetry: NVML sampler every {interval_s:g} s on each rank's GPU")
    return Sampler(reader, interval_s, collective, close_fn=pynvml.nvmlShutdown)


def _off(ctx, why: str, collective: bool) -> Telemetry:
    ctx.say(f"distres: GPU telemetry off: {why}")
    return Telemetry(collective)
