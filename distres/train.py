"""Train a ResNet with DistributedDataParallel.

    python -m distres.train --data synthetic --arch resnet18 --image-size 32 --max-steps 20  # 1 process
    torchrun --nproc_per_node 2 -m distres.train --data synthetic --device cpu ...          # 2 gloo ranks
    torchrun --nproc_per_node 8 -m distres.train --data imagefolder --data-dir /imagenet    # 8 GPUs

Flags: ``python -m distres.train --help``. Outputs in --output-dir: config.yaml,
metrics.jsonl, checkpoints/. ``main`` parses the flags and joins the process group;
``build_run`` makes every component once; ``fit`` loops over epochs, and ``train_epoch`` is one
epoch's steps, in which each component decides itself when it acts (the meter when to log, the
checkpointer when to save, the profiler when to record, the watchdog how long a phase may last).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from distres import (
    autotune,
    checkpoint,
    config,
    data,
    dist,
    divergence,
    engine,
    host,
    models,
    optim,
    perf,
    preempt,
    profiling,
    telemetry,
    tracking,
    watchdog,
    weights,
)
from distres.build import build_parts
from distres.ema import EMA
from distres.errors import Preempted, UserError, run_cli


def _set_performance_flags(cfg, ctx) -> None:
    if ctx.device.type == "cpu":
        # N ranks on one CPU node would otherwise each start one thread per core and thrash.
        torch.set_num_threads(cfg.dist.threads or ctx.cpus_per_rank)
    engine.set_numerics(cfg.run.deterministic)


@dataclass
class Run:
    """Every component of a training run, built once by ``build_run``."""

    cfg: config.TrainConfig
    ctx: dist.DistContext
    out: Path
    plan: optim.Plan
    bundle: data.DataBundle
    state: checkpoint.TrainingState
    precision: engine.Precision
    loss_fn: torch.nn.Module
    ckpt: checkpoint.Checkpointer
    step: int  # optimizer steps done
    prof: profiling.ProfileWindow  # --profile-steps
    model: torch.nn.Module = None  # the training model: DDP and torch.compile around state.model
    meter: perf.StepMeter = None
    logger: tracking.Logger = None
    telem: telemetry.Telemetry = None
    stop: preempt.PreemptionFlag = None
    watch: watchdog.Watchdog = None
    rollbacks: int = 0  # --on-nonfinite rollback: how many so far
    train_size: int = 0  # the crop size the last epoch trained at (--progressive-resize announces changes)
    last_eval: dict | None = None
    first_step: int = 0  # where this process started: a resumed run's step

    @property
    def lr(self) -> float:
        return self.state.scheduler.get_last_lr()[0]

    def wrap(self) -> None:
        """(Re)build the training model around the plain one: after a start, and whenever the
        set of trainable parameters changes (DDP then reduces the new set)."""
        self.model = models.parallelize(self.state.model, self.cfg, self.ctx, comm_probe=self.meter.probe)

    def train_step(self, micro: list) -> torch.Tensor:
        """One optimizer step over the micro-batches (with the schedule's and the EMA's step); its
        mean loss, on the device."""
        loss = engine.train_step(
            self.model, micro, self.loss_fn, self.state.optimizer, self.precision, self.cfg.optim.clip_grad_norm
        )
        self.state.scheduler.step()
        self.step += 1
        if self.state.ema is not None:
            self.state.ema.update(self.state.model, self.step)
        return loss

    def save(self) -> None:
        """A checkpoint of the state after this step, once the guard has found it finite."""
        self.watch.enter("a checkpoint", self.step)
        divergence.check_state(self.meter.pending_loss, self.state.model, self.step, self.lr)
        self.ckpt.save(self.state, self.step)

    def maybe_save(self, last_of_pass: bool, stopping: bool) -> None:
        """Every --checkpoint-every steps (the end of a pass saves anyway), and before a stop."""
        every = self.cfg.checkpoint.checkpoint_every
        if stopping or (every and self.step % every == 0 and not last_of_pass):
            self.save()


def build_run(cfg: config.TrainConfig, ctx: dist.DistContext) -> Run:
    """Every component of the run, the state restored from its checkpoint when resuming."""
    out = Path(cfg.run.output_dir)
    ckpt = checkpoint.Checkpointer(cfg, ctx, out / "checkpoints")  # fails fast: before any data is read
    _set_performance_flags(cfg, ctx)
    if cfg.tune.autotune:  # before anything is built: the run is built with the chosen settings
        cfg = ckpt.cfg = autotune.for_run(cfg, ctx, out, resumed=ckpt.found is not None)
        _set_performance_flags(cfg, ctx)
    # A resumed run takes the stem and normalisation of --weights from its checkpoint: the file
    # may have moved since, and every weight comes from the checkpoint anyway.
    pretrained = weights.resolve(cfg, ctx, resumed=ckpt.found[0].get("meta") if ckpt.found else None)
    resumed = checkpoint.resumed_position(ckpt.found[0], cfg, ctx.world_size) if ckpt.found else None
    parts = build_parts(cfg, ctx, pretrained, resumed)
    del pretrained
    bundle, net, plan = parts.bundle, parts.net, parts.plan
    meta = models.describe(
        net,
        cfg.model.arch,
        bundle.classes,
        bundle.mean,
        bundle.std,
        bundle.eval_image_size,
        bundle.eval_resize,
        bundle.image_size,
    )
    ema = EMA(net, cfg.optim.ema_decay, cfg.optim.ema_every) if cfg.optim.ema_decay > 0 else None
    scheduler = optim.build_scheduler(cfg.optim, parts.optimizer, plan)
    state = checkpoint.TrainingState(
        net, parts.optimizer, scheduler, parts.precision.scaler, bundle.train, meta, ema, plan.clock
    )
    step = ckpt.restore(state)
    if step > 0 and (step >= plan.total_steps or bundle.train.epoch >= plan.epochs):  # resumed at its end
        raise RunComplete(
            f"distres: the run in {out} is complete (step {step} of {plan.total_steps}); nothing to do. "
            "Raise --epochs or --max-steps to train on, or pass a new --output-dir for a new run"
        )
    _set_backbone_for_epoch(cfg, state)
    window = profiling.ProfileWindow(
        cfg.observe, ctx, out, step, plan.total_steps
    )  # checks --profile-steps against the run
    run = Run(cfg, ctx, out, plan, bundle, state, parts.precision, parts.loss_fn, ckpt, step, window, first_step=step)
    try:
        _start_outputs(run)
        run.wrap()
        run.stop = preempt.PreemptionFlag(ctx.distributed, announce=ctx.is_main)
        run.watch = watchdog.Watchdog(ctx, cfg.guard.dist_timeout * 60, dist.job_store())
    except BaseException:
        _close(run, completed=False)  # what was started (the loggers, a W&B run, telemetry) ends here
        raise
    _announce(run)
    return run


def _announce(run: Run) -> None:
    """The start-up line: what trains, where, on what, for how long."""
    cfg, ctx, bundle, plan = run.cfg, run.ctx, run.bundle, run.plan
    decoding = f", decoding on the {ctx.device.type}" if cfg.data.decode_on == "device" else ""
    amp = run.precision.amp + (" (auto)" if cfg.optim.amp == "auto" else "")
    ctx.say(
        f"distres: {cfg.model.arch} on {ctx.world_size} x {ctx.device.type} ({ctx.backend or 'single process'}), "
        f"{cfg.data.dataset} {bundle.image_size}px ({bundle.backend} loader{decoding}), "
        f"{bundle.num_classes} classes, global batch {plan.global_batch}, lr {max(run.state.scheduler.base_lrs):g}, "
        f"amp {amp}, {plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps"
    )
    if ctx.device.type == "cpu" and cfg.optim.amp == "bf16" and host.native_bf16() is False:
        ctx.say(
            "distres: note: this CPU has no bf16 instructions (AVX512-BF16 or AMX), so --amp bf16 is emulated "
            "and several times slower than --amp none here"
        )


def _start_outputs(run: Run) -> None:
    """config.yaml, the loggers, the meter and the GPU telemetry."""
    cfg, ctx = run.cfg, run.ctx
    if ctx.is_main:
        try:
            run.out.mkdir(parents=True, exist_ok=True)
            cfg.save(run.out / "config.yaml", _resolved(run))
        except OSError as e:
            raise UserError(
                f"cannot write to --output-dir {run.out} ({e.strerror or e}); choose a writable folder"
            ) from None
    run_info = {
        "world_size": ctx.world_size,
        "device_type": ctx.device.type,
        "backend": ctx.backend,
        "global_batch": run.plan.global_batch,
    }
    run.logger = tracking.build(cfg, ctx.is_main, run.out, run.ckpt.resume_step, run_info=run_info)
    run.meter = perf.StepMeter(cfg, ctx, run.plan.global_batch, run.bundle.backend, run.logger)
    if cfg.tune.autotune:
        run.meter.refs["autotune table"] = str(run.out / "autotune.json")
    run.telem = telemetry.start(ctx)


def _resolved(run: Run) -> dict:
    """The values in force where the config holds a placeholder (0, -1, auto)."""
    bundle, ctx = run.bundle, run.ctx
    return {
        "lr": max(run.state.scheduler.base_lrs),
        "image_size": bundle.image_size,
        "eval_image_size": bundle.eval_image_size,
        "eval_resize": bundle.eval_resize,
        "amp": run.precision.amp,
        "data_backend": bundle.backend,
        "device": ctx.device.type,
        "dist_backend": ctx.backend or "none",
        "world_size": ctx.world_size,
        "global_batch": run.plan.global_batch,
    }


def fit(run: Run) -> dict:
    """Train to the end of the plan (or to a preemption), evaluating as asked; the last
    evaluation. Closes every component, whatever happens."""
    completed = False  # the outstanding preemption all-reduce exists on every rank only then
    try:
        while run.step < run.plan.total_steps and run.bundle.train.epoch < run.plan.epochs:
            epoch = _start_epoch(run)
            try:
                train_epoch(run)
            except divergence.Diverged as e:
                _diverged(run, e)
                continue
            _end_epoch(run, epoch + 1)
        if run.last_eval is None:  # resumed after the last step: still report the accuracy
            run.last_eval = _evaluate(run, run.plan.epochs)
        completed = True
        with run.watch.phase("a checkpoint", run.step):
            run.ckpt.wait()  # the last checkpoint is on disk (or its failure is the run's error)
    except Preempted:
        completed = True  # every rank raised it at the same step
        raise
    finally:
        _close(run, completed)
    ev, now = run.last_eval, run.step - run.first_step
    run.ctx.say(
        f"distres: done at step {run.step}: {now} step{'s' * (now != 1)} in "
        f"{time.perf_counter() - run.meter.t_run:.0f} s; top1 {ev['top1']:.2f}% top5 {ev['top5']:.2f}%; "
        f"outputs in {run.out}"
    )
    return ev


class RunComplete(Exception):
    """A resumed run that has nothing left to train (its message says so)."""


def run(cfg: config.TrainConfig, ctx: dist.DistContext) -> dict | None:
    """Build the run and fit it: what ``main`` does once the process group is up. None when a
    resumed run was already complete: it writes nothing then, not even a repeated evaluation."""
    try:
        built = build_run(cfg, ctx)
    except RunComplete as e:
        ctx.say(str(e))
        return None
    return fit(built)


def _close(run: Run, completed: bool) -> None:
    """End every component that was started (all of them, unless the build failed half-way)."""
    if run.stop is not None:
        run.stop.close(wait=completed)
    run.bundle.close()
    for part in (run.watch, run.prof, run.ckpt, run.telem, run.logger):
        if part is not None:
            part.close()


def _start_epoch(run: Run) -> int:
    """What changes at an epoch's start: the backbone's freeze, the training size; the epoch."""
    epoch, loader = run.bundle.train.epoch, run.bundle.train
    if epoch == run.cfg.finetune.freeze_backbone_epochs > 0 and loader.position == 0:
        if _set_backbone_for_epoch(run.cfg, run.state):
            run.wrap()
        run.ctx.say(f"distres: epoch {epoch + 1}: the backbone trains from now on")
    if run.cfg.data.progressive_resize and loader.image_size != run.train_size:
        run.train_size = run.meter.fields["image_size"] = loader.image_size
        run.ctx.say(f"distres: epoch {epoch + 1}: training at {run.train_size} px (--progressive-resize)")
    return epoch


def _end_epoch(run: Run, epoch: int) -> None:
    """After a pass over epoch ``epoch`` (counted from 1) ended: at its end, or at the last step."""
    every, final = run.cfg.run.eval_every, run.step >= run.plan.total_steps
    if final or (every and epoch % every == 0):
        run.last_eval = _evaluate(run, epoch)
    with run.watch.phase("the end of an epoch", run.step):
        run.meter.epoch_end(run.telem, run.step, epoch)  # data-wait verdict, GPU telemetry
        if not final and run.stop.stop_requested():  # (not final: the epoch ran to its end)
            raise _preempted(run, epoch, 0)


def train_epoch(run: Run) -> None:
    """The rest of the loader's current epoch (or up to the last step), then its checkpoint."""
    loader, plan = run.bundle.train, run.plan
    epoch, done = loader.epoch, loader.position // plan.global_batch  # steps of this epoch before this pass
    left = len(loader) // run.cfg.optim.grad_accum  # steps to the end of the epoch
    steps = min(left, plan.total_steps - run.step)
    batches = iter(loader)
    run.meter.start_window(run.step)
    with _progress(run, epoch, done, done + left) as bar:
        for s in range(steps):
            last, at = s == steps - 1, epoch + (done + s + 1) / plan.steps_per_epoch
            run.prof.step(run.step, run.meter)
            with run.watch.phase("loading data", run.step + 1):
                micro = run.meter.fetch(batches)
            # A pass's first step may compile (a new run, DDP rebuilt, a new image size): not timed.
            with run.watch.phase("the training step", run.step + 1, timed=not (run.cfg.model.compile and s == 0)):
                run.meter.add(run.train_step(micro))
                # A signal on any rank stops all ranks at the same step (see preempt.py); one at
                # the pass's last step is handled after the epoch's checkpoint and evaluation.
                stopping = not last and run.stop.stop_requested()
                rec = run.meter.maybe_flush(run.step, at, run.lr, loader.bad_samples, last=last or stopping)
            _show(bar, rec, run)
            run.maybe_save(last_of_pass=last, stopping=stopping)
            if stopping:
                raise _preempted(run, epoch, done + s + 1)
    run.prof.epoch_end(run.step)
    if steps == left:
        loader.set_epoch(epoch + 1)
    run.save()


def _show(bar, rec: dict | None, run: Run) -> None:
    """A logged window: the divergence guard's check of its loss, and the progress bar's figures."""
    bar.update(1)
    if rec is not None:
        divergence.check_logged(rec["loss"], run.state.scaler, run.step, run.lr)
        bar.set_postfix(
            loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}", img_s=f"{rec['images_per_sec']:.0f}", refresh=False
        )


def _diverged(run: Run, err: divergence.Diverged) -> None:
    """--on-nonfinite: stop with the one-line error, or go back to the last good checkpoint with
    the lr scaled down (every rank, at the same step: the guard's verdict is shared)."""
    guard = run.cfg.guard
    if guard.on_nonfinite != "rollback" or run.rollbacks >= guard.rollback_tries or run.ckpt.last_saved is None:
        raise divergence.give_up(err, str(run.ckpt.last_saved) if run.ckpt.last_saved else None, run.rollbacks)
    run.rollbacks += 1
    peak = max(run.state.scheduler.base_lrs)  # this run's, with earlier rollbacks
    run.step = run.ckpt.roll_back(run.state)
    # The checkpoint may predate earlier rollbacks: back to this run's lr, then lower it.
    back = peak / max(run.state.scheduler.base_lrs)
    optim.scale_lr(run.state.optimizer, run.state.scheduler, back * guard.rollback_lr_factor)
    if _set_backbone_for_epoch(run.cfg, run.state):
        run.wrap()
    run.logger.rewind(run.step)
    run.logger.log(
        {
            "kind": "rollback",
            "step": run.step,
            "diverged_at": err.step,
            "reason": err.what,
            "lr_factor": guard.rollback_lr_factor,
            "rollback": run.rollbacks,
        }
    )
    run.ctx.say(
        f"distres: {err.what} at step {err.step}; rollback {run.rollbacks} of {guard.rollback_tries}: back to "
        f"{run.ckpt.last_saved} (step {run.step}) with the lr x {guard.rollback_lr_factor:g} "
        f"(now {run.state.optimizer.param_groups[0]['lr']:.4g})"
    )


def _set_backbone_for_epoch(cfg, state: checkpoint.TrainingState) -> bool:
    """Freeze or unfreeze the backbone for the loader's epoch (--freeze-backbone-epochs), after
    a start, a resume, a rollback or at the switch; whether it changed (DDP must then be rebuilt).
    A trainable backbone gets its SGD momentum buffers: a checkpoint from the head-only epochs
    has none for it, and fused SGD cannot step a mix (see ``optim.init_momentum``)."""
    trainable = state.loader.epoch >= cfg.finetune.freeze_backbone_epochs
    changed = models.set_backbone_trainable(state.model, trainable)
    if trainable and cfg.finetune.freeze_backbone_epochs:
        optim.init_momentum(state.optimizer)
    return changed


def _preempted(run: Run, epoch: int, in_epoch: int) -> Preempted:
    """Once the checkpoint just saved is on disk on every rank's word, what they raise to stop."""
    run.ckpt.wait()
    why = run.stop.signal_name or "signal on another rank"
    return Preempted(
        why,
        f"distres: preempted ({why}): stopped after step {run.step} (epoch {epoch + 1}, step {in_epoch} "
        f"of {run.plan.steps_per_epoch}), checkpoint in {run.ckpt.folder}; --resume continues there",
    )


def _evaluate(run: Run, epoch: int) -> dict:
    """Score the weights (and their EMA) on the validation set; keep the better as best.pt
    when it beats every earlier evaluation. Every rank scores with rank 0's BatchNorm statistics,
    the ones the checkpoint holds, so that ``distres.evaluate`` on it gives the same figures."""

    def tick(*_):  # each batch renews the watchdog's clock: the timeout is per batch and final reduction
        run.watch.enter("evaluation", run.step)

    tick()
    ema_model = run.state.ema.module if run.state.ema is not None else None
    if run.cfg.dist.broadcast_buffers:
        for module in (run.state.model, ema_model):
            if module is not None:
                dist.broadcast_buffers(module)
    result = engine.evaluate(run.model, run.bundle.val, run.precision, run.ctx.device, each=tick)
    ema = None
    if ema_model is not None:
        ema = engine.evaluate(ema_model, run.bundle.val, run.precision, run.ctx.device, each=tick)
        result.update({f"ema_{k}": v for k, v in ema.items() if k != "eval_samples"})
    which, scored, top1 = (
        ("ema", ema_model, ema["top1"])
        if ema and ema["top1"] > result["top1"]
        else ("raw", run.state.model, result["top1"])
    )
    best = run.ckpt.save_best(
        scored.state_dict(), run.state.meta, {"top1": top1, "weights": which, "step": run.step, "epoch": epoch}
    )
    run.logger.log({"kind": "eval", "step": run.step, "epoch": epoch, **result})
    line = (
        f"distres: epoch {epoch} step {run.step}: top1 {result['top1']:.2f}% top5 {result['top5']:.2f}% "
        f"val_loss {result['val_loss']:.4f}"
    )
    if ema:
        line += f"; EMA top1 {ema['top1']:.2f}% top5 {ema['top5']:.2f}%"
    run.ctx.say(f"{line} ({result['eval_samples']} images){'; new best.pt (' + which + ')' if best else ''}")
    return result


def _progress(run: Run, epoch: int, first: int, total: int):
    """tqdm on rank 0; a disabled bar (every call a no-op) elsewhere or with --no-progress."""
    from tqdm import tqdm

    # In a log file (SLURM, CI) redraw rarely instead of flooding it.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=first,
        desc=f"epoch {epoch + 1}/{run.plan.epochs}",
        unit="step",
        mininterval=interval,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not (run.cfg.observe.progress and run.ctx.is_main),
    )


def main(argv: list[str] | None = None) -> int:
    def body():
        cfg = config.parse_args(argv)
        # The collectives' own timeout is a backstop behind the watchdog's (--dist-timeout).
        ctx = dist.init(
            cfg.dist.device,
            cfg.dist.dist_backend,
            timeout_s=cfg.guard.dist_timeout * 60 + 120,
            deterministic=cfg.run.deterministic,
        )
        run(cfg, ctx)

    return run_cli(body, rank=dist.rank_from_env, cleanup=dist.teardown)


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
