"""``--autotune``: before training, try the settings that change only speed and keep the fastest.

    python -m distres.train --autotune ...                       # tune, then train with the choice
    python -m distres.autotune ...                               # tune only; prints the flags to use
    torchrun --nproc_per_node 2 -m distres.autotune --device cpu ...

The levers (``config.AUTOTUNE_LEVERS``) leave the batches alone, and the maths up to rounding
(a memory format, compiled kernels or a thread count may sum in another order): the
data backend among those that hand out identical batches (torch, and gpu for images up to
64 px; DALI normalises in its own kernel, a float rounding apart, so it is never picked
here), DataLoader workers / DALI threads, channels_last, the torch.compile mode (CUDA: on a
CPU its compilation alone outlasts any budget), CPU threads per process, and DDP's bucket size
and broadcast_buffers (several processes). Batch size, learning rate, precision and
augmentation are never touched.

Each trial builds the run's real loader, model, optimizer and DDP wrapper with one setting
changed, takes 2 warm-up steps, then times ``--autotune-steps`` optimizer steps with
``perf.StepMeter`` (images/s over all ranks, the slowest rank's data-wait fraction). The first
trial is the configuration as given; its verdict picks the order (input-bound: data levers
first, the one the verdict names in front; compute-bound: compute levers first). Levers are
tried one at a time from the best setting so far, and a setting replaces it only when at least
``MARGIN`` faster: closer than that is the noise of a shared machine. At the end the start and
the choice are timed again back to back (``confirm``), and the choice must still be faster.
Before each trial rank 0
checks that the trial's estimated time still fits in what is left of ``--autotune-budget``, and
skips it otherwise; what was not tried is listed. A trial is estimated by the longest trial so
far of its kind (``Costs``): eager, or each torch.compile mode apart, since a compiled trial
pays its compilation, many times an eager trial's steps.

Rank 0 decides every next trial and the final choice and broadcasts them, so every rank builds
and times the same thing and applies the same settings. The trials leave no trace in the run:
the RNG states and thread count are restored, and the run builds its data, model and optimizer
afresh, so a tuned run trains exactly as an untuned one given the chosen flags would.

The table goes to ``OUTPUT_DIR/autotune.json``. A resumed run (``--resume``, a restart or
requeue) with ``--autotune`` reuses that file's choice without trials, so the rest of the run
trains with the settings it started with; ``--autotune-retune`` tunes again. Without
``--autotune`` a resumed run uses the flags it is given (``--config OUTPUT_DIR/config.yaml``
holds the tuned ones).
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

from distres import checkpoint, config, dist, engine, models, perf
from distres.build import build_parts
from distres.data.loaders import default_workers, resolve_backend
from distres.data.transforms import SMALL_IMAGES
from distres.errors import UserError, console, run_cli

WARMUP_STEPS = 2
# A compile mode's first trial, before any of that mode was timed here: its eager steps plus
# Inductor's compilation of a ResNet's training step, about a minute and more on a GPU host,
# several times that where it benchmarks kernel choices (max-autotune). Generous on purpose:
# too high skips a trial (listed as not tried), too low overruns the budget.
COMPILE_S = {"default": 90.0, "reduce-overhead": 120.0, "max-autotune-no-cudagraphs": 400.0, "max-autotune": 450.0}
MARGIN = 0.05  # a setting must be this much faster than the best so far to replace it
DATA_LEVERS = ("data_backend", "workers")
COMPUTE_LEVERS = ("channels_last", "compile", "threads", "bucket_cap_mb", "broadcast_buffers")
# The config fields each lever sets.
FIELDS = {
    "data_backend": ("data_backend",),
    "workers": ("workers",),
    "channels_last": ("channels_last",),
    "compile": ("compile", "compile_mode"),
    "threads": ("threads",),
    "bucket_cap_mb": ("bucket_cap_mb",),
    "broadcast_buffers": ("broadcast_buffers",),
}


def effective(cfg, ctx) -> dict:
    """The value each lever has in cfg, with 'auto' and 0/-1 defaults resolved for this process."""
    backend = resolve_backend(cfg.data.data_backend, cfg.data.dataset, ctx.device)
    return {
        "data_backend": backend,
        "workers": cfg.data.workers if cfg.data.workers >= 0 else default_workers(ctx.cpus_per_rank, ctx.device),
        "channels_last": cfg.model.channels_last,
        "compile": cfg.model.compile_mode if cfg.model.compile else "off",
        "threads": cfg.dist.threads or ctx.cpus_per_rank,
        "bucket_cap_mb": cfg.dist.bucket_cap_mb,
        "broadcast_buffers": cfg.dist.broadcast_buffers,
    }


def changes_for(lever: str, value) -> dict:
    """The config fields that give lever the value."""
    if lever == "compile":
        return {"compile": value != "off", "compile_mode": "default" if value == "off" else value}
    return {lever: value}


def candidates(lever: str, cfg, ctx) -> list:
    """The values of lever worth a trial from cfg (its current value excluded)."""
    now = effective(cfg, ctx)
    cpus = ctx.cpus_per_rank
    if lever == "data_backend":
        # Only backends whose batches are bit-identical: the torch backend, and the gpu
        # backend's one-gather pad-crops for small images (synthetic data has only its own).
        options = (
            []
            if cfg.data.dataset == "synthetic"
            else ["torch"] + (["gpu"] if cfg.data.train_image_size <= SMALL_IMAGES else [])
        )
    elif lever == "workers":
        options = sorted({0, 1, 2, max(1, cpus // 2), cpus}) if now["data_backend"] in ("torch", "dali") else []
    elif lever == "channels_last":
        options = [True, False]
    elif lever == "compile":
        options = (
            ["off", "default", "max-autotune-no-cudagraphs", "reduce-overhead"] if ctx.device.type == "cuda" else []
        )
    elif lever == "threads":
        options = sorted({1, max(1, cpus // 2), cpus}) if ctx.device.type == "cpu" else []
    elif lever == "bucket_cap_mb":
        options = [10.0, 25.0, 50.0, 100.0] if ctx.distributed else []
    else:  # broadcast_buffers
        options = [True, False] if ctx.distributed else []
    return [v for v in options if v != now[lever]]


def _endless(loader):
    """The loader's batches across as many epochs as a trial needs."""
    epoch = 0
    while True:
        loader.set_epoch(epoch)
        yield from loader
        epoch += 1


def _release() -> None:
    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _steps(n: int, model, meter, batches, parts, clip: float) -> None:
    for _ in range(n):
        loss = engine.train_step(model, meter.fetch(batches), parts.loss_fn, parts.optimizer, parts.precision, clip)
        meter.add(loss)


def trial(cfg, ctx, steps: int, warmup: int = WARMUP_STEPS) -> dict | None:
    """Time ``steps`` optimizer steps of cfg's real loader, model and step after warm-up:
    {images_per_sec, data_wait_frac}, the same on every rank; None when cfg's run cannot
    be built on some rank (the reason is printed by rank 0). A collective."""
    if ctx.device.type == "cpu":
        torch.set_num_threads(cfg.dist.threads or ctx.cpus_per_rank)
    try:
        parts, why = build_parts(cfg, ctx), None  # as the run builds them (build.py)
    except UserError as e:  # e.g. the data set does not fit the gpu backend
        parts, why = None, str(e)
    reasons = [w for w in dist.gather_objects(why) if w]
    if reasons:
        ctx.say(f"distres: autotune: skipped ({reasons[0]})")
        del parts
        _release()
        return None
    model = models.parallelize(parts.net, cfg, ctx)
    meter = perf.StepMeter(cfg, ctx, parts.plan.global_batch, parts.bundle.backend)
    batches = _endless(parts.bundle.train)
    clip = cfg.optim.clip_grad_norm
    _steps(warmup + (2 if cfg.model.compile else 0), model, meter, batches, parts, clip)  # compile settles in a few
    meter.start_window()
    _steps(steps, model, meter, batches, parts, clip)
    rec = meter.flush(steps, 0.0, 0.0, 0)
    batches.close()  # ends the loader's epoch
    parts.bundle.close()  # and its worker processes
    del model, parts, batches, meter
    _release()
    per_rank = dist.gather_objects((rec["images_per_sec"], rec["data_wait_frac"], rec.get("gpu_idle_frac")))
    # Ranks run in lock-step: the slowest one's rate is the job's.
    res = {"images_per_sec": min(r[0] for r in per_rank), "data_wait_frac": max(r[1] for r in per_rank)}
    if per_rank[0][2] is not None:
        res["gpu_idle_frac"] = max(r[2] for r in per_rank)
    return res


class Costs:
    """How long a trial is expected to take, from the trials so far of the same kind."""

    def __init__(self):
        self.longest: dict[str, float] = {}

    @staticmethod
    def kind(cfg) -> str:
        return cfg.model.compile_mode if cfg.model.compile else "eager"

    def add(self, cfg, seconds: float) -> None:
        k = self.kind(cfg)
        self.longest[k] = max(self.longest.get(k, 0.0), seconds)

    def estimate(self, cfg) -> float:
        k = self.kind(cfg)
        if k in self.longest:
            return self.longest[k]
        eager = self.longest.get("eager", max(self.longest.values(), default=0.0))
        return eager + COMPILE_S.get(k, max(COMPILE_S.values())) if k != "eager" else eager


def order(cfg, ctx, start: dict, levers: list[str]) -> list[str]:
    """The levers in the order the starting point's verdict suggests."""
    backend = effective(cfg, ctx)["data_backend"]
    data_hint, compute_hint = perf.levers(cfg, ctx.device.type, backend)
    input_bound = perf.input_bound(start["data_wait_frac"], start.get("gpu_idle_frac"))

    def named_first(group, hint):
        hinted = [lv for lv in group if f"--{config.flag(lv)}" in hint]
        return hinted + [lv for lv in group if lv not in hinted]

    groups = [named_first(DATA_LEVERS, data_hint), named_first(COMPUTE_LEVERS, compute_hint)]
    return [lv for group in (groups if input_bound else groups[::-1]) for lv in group if lv in levers]


def tune(cfg, ctx) -> tuple[config.TrainConfig, dict]:
    """(the config to train with, the table). Every rank calls it; rank 0 decides."""
    t0 = time.perf_counter()
    saved_rng, saved_threads = checkpoint.rng_state(ctx.device), torch.get_num_threads()
    budget, steps = cfg.tune.autotune_budget, cfg.tune.autotune_steps
    rows, costs = [], Costs()

    def run_trial(lever, value, trial_cfg, warmup=WARMUP_STEPS):
        t = time.perf_counter()
        res = trial(trial_cfg, ctx, steps, warmup)
        costs.add(trial_cfg, time.perf_counter() - t)
        row = {
            "lever": lever,
            "setting": value,
            **(res or {"images_per_sec": None, "data_wait_frac": None}),
            "kept": False,
        }
        rows.append(row)
        ctx.say("distres: autotune: " + format_row(row))
        return row

    # The first trial also pays the process's one-time costs (kernel selection, allocator
    # growth, thread pools): twice the warm-up, or it would look slower than it is.
    best_cfg, best = cfg, run_trial("start", "as given", cfg, 2 * WARMUP_STEPS)
    best["kept"] = True
    if best["images_per_sec"] is None:
        raise UserError("--autotune: the configuration as given cannot be built; fix it first")
    plan = dist.broadcast_object(order(cfg, ctx, best, cfg.tune.levers))
    skipped = []
    for lever in plan:
        for value in dist.broadcast_object(candidates(lever, best_cfg, ctx)):
            left = budget - (time.perf_counter() - t0)
            trial_cfg = best_cfg.replace(**changes_for(lever, value))
            if not dist.broadcast_object(left >= costs.estimate(trial_cfg)):
                skipped.append(f"{lever}={value}")
                continue
            row = run_trial(lever, value, trial_cfg)
            faster = row["images_per_sec"] is not None and row["images_per_sec"] > best["images_per_sec"] * (1 + MARGIN)
            if dist.broadcast_object(faster):
                best["kept"], row["kept"] = False, True
                best_cfg, best = trial_cfg, row
    if best_cfg is not cfg:
        left = budget - (time.perf_counter() - t0)
        best_cfg = confirm(
            cfg, best_cfg, best, run_trial, left >= costs.estimate(cfg) + costs.estimate(best_cfg), skipped
        )
    checkpoint.set_rng_state(saved_rng, ctx.device)
    torch.set_num_threads(saved_threads)
    chosen = {f: getattr(best_cfg, f) for lever in config.AUTOTUNE_LEVERS for f in FIELDS[lever]}
    chosen = dist.broadcast_object(chosen)
    tuned = cfg.replace(**chosen)
    table = {
        "budget_s": budget,
        "steps_per_trial": steps,
        "seconds": time.perf_counter() - t0,
        **_outcome(cfg, tuned, ctx, chosen),
        "trials": rows,
        "not_tried": skipped,
    }
    return tuned, table


def _outcome(cfg, tuned, ctx, chosen: dict) -> dict:
    return {"start": effective(cfg, ctx), "chosen": effective(tuned, ctx), "flags": flags(cfg, tuned), "config": chosen}


def confirm(start_cfg, best_cfg, best: dict, run_trial, fits: bool, skipped: list):
    """The greedy walk compares each trial with one measured earlier; a machine that speeds up
    or slows down meanwhile (other jobs, clocks, caches) would make that drift look like a gain.
    So the start and the choice are timed once more, one after the other, and the choice stands
    only if it is still MARGIN faster; else the run keeps the settings as given."""
    if not dist.broadcast_object(fits):
        skipped.append("the final check of the choice against the start")
        return best_cfg
    again = run_trial("start, again", "as given", start_cfg)
    chosen = run_trial("chosen, again", "the kept settings", best_cfg)
    faster = chosen["images_per_sec"] > again["images_per_sec"] * (1 + MARGIN)
    if dist.broadcast_object(faster):
        chosen["kept"] = True
        return best_cfg
    best["kept"], again["kept"] = False, True
    return start_cfg


def flags(before, after) -> str:
    """The command-line flags that turn before's levers into after's."""
    out = []
    for lever in config.AUTOTUNE_LEVERS:
        for f in FIELDS[lever]:
            old, new = getattr(before, f), getattr(after, f)
            if old == new:
                continue
            if isinstance(new, bool):
                out.append(f"--{'' if new else 'no-'}{config.flag(f)}")
            else:
                out.append(f"--{config.flag(f)} {new:g}" if isinstance(new, float) else f"--{config.flag(f)} {new}")
    return " ".join(out)


def format_row(row: dict) -> str:
    ips = "failed" if row["images_per_sec"] is None else f"{row['images_per_sec']:9.1f}"
    wait = "" if row["data_wait_frac"] is None else f"{100 * row['data_wait_frac']:5.1f}%"
    return f"{row['lever']:<18} {str(row['setting']):<28} {ips:>9} {wait:>7}{'  <- kept' if row['kept'] else ''}"


def format_table(table: dict) -> str:
    lines = [
        f"distres: autotune, {len(table['trials'])} trials in {table['seconds']:.0f} s "
        f"(budget {table['budget_s']:g} s, {table['steps_per_trial']} timed steps each):",
        f"  {'lever':<18} {'setting':<28} {'images/s':>9} {'data wait':>9}",
    ]
    lines += ["  " + format_row(r) for r in table["trials"]]
    if table["not_tried"]:
        lines.append(f"  not tried (budget): {', '.join(table['not_tried'])}")
    lines.append(f"  chosen: {table['flags'] or 'the settings as given'}")
    return "\n".join(lines)


def for_run(cfg, ctx, out: Path, resumed: bool) -> config.TrainConfig:
    """The config a --autotune run trains with: the saved choice when resuming (unless
    --autotune-retune), else the result of tuning now, written to OUTPUT_DIR/autotune.json."""
    path = out / "autotune.json"
    saved = None
    if resumed and not cfg.tune.autotune_retune and ctx.is_main and path.is_file():
        saved = json.loads(path.read_text())["config"]
    saved = dist.broadcast_object(saved)
    if saved is not None:
        ctx.say(f"distres: autotune: resuming with the settings chosen before ({path}; --autotune-retune tunes again)")
        return cfg.replace(**saved)
    tuned, table = tune(cfg, ctx)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(table, indent=1) + "\n")
        console(format_table(table))
    return tuned


def main(argv: list[str] | None = None) -> int:
    def body():
        cfg = config.parse_args(
            argv,
            prog="python -m distres.autotune",
            description="Find the fastest settings that do not change the training (see "
            "--autotune-levers) for a distres.train command line, and print the flags. "
            "Takes the same flags as distres.train; writes OUTPUT_DIR/autotune.json and "
            "OUTPUT_DIR/config.yaml (the tuned config, usable with --config).",
        )
        ctx = dist.init(cfg.dist.device, cfg.dist.dist_backend, deterministic=cfg.run.deterministic)
        tuned, table = tune(cfg, ctx)
        if ctx.is_main:
            out = Path(cfg.run.output_dir)
            out.mkdir(parents=True, exist_ok=True)
            (out / "autotune.json").write_text(json.dumps(table, indent=1) + "\n")
            tuned.replace(autotune=False).save(out / "config.yaml")
            console(format_table(table))
            print(table["flags"], flush=True)  # stdout: what to add to the training command

    return run_cli(body, rank=dist.rank_from_env, cleanup=dist.teardown)


if __name__ == "__main__":
    sys.exit(main())
