"""Where a training step's time goes, and what to do about it.

``StepMeter`` owns the log window: it times the fetch of each step's batches (the data wait),
adds up the loss on the device, and at a log step flushes one ``kind: train`` record (the
window's loss reduced across ranks, images/s, data-wait fraction, ``step_time``,
``peak_mem_mb``, and ``synced`` under ``--bench-comm-probe``). It adds the windows up per
epoch, and at each epoch end logs a ``kind: epoch`` record with the epoch's data-wait
fraction, the GPU telemetry summary and the verdict: input-bound or compute-bound, with the
lever to try for the backend the run actually uses.

On CUDA the host's wait is not the GPU's: the host runs ahead, so while it waits for a batch
(or for a side stream's nvJPEG decode to finish) the GPU may still be running the steps queued
before. So the meter also records a CUDA event pair around each fetch on the compute stream:
the time between the GPU reaching the first and the second is how long the GPU sat idle for
that fetch (``gpu_idle_frac``), and only a run whose GPU idled for its data is input-bound.

The comm probe is how benchmarks/scaling.py measures the *exposed* communication time: with
``--bench-comm-probe`` the meter tells DDP's comm hook (``models.CommProbe``) to skip the
gradient all-reduce in every other log window, so neighbouring windows differ only in the
communication that backward could not hide. Interleaving (rather than one phase of each) keeps slow drifts of a shared
machine out of the difference.
"""

from __future__ import annotations

import importlib.util
import resource
import sys
import time

import torch

from distres import dist
from distres.config import NATIVE_SIZE
from distres.models import CommProbe
from distres.tracking import Logger

# At or above this share of step time spent waiting for the next batch, the input pipeline is
# the bottleneck: faster compute would only make the wait longer.
INPUT_BOUND_FRAC = 0.10
# Below this GPU utilisation without a data wait, the host (Python, kernel launches) is.
HOST_BOUND_UTIL = 70.0


def levers(cfg, device_type: str, backend: str) -> tuple[str, str]:
    """The first thing to try when input-bound, and when compute-bound, for this config and
    the data backend it resolved to (``data.loaders.resolve_backend``)."""
    if backend in ("synthetic", "gpu"):
        # No decoding to speed up: a batch is a gather on the device, so the wait is the
        # host's per-batch work, which a larger batch amortises.
        data = f"a larger --batch-size (the {backend} backend makes batches on the device)"
    elif device_type == "cuda" and cfg.data.dataset in NATIVE_SIZE:
        data = "--data-backend gpu (the whole data set resident on the GPU)"
    elif device_type == "cuda" and backend == "torch":
        installed = (
            importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None
        )
        data = "--data-backend dali" + ("" if installed else " (pip install -e '.[dali]')")
    else:
        data = "more --workers" + (f" (now {cfg.data.workers})" if cfg.data.workers >= 0 else "")
    if cfg.optim.amp == "none":
        compute = "--amp bf16"
    elif not cfg.model.channels_last:
        compute = "--channels-last"
    elif device_type == "cuda" and not cfg.model.compile:
        compute = "--compile"
    elif device_type == "cuda":
        compute = "more GPUs (benchmarks/scaling.py measures how well they scale)"
    else:
        compute = "a GPU (benchmarks/scaling.py measures CPU against GPU)"
    return data, compute


def input_bound(data_wait_frac: float, gpu_idle_frac: float | None = None) -> bool:
    """Whether the step waited for data: the host did, and (where measured: CUDA) so did the GPU."""
    idle = data_wait_frac if gpu_idle_frac is None else gpu_idle_frac
    return data_wait_frac >= INPUT_BOUND_FRAC and idle >= INPUT_BOUND_FRAC


def verdict(
    data_wait_frac: float,
    gpu_util: float | None,
    data_lever: str,
    compute_lever: str,
    gpu_idle_frac: float | None = None,
) -> tuple[str, str]:
    """('input-bound' | 'compute-bound', one-line explanation with the suggested lever).
    ``gpu_idle_frac``: the share of step time the GPU sat idle around the fetches (CUDA)."""
    pct = f"{100 * data_wait_frac:.0f}% of step time waiting for data"
    if input_bound(data_wait_frac, gpu_idle_frac):
        idle = "" if gpu_idle_frac is None else f" (the GPU idle {100 * gpu_idle_frac:.0f}%)"
        return "input-bound", f"input-bound: {pct}{idle} — try {data_lever}"
    if data_wait_frac >= INPUT_BOUND_FRAC:
        return "compute-bound", (
            f"compute-bound: the host spent {pct}, but the GPU ran queued steps meanwhile "
            f"(idle {100 * gpu_idle_frac:.0f}%) — try {compute_lever}"
        )
    if gpu_util is not None and gpu_util < HOST_BOUND_UTIL:
        return "compute-bound", (
            f"compute-bound on the host: {pct}, yet the GPU is only {gpu_util:.0f}% "
            "busy — try --compile --compile-mode reduce-overhead or a larger --batch-size"
        )
    util = f", GPU {gpu_util:.0f}% busy" if gpu_util is not None else ""
    return "compute-bound", f"compute-bound: {pct}{util} — try {compute_lever}"


class IdleGaps:
    """CUDA event pairs around a log window's fetches, on the compute stream, reused from
    window to window. Recording an event does not wait; the times are read at the window's
    flush, after its one synchronisation."""

    def __init__(self, event=None):
        self._event = event or (lambda: torch.cuda.Event(enable_timing=True))
        self._pairs: list[tuple] = []
        self._used = 0

    def reset(self) -> None:
        self._used = 0

    def before(self) -> None:
        if self._used == len(self._pairs):
            self._pairs.append((self._event(), self._event()))
        self._pairs[self._used][0].record()

    def after(self) -> None:
        self._pairs[self._used][1].record()
        self._used += 1

    def seconds(self) -> float:
        """The GPU's idle time over the window's fetches (events already completed)."""
        return sum(a.elapsed_time(b) for a, b in self._pairs[: self._used]) / 1e3


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class StepMeter:
    def __init__(self, cfg, ctx, global_batch: int, backend: str, logger: Logger | None = None):
        self.ctx, self.log_every, self.grad_accum, self.global_batch = (
            ctx,
            cfg.observe.log_every,
            cfg.optim.grad_accum,
            global_batch,
        )
        self.logger = logger if logger is not None else Logger()
        # (DDP, and so its comm hook, only exists with a process group)
        self.probe = CommProbe() if cfg.dist.bench_comm_probe and ctx.distributed else None
        # The probe compares step times; on CUDA the host runs ahead of the GPU, so it waits
        # for the GPU after every step and the host clock times the GPU's work.
        self.sync_steps = cfg.dist.bench_comm_probe and ctx.device.type == "cuda"
        self.levers = levers(cfg, ctx.device.type, backend)
        self.t_run = time.perf_counter()  # the run's clock: records' "time", the final summary
        self._loss = torch.zeros((), device=ctx.device)  # summed on the device: no host sync per step
        self.gaps = IdleGaps() if ctx.device.type == "cuda" else None
        self.refs: dict[str, str] = {}  # outputs the epoch verdict points at (a trace, the autotune table)
        self.fields: dict = {}  # added to every train record (--progressive-resize: the epoch's image_size)
        self._reset_epoch()
        self.start_window()

    def _reset_epoch(self) -> None:
        self.steps, self.elapsed, self.wait, self.idle = 0, 0.0, 0.0, 0.0

    def start_window(self, step: int = 0) -> None:
        """A log window from optimizer step ``step`` (steps done) on."""
        self._n, self._wait, self._t0 = 0, 0.0, time.perf_counter()
        if self.gaps is not None:
            self.gaps.reset()
        self._loss.zero_()
        if self.probe is not None:
            self.probe.skip = self._probing(step)

    def fetch(self, batches) -> list:
        """The next optimizer step's micro-batches; the time spent waiting for them is data wait."""
        t0 = time.perf_counter()
        if self.gaps is not None:
            self.gaps.before()
        micro = [next(batches) for _ in range(self.grad_accum)]
        if self.gaps is not None:
            self.gaps.after()
        self._wait += time.perf_counter() - t0
        return micro

    def label_fetch(self, name: str | None) -> None:
        """While a profiler runs, mark each fetch in its trace as ``name``; None: plain fetches
        again. (A method swapped on the instance: unlabelled steps pay nothing for it.)"""
        if name is None:
            self.__dict__.pop("fetch", None)
            return
        plain = type(self).fetch

        def fetch(batches) -> list:
            with torch.profiler.record_function(name):
                return plain(self, batches)

        self.fetch = fetch

    def _probing(self, step: int) -> bool:
        # step: optimizer steps done before this one; windows end at multiples of log_every.
        return self.probe is not None and (step // self.log_every) % 2 == 1

    def add(self, loss: torch.Tensor) -> None:
        """One optimizer step's mean loss (a device tensor, not read here)."""
        self._loss += loss
        self._n += 1
        if self.sync_steps:
            torch.cuda.synchronize(self.ctx.device)

    @property
    def pending_loss(self) -> torch.Tensor:
        """The losses of the window's steps so far, summed on the device (not read here)."""
        return self._loss

    def maybe_flush(self, step: int, epoch: float, lr: float, bad_samples: int, last: bool) -> dict | None:
        """The window's record when it ends at optimizer step ``step``: every --log-every steps,
        and at a pass's ``last`` step; else None."""
        if last or step % self.log_every == 0:
            return self.flush(step, epoch, lr, bad_samples)
        return None

    def flush(self, step: int, epoch: float, lr: float, bad_samples: int) -> dict:
        """Log the window ending at optimizer step ``step``, start the next one; the record.

        Note: the one host-device sync of the window (and, with N ranks, an all-reduce); kept
        off the other steps so the GPU queue never drains."""
        if self.ctx.device.type == "cuda":
            # The host runs ahead of the GPU: without waiting here the clock would stop when
            # the last step was queued, not when it finished.
            torch.cuda.synchronize(self.ctx.device)
        elapsed = time.perf_counter() - self._t0
        counts = torch.tensor([float(self._n), float(bad_samples)], device=self.ctx.device)
        red = dist.all_reduce_sum(torch.cat([self._loss.reshape(1).float(), counts]))
        rec = {
            "kind": "train",
            "step": step,
            "epoch": epoch,
            "loss": (red[0] / red[1]).item(),
            "lr": lr,
            "images_per_sec": self._n * self.global_batch / elapsed,
            "data_wait_frac": self._wait / elapsed,
            **({} if self.gaps is None else {"gpu_idle_frac": self.gaps.seconds() / elapsed}),
            "time": time.perf_counter() - self.t_run,
            "bad_samples": int(red[2].item()),  # undecodable images skipped so far, all ranks
            **self.window(self._n, elapsed, self._wait, step),
            **self.fields,
        }
        self.logger.log(rec)
        self.start_window(step)
        return rec

    def window(self, steps: int, elapsed: float, wait: float, step: int) -> dict:
        """Step-time fields for a window of ``steps`` steps ending at optimizer step ``step``;
        adds it to the epoch's totals."""
        self.steps, self.elapsed, self.wait = self.steps + steps, self.elapsed + elapsed, self.wait + wait
        if self.gaps is not None:
            self.idle += self.gaps.seconds()
        rec = {"step_time": elapsed / steps, "peak_mem_mb": peak_memory_mb(self.ctx.device)}
        if self.probe is not None:
            rec["synced"] = not self._probing(step - 1)
        return rec

    def epoch_end(self, telemetry, step: int, epoch: int) -> dict | None:
        """Log the epoch record and print the verdict (rank 0). Every rank must call it: the
        telemetry summary is a collective on CUDA runs."""
        gpu = telemetry.epoch_summary()
        if self.steps == 0:  # e.g. resumed exactly at the epoch's end
            return None
        frac = self.wait / self.elapsed if self.elapsed > 0 else 0.0
        idle = None if self.gaps is None else (self.idle / self.elapsed if self.elapsed > 0 else 0.0)
        label, detail = verdict(frac, gpu.get("gpu_util_mean"), *self.levers, gpu_idle_frac=idle)
        detail += "".join(f"; {what}: {where}" for what, where in self.refs.items())
        rec = {
            "kind": "epoch",
            "step": step,
            "epoch": epoch,
            "data_wait_frac": frac,
            **({} if idle is None else {"gpu_idle_frac": idle}),
            "step_time": self.elapsed / self.steps,
            # the epoch's mean, its first (warm-up) windows included: benchmarks take the
            # median of the steady-state train windows instead
            "images_per_sec": self.steps * self.global_batch / self.elapsed if self.elapsed > 0 else 0.0,
            "peak_mem_mb": peak_memory_mb(self.ctx.device),
            "verdict": label,
            "verdict_detail": detail,
            **gpu,
        }
        self.logger.log(rec)
        self.ctx.say(f"distres: epoch {epoch}: {detail}")
        self._reset_epoch()
        return rec
