"""``--profile-steps A:B``: torch.profiler over optimizer steps A..B on every rank.

``ProfileWindow`` hooks into ``train.train_epoch``'s step loop through one attribute, ``at``: the
number of optimizer steps done at which the window next needs a call (A - 1, then each step
of the window, then -1 for never). Outside the window the loop's only profiling work is
comparing that int with its step count, and nothing else of the run is touched.

Inside the window each step is a ``ProfilerStep#N`` span (N = the step's number in
metrics.jsonl, so a trace names the same steps as the logs), the batch fetch a
``distres: data wait`` span, and when B ends the profiler stops, each rank writes its trace
(``OUTPUT_DIR/profile/rankR.<ms>.pt.trace.json``, Chrome/Perfetto format, the names
``tensorboard_trace_handler`` gives, so TensorBoard's profiler plugin finds them) and rank 0
prints a summary: the top ops by self time and the window's wall time split into convolutions
(and matmuls), normalisation/elementwise, communication, data wait and host overhead
(``summarize``). The summary also goes to ``OUTPUT_DIR/profile/summary-rankR.json``.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

import torch

from distres.errors import UserError

DATA_WAIT = "distres: data wait"
STEP_PREFIX = "ProfilerStep#"
NEVER = -1
CATEGORIES = ("convolution/matmul", "normalisation/elementwise", "communication", "data wait", "host overhead")

# Host ops (aten::...) by name. Normalisation first: aten::cudnn_batch_norm is not a convolution.
_NORM_OPS = ("norm",)
_CONV_OPS = ("conv", "mm", "matmul", "linear", "gemm")
# GPU kernels by family (names as CUDA traces give them; cuDNN, cuBLAS(Lt) and Inductor name
# their kernels by what they compute, not by the library, which makes both kinds of kernel):
# normalisation, layout transposes and elementwise/reduction kernels first, as some of their
# names also hold "conv" or "cudnn" (Inductor's triton_poi_fused_convolution_backward_...,
# cuDNN's bn_fw_tr_1C11_kernel_NCHW and nchwToNhwcKernel) ...
_ELEMENTWISE_KERNELS = (
    "bn_fw",
    "bn_bw",
    "batch_norm",
    "batchnorm",
    "welford",
    "layer_norm",
    "tonhwc",
    "tonchw",
    "elementwise",
    "reduce_kernel",
    "multi_tensor_apply",
    "softmax",
    "pool",
    "triton_poi",
    "triton_red",
    "triton_per",
)
# ... then the convolution and matmul families: cuDNN's implicit-GEMM convolutions
# (sm90_xmma_fprop_implicit_gemm_..., dgrad, wgrad), cuBLAS/CUTLASS GEMMs (sm90_xmma_gemm_...,
# cutlass3x_sm90_tensorop_..., ampere_bf16_s16816gemm_...), Hopper's cuBLASLt nvjet_* kernels
# and Inductor's templated ones (triton_tem_fused_mm_..., triton_tem_fused_convolution_...).
_CONV_KERNELS = (
    "conv",
    "gemm",
    "xmma",
    "cutlass",
    "nvjet",
    "fprop",
    "dgrad",
    "wgrad",
    "implicit",
    "s16816",
    "s1688",
    "hmma",
    "triton_tem",
    "cublas",
    "matmul",
)
_COMM = (
    "allreduce",
    "all_reduce",
    "allgather",
    "all_gather",
    "broadcast",
    "reduce_scatter",
    "gloo",
    "nccl",
    "c10d",
    "record_param_comms",
    "barrier",
    "processgroup",
)


def category(name: str) -> str:
    """Where a host op's self time goes, by its name."""
    low = name.lower()
    if low.startswith("aten::"):
        op = low[6:]
        conv = not any(k in op for k in _NORM_OPS) and any(k in op for k in _CONV_OPS)
        return "convolution/matmul" if conv else "normalisation/elementwise"
    if any(k in low for k in _COMM):  # c10d::allreduce_, gloo:all_reduce, nccl:..., record_param_comms
        return "communication"
    return "host overhead"  # the step span itself, Python annotations, autograd's own frames


class ProfileWindow:
    def __init__(self, observe, ctx, out: Path, step: int, total_steps: int):
        self.at = NEVER
        win = observe.profile_window
        if win is None:
            return
        self.first, self.last = win
        if self.last > total_steps:
            raise UserError(
                f"--profile-steps {observe.profile_steps}: the run has {total_steps} steps; "
                f"pick a window that ends by step {total_steps}"
            )
        if step >= self.first:
            ctx.say(
                f"distres: note: resumed at step {step}, past the start of --profile-steps "
                f"{observe.profile_steps}; no profile this time"
            )
            return
        self.observe, self.ctx, self.folder = observe, ctx, out / "profile"
        self.meter = None  # the run's perf.StepMeter, from the first boundary on
        self.prof = None
        self.span = None  # the open ProfilerStep#N record_function
        self.t_open = 0.0
        self.wall = 0.0  # host clock over the ProfilerStep spans
        self.trace: Path | None = None
        self.at = self.first - 1

    def step(self, step: int, meter) -> None:
        """At the top of the step loop, ``step`` steps done: the one comparison a step pays
        outside the window."""
        if step == self.at:
            self.boundary(step, meter)

    def boundary(self, step: int, meter) -> None:
        """At the top of the step loop, ``step`` steps done: start, advance or end the window."""
        self._close_span()
        if self.prof is None:
            self.meter = meter
            self._start()
        if step >= self.last:
            self._finish()
            return
        self.span = torch.profiler.record_function(f"{STEP_PREFIX}{step + 1}")
        self.span.__enter__()
        self.t_open = time.perf_counter()
        self.at = step + 1

    def epoch_end(self, step: int) -> None:
        """After an epoch's last step: close its span, so that the checkpoint and evaluation
        between epochs stay out of the step spans (the next epoch's loop reopens one)."""
        if self.at == step and self.prof is not None:
            self._close_span()
            if step >= self.last:
                self._finish()

    def _start(self) -> None:
        # Kineto logs to stderr at info level, including a GPU probe's error on CPU-only machines,
        # and its "USDT: ... profiler_start/profiler_stop" trace marks sit at level 5, above its
        # errors (4): only 6 keeps them all off the console. Kineto reads the variable once, when
        # the process first profiles, which is here.
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")
        acts = [torch.profiler.ProfilerActivity.CPU]
        if self.ctx.device.type == "cuda":
            acts.append(torch.profiler.ProfilerActivity.CUDA)
        self.prof = torch.profiler.profile(
            activities=acts,
            record_shapes=self.observe.profile_shapes,
            profile_memory=self.observe.profile_memory,
        )
        self.prof.start()
        self.meter.label_fetch(DATA_WAIT)

    def _close_span(self) -> None:
        if self.span is not None:
            if self.ctx.device.type == "cuda":
                # The span's GPU work belongs to it: without this the last steps' kernels would
                # run after the profiler stopped.
                torch.cuda.synchronize(self.ctx.device)
            self.span.__exit__(None, None, None)
            self.wall += time.perf_counter() - self.t_open
            self.span = None

    def _finish(self) -> None:
        self.at = NEVER
        self.meter.label_fetch(None)
        self.prof.stop()
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.profiler.tensorboard_trace_handler(str(self.folder), worker_name=f"rank{self.ctx.rank}")(self.prof)
        self.trace = max(self.folder.glob(f"rank{self.ctx.rank}.*.pt.trace.json"), key=lambda p: p.stat().st_mtime)
        summary = summarize(json.loads(self.trace.read_text()), self.ctx.device.type)
        summary.update(
            rank=self.ctx.rank, first=self.first, last=self.last, host_wall_s=self.wall, trace=str(self.trace)
        )
        (self.folder / f"summary-rank{self.ctx.rank}.json").write_text(json.dumps(summary, indent=1) + "\n")
        self.meter.refs["trace"] = str(self.folder / f"rank{self.ctx.rank}.*.pt.trace.json")
        self.ctx.say(format_summary(summary, self.folder))
        self.prof = None

    def close(self) -> None:
        """The run ended inside the window (preemption, an error): stop the profiler, no trace."""
        if getattr(self, "prof", None) is not None:
            self.span = None
            self.meter.label_fetch(None)
            self.prof.stop()
            self.prof = None
        self.at = NEVER


def _nest(events: list[dict]) -> list[tuple[dict, float]]:
    """[(event, self time in us)] for one thread's complete events, nesting by time."""
    events = sorted(events, key=lambda e: (e["ts"], -e["dur"]))
    out: list[list] = []
    stack: list[list] = []  # [event, end, self]
    for e in events:
        end = e["ts"] + e["dur"]
        while stack and e["ts"] >= stack[-1][1] - 1e-3:
            out.append(stack.pop())
        if stack:
            stack[-1][2] -= min(e["dur"], stack[-1][1] - e["ts"])  # a child's time is not its parent's own
        stack.append([e, end, float(e["dur"])])
    out += stack
    return [(e, max(0.0, own)) for e, _, own in out]


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        lo, hi = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        total += max(0.0, hi - lo)
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def _subtract(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Parts of the (merged) intervals a not covered by the (merged) intervals b."""
    out = []
    for lo, hi in a:
        cur = lo
        for blo, bhi in b:
            if bhi <= cur or blo >= hi:
                continue
            if blo > cur:
                out.append((cur, blo))
            cur = max(cur, bhi)
        if cur < hi:
            out.append((cur, hi))
    return out


def summarize(trace: dict, device_type: str) -> dict:
    """The window's wall time (the sum of its ProfilerStep spans) split into CATEGORIES, and the
    top ops by self time.

    CPU: the training thread's timeline. Every op's self time (its time minus its children's)
    goes to the category of its name (``category``); the fetch span counts whole as data wait;
    the self time of the step spans, Python annotations and autograd's own frames is host
    overhead, except the part of it during which a collective ran on another thread (the gloo
    work the training thread waited for), which is communication. The parts add up to the
    spans by construction; nothing is scaled.

    CUDA: the GPU's timeline within the spans. Kernel time by kernel name (compute before
    communication where they overlap: only communication that nothing else hides counts), and
    the time the GPU was idle: data wait where the host was fetching a batch, host overhead
    otherwise."""
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e["name"].startswith(STEP_PREFIX)]
    if not steps:
        return {"steps": [], "wall_s": 0.0, "seconds": {c: 0.0 for c in CATEGORIES}, "top_ops": []}
    main = (steps[0]["pid"], steps[0]["tid"])
    spans = _union([(e["ts"], e["ts"] + e["dur"]) for e in steps])
    wall = sum(b - a for a, b in spans)
    thread = [
        e for e in events if (e["pid"], e["tid"]) == main and _overlap([(e["ts"], e["ts"] + e["dur"])], spans) > 0
    ]
    fetch = _union([(e["ts"], e["ts"] + e["dur"]) for e in thread if e["name"] == DATA_WAIT])
    if device_type == "cuda":
        secs, top = _gpu_times(events, spans, fetch)
    else:
        comm = _union(
            [
                (e["ts"], e["ts"] + e["dur"])
                for e in events
                if category(e["name"]) == "communication" and (e["pid"], e["tid"]) != main
            ]
        )
        secs, top = _host_times(thread, fetch, comm)
    seconds = {c: secs.get(c, 0.0) / 1e6 for c in CATEGORIES}
    return {
        "steps": sorted(int(e["name"][len(STEP_PREFIX) :]) for e in steps),
        "wall_s": wall / 1e6,
        "seconds": seconds,
        "shares": {c: (v / (wall / 1e6) if wall else 0.0) for c, v in seconds.items()},
        "top_ops": [[n, t / 1e6] for n, t in sorted(top.items(), key=lambda kv: -kv[1])[:8]],
    }


def _host_times(thread: list[dict], fetch, comm) -> tuple[dict, dict]:
    """(microseconds per category, per op) of the training thread's events within the spans."""
    secs: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    for e, own in _nest(thread):
        inside_fetch = _overlap([(e["ts"], e["ts"] + e["dur"])], fetch) >= e["dur"] - 1e-3
        if e["name"].startswith(STEP_PREFIX) or not inside_fetch:
            cat = category(e["name"])
            if e["name"].startswith(("aten::", "c10d::", "gloo:", "nccl:")):
                top[e["name"]] += own
            if cat == "host overhead" and own > 0 and comm:
                # the share of this frame's own time while a collective was in flight
                ratio = own / e["dur"] if e["dur"] else 0.0
                waited = ratio * _overlap([(e["ts"], e["ts"] + e["dur"])], comm)
                secs["communication"] += waited
                own -= waited
            secs[cat] += own
        elif e["name"] == DATA_WAIT:
            secs["data wait"] += e["dur"]
    return secs, top


def _gpu_times(events: list[dict], spans, fetch) -> tuple[dict, dict]:
    """(microseconds per category, per kernel) of the GPU's timeline within the spans."""
    secs: dict[str, float] = defaultdict(float)
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    busy: list[tuple[float, float]] = []
    for cat in ("convolution/matmul", "normalisation/elementwise", "communication"):
        mine = _union([(e["ts"], e["ts"] + e["dur"]) for e in kernels if category_kernel(e["name"]) == cat])
        mine = _subtract(_subtract(mine, busy), _subtract([(-1e30, 1e30)], spans))
        secs[cat] += sum(b - a for a, b in mine)
        busy = _union(busy + mine)
    idle = _subtract(spans, busy)
    secs["data wait"] = _overlap(idle, fetch)
    secs["host overhead"] = sum(b - a for a, b in idle) - secs["data wait"]
    top: dict[str, float] = defaultdict(float)
    for e in kernels:
        top[e["name"][:60]] += e["dur"]
    return secs, top


def category_kernel(name: str) -> str:
    """Where a GPU kernel's time goes, by its family; copies and unknown kernels count as
    normalisation/elementwise (memory-bound work)."""
    low = name.lower()
    if "nccl" in low:
        return "communication"
    if any(k in low for k in _ELEMENTWISE_KERNELS):
        return "normalisation/elementwise"
    if any(k in low for k in _CONV_KERNELS):
        return "convolution/matmul"
    return "normalisation/elementwise"


def format_summary(s: dict, folder: Path) -> str:
    steps = s["steps"]
    head = (
        f"distres: profile of steps {steps[0]}..{steps[-1]} on rank {s['rank']}: {s['wall_s']:.3f} s "
        f"({1000 * s['wall_s'] / len(steps):.1f} ms/step); traces in {folder}/ (one per rank)"
    )
    shares = " | ".join(f"{c} {100 * s['shares'][c]:.1f}%" for c in CATEGORIES)
    lines = [head, f"  time: {shares} (sum {100 * sum(s['shares'].values()):.1f}%)", "  top ops by self time:"]
    for name, secs in s["top_ops"]:
        lines.append(f"    {1000 * secs:9.1f} ms {100 * secs / s['wall_s']:5.1f}%  {name}")
    return "\n".join(lines)
