"""Where a training step's time goes, and what to do about it.

``StepMeter`` adds the step-time fields to each logged window (``step_time`` seconds per step,
``peak_mem_mb``, and ``synced`` under ``--bench-comm-probe``), adds the windows up per epoch,
and at each epoch end logs a ``kind: epoch`` record with the epoch's data-wait fraction, the
GPU telemetry summary and the verdict: input-bound or compute-bound, with the lever to try.

The comm probe is how benchmarks/scaling.py measures the *exposed* communication time: with
``--bench-comm-probe`` every other log window runs its steps inside DDP's ``no_sync()`` (no
gradient all-reduce), so neighbouring windows differ only in the communication that backward
could not hide. Interleaving (rather than one phase of each) keeps slow drifts of a shared
machine out of the difference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import resource
import sys

import torch
import torch.nn as nn

from distres.tracking import console

# At or above this share of step time spent waiting for the next batch, the input pipeline is
# the bottleneck: faster compute would only make the wait longer.
INPUT_BOUND_FRAC = 0.10
# Below this GPU utilisation without a data wait, the host (Python, kernel launches) is.
HOST_BOUND_UTIL = 70.0


def levers(cfg, device_type: str) -> tuple[str, str]:
    """The first thing to try when input-bound, and when compute-bound, for this config."""
    if device_type == "cuda" and cfg.data == "cifar10" and cfg.data_backend != "gpu":
        data = "--data-backend gpu (the whole data set resident on the GPU)"
    elif device_type == "cuda" and cfg.data_backend != "dali":
        installed = importlib.util.find_spec("nvidia") is not None and \
            importlib.util.find_spec("nvidia.dali") is not None
        data = "--data-backend dali" + ("" if installed else " (pip install -e '.[dali]')")
    else:
        data = "more --workers" + (f" (now {cfg.workers})" if cfg.workers >= 0 else "")
    if cfg.amp == "none":
        compute = "--amp bf16"
    elif not cfg.channels_last:
        compute = "--channels-last"
    elif device_type == "cuda" and not cfg.compile:
        compute = "--compile"
    elif device_type == "cuda":
        compute = "more GPUs (benchmarks/scaling.py measures how well they scale)"
    else:
        compute = "a GPU (benchmarks/scaling.py measures CPU against GPU)"
    return data, compute


def verdict(data_wait_frac: float, gpu_util: float | None, data_lever: str,
            compute_lever: str) -> tuple[str, str]:
    """('input-bound' | 'compute-bound', one-line explanation with the suggested lever)."""
    pct = f"{100 * data_wait_frac:.0f}% of step time waiting for data"
    if data_wait_frac >= INPUT_BOUND_FRAC:
        return "input-bound", f"input-bound: {pct} — try {data_lever}"
    if gpu_util is not None and gpu_util < HOST_BOUND_UTIL:
        return "compute-bound", (f"compute-bound on the host: {pct}, yet the GPU is only {gpu_util:.0f}% "
                                 "busy — try --compile --compile-mode reduce-overhead or a larger --batch-size")
    util = f", GPU {gpu_util:.0f}% busy" if gpu_util is not None else ""
    return "compute-bound", f"compute-bound: {pct}{util} — try {compute_lever}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def _ddp(model: nn.Module) -> nn.parallel.DistributedDataParallel | None:
    while not isinstance(model, nn.parallel.DistributedDataParallel):
        if not hasattr(model, "_orig_mod"):  # torch.compile wraps DDP
            return None
        model = model._orig_mod
    return model


class StepMeter:
    def __init__(self, cfg, ctx, model: nn.Module, global_batch: int):
        self.ctx, self.log_every, self.global_batch = ctx, cfg.log_every, global_batch
        self.ddp = _ddp(model) if cfg.bench_comm_probe else None
        self.levers = levers(cfg, ctx.device.type)
        self._reset()

    def _reset(self) -> None:
        self.steps, self.elapsed, self.wait = 0, 0.0, 0.0

    def _probing(self, step: int) -> bool:
        # step: optimizer steps done before this one; windows end at multiples of log_every.
        return self.ddp is not None and (step // self.log_every) % 2 == 1

    def step_context(self, step: int):
        """no_sync() for the steps of every other window under --bench-comm-probe."""
        return self.ddp.no_sync() if self._probing(step) else contextlib.nullcontext()

    def window(self, steps: int, elapsed: float, wait: float, step: int) -> dict:
        """Fields for a logged window of ``steps`` steps ending at optimizer step ``step``."""
        self.steps, self.elapsed, self.wait = self.steps + steps, self.elapsed + elapsed, self.wait + wait
        rec = {"step_time": elapsed / steps, "peak_mem_mb": peak_memory_mb(self.ctx.device)}
        if self.ddp is not None:
            rec["synced"] = not self._probing(step - 1)
        return rec

    def epoch_end(self, logger, telemetry, step: int, epoch: int) -> dict | None:
        """Log the epoch record and print the verdict (rank 0). Every rank must call it: the
        telemetry summary is a collective on CUDA runs."""
        gpu = telemetry.epoch_summary()
        if self.steps == 0:  # e.g. resumed exactly at the epoch's end
            return None
        frac = self.wait / self.elapsed if self.elapsed > 0 else 0.0
        label, detail = verdict(frac, gpu.get("gpu_util_mean"), *self.levers)
        rec = {"kind": "epoch", "step": step, "epoch": epoch, "data_wait_frac": frac,
               "step_time": self.elapsed / self.steps,
               "images_per_sec": self.steps * self.global_batch / self.elapsed if self.elapsed > 0 else 0.0,
               "peak_mem_mb": peak_memory_mb(self.ctx.device), "verdict": label, "verdict_detail": detail,
               **gpu}
        logger.log(rec)
        if self.ctx.is_main:
            console(f"distres: epoch {epoch}: {detail}")
        self._reset()
        return rec
