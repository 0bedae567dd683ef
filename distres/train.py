"""Train a ResNet with DistributedDataParallel.

    python -m distres.train --data synthetic --arch resnet18 --max-steps 20         # 1 process
    torchrun --nproc_per_node 2 -m distres.train --data synthetic --device cpu ...  # 2 gloo ranks
    torchrun --nproc_per_node 8 -m distres.train --data imagefolder --data-dir /imagenet  # 8 GPUs

Flags: ``python -m distres.train --help``. Outputs in --output-dir: config.yaml,
metrics.jsonl, checkpoints/. ``main`` parses the flags, joins the process group and hands
over to ``run``, which sets the run up from its components (data, model, optimizer, the
checkpointer, the meter) and loops over epochs; ``train_epoch`` is one epoch's steps.
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
from distres.ema import EMA
from distres.errors import Preempted, UserError, console, run_cli


def _set_performance_flags(cfg, ctx) -> None:
    if ctx.device.type == "cpu":
        # N ranks on one CPU node would otherwise each start one thread per core and thrash.
        torch.set_num_threads(cfg.threads or ctx.cpus_per_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)  # (dist.init set CUBLAS_WORKSPACE_CONFIG for it)
        torch.backends.cudnn.benchmark = False
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune convolutions once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


@dataclass
class Run:
    """What the epoch loop works with, built once by ``run``."""

    cfg: config.TrainConfig
    ctx: dist.DistContext
    plan: optim.Plan
    bundle: data.DataBundle
    model: torch.nn.Module  # wrapped for training (DDP, compile)
    state: checkpoint.TrainingState
    precision: engine.Precision
    loss_fn: torch.nn.Module
    ckpt: checkpoint.Checkpointer
    meter: perf.StepMeter
    stop: preempt.PreemptionFlag
    step: int  # optimizer steps done
    prof: profiling.Window  # --profile-steps
    logger: tracking.Logger
    watch: watchdog.Watchdog  # --dist-timeout
    rollbacks: int = 0  # --on-nonfinite rollback: how many so far
    train_size: int = 0  # the crop size the last epoch trained at (--progressive-resize announces changes)

    @property
    def lr(self) -> float:
        return self.state.scheduler.get_last_lr()[0]

    def save(self) -> None:
        """A checkpoint of the state after this step, once the guard has found it finite."""
        self.watch.enter("a checkpoint", self.step)
        divergence.check_state(self.meter.pending_loss, self.state.model, self.step, self.lr)
        self.ckpt.save(self.state, self.step)


def run(cfg: config.TrainConfig, ctx: dist.DistContext) -> dict:
    out = Path(cfg.output_dir)
    ckpt = checkpoint.Checkpointer(cfg, ctx, out / "checkpoints")  # fails fast: before any data is read
    _set_performance_flags(cfg, ctx)
    if cfg.autotune:  # before anything is built: the run is built with the chosen settings
        cfg = ckpt.cfg = autotune.for_run(cfg, ctx, out, resumed=ckpt.found is not None)
        _set_performance_flags(cfg, ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts)
    # A resumed run takes the stem and normalisation of --weights from its checkpoint: the file
    # may have moved since, and every weight comes from the checkpoint anyway.
    pretrained = weights.resolve(cfg, ctx, resumed=ckpt.found[0].get("meta") if ckpt.found else None)
    bundle = data.build(
        cfg,
        ctx,
        models.memory_format(cfg.channels_last),
        stats=(pretrained.mean, pretrained.std) if pretrained else None,
    )
    net = models.build(cfg, bundle.classes, bundle.image_size, ctx, pretrained)
    del pretrained
    plan = optim.plan(
        cfg,
        bundle.train.num_samples,
        ctx.world_size,
        checkpoint.resumed_position(ckpt.found[0], cfg, ctx.world_size) if ckpt.found else None,
    )
    optimizer = optim.build_optimizer(cfg, net, plan.lr)
    precision = engine.Precision(cfg.amp, ctx.device)
    meta = models.describe(
        net,
        cfg.arch,
        bundle.classes,
        bundle.mean,
        bundle.std,
        bundle.eval_image_size,
        bundle.eval_resize,
        bundle.image_size,
    )
    state = checkpoint.TrainingState(
        net,
        optimizer,
        optim.build_scheduler(cfg, optimizer, plan),
        precision.scaler,
        bundle.train,
        meta,
        EMA(net, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 else None,
        plan.axis,
    )
    step = ckpt.restore(state)
    _match_backbone(cfg, state)
    window = profiling.Window(cfg, ctx, out, step, plan.total_steps)  # checks --profile-steps against the run
    model = models.parallelize(net, cfg, ctx)
    if ctx.is_main:
        try:
            out.mkdir(parents=True, exist_ok=True)
            cfg.save(out / "config.yaml")
        except OSError as e:
            raise UserError(
                f"cannot write to --output-dir {out} ({e.strerror or e}); choose a writable folder"
            ) from None
    logger = tracking.build(
        cfg,
        ctx.is_main,
        out,
        ckpt.resume_step,
        run_info={
            "world_size": ctx.world_size,
            "device_type": ctx.device.type,
            "backend": ctx.backend,
            "global_batch": plan.global_batch,
        },
    )
    telem = telemetry.start(ctx)
    r = Run(
        cfg,
        ctx,
        plan,
        bundle,
        model,
        state,
        precision,
        optim.build_loss(cfg),
        ckpt,
        perf.StepMeter(cfg, ctx, plan.global_batch, bundle.backend, logger),
        preempt.PreemptionFlag(ctx.distributed),
        step,
        window,
        logger,
        watchdog.Watchdog(ctx, cfg.dist_timeout * 60, dist.job_store()),
    )
    if cfg.autotune:
        r.meter.refs["autotune table"] = str(out / "autotune.json")
    if ctx.is_main:
        console(
            f"distres: {cfg.arch} on {ctx.world_size} x {ctx.device.type} ({ctx.backend or 'single process'}), "
            f"{cfg.data} {bundle.image_size}px ({bundle.backend} loader"
            f"{', decoding on the ' + ctx.device.type if cfg.decode_on == 'device' else ''}), {bundle.num_classes} classes, "
            f"global batch {plan.global_batch}, lr {max(state.scheduler.base_lrs):g}, amp {cfg.amp}, "
            f"{plan.steps_per_epoch} steps/epoch, {plan.total_steps} steps"
        )
    last_eval = None
    completed = False  # the outstanding preemption all-reduce exists on every rank only then
    try:
        while r.step < plan.total_steps and bundle.train.epoch < plan.epochs:
            epoch = bundle.train.epoch
            if epoch == cfg.freeze_backbone_epochs > 0 and bundle.train.position == 0:
                if _match_backbone(cfg, state):
                    r.model = models.parallelize(net, cfg, ctx)  # DDP then reduces the backbone's gradients too
                if ctx.is_main:
                    console(f"distres: epoch {epoch + 1}: the backbone trains from now on")
            try:
                train_epoch(r)
            except divergence.Diverged as e:
                _diverged(r, e)
                continue
            final = r.step >= plan.total_steps
            if final or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                last_eval = _evaluate(r, logger, epoch + 1)
            r.watch.enter("the end of an epoch", r.step)
            r.meter.epoch_end(telem, r.step, epoch + 1)  # data-wait verdict, GPU telemetry
            if not final and r.stop.stop_requested():  # (not final: the epoch ran to its end)
                raise _preempted(r, epoch + 1, 0)
        if last_eval is None:  # resumed after the last step: still report the accuracy
            last_eval = _evaluate(r, logger, plan.epochs)
        completed = True
        r.watch.enter("a checkpoint", r.step)
        ckpt.wait()  # the last checkpoint is on disk (or its failure is the run's error)
        r.watch.leave()
    except Preempted:
        completed = True  # every rank raised it at the same step
        raise
    finally:
        r.watch.close()
        r.stop.close(wait=completed)
        r.prof.close()
        ckpt.close()
        telem.close()
        logger.close()
    if ctx.is_main:
        console(
            f"distres: done, {r.step} steps in {time.perf_counter() - r.meter.t_run:.0f} s; top1 {last_eval['top1']:.2f}% "
            f"top5 {last_eval['top5']:.2f}%; outputs in {out}"
        )
    return last_eval


def train_epoch(r: Run) -> None:
    """The rest of the loader's current epoch (or up to the last step), then its checkpoint."""
    cfg, plan, loader = r.cfg, r.plan, r.bundle.train
    epoch = loader.epoch
    done = loader.position // plan.global_batch  # steps of this epoch before this pass
    left = len(loader) // cfg.grad_accum  # steps to the end of the epoch
    steps = min(left, plan.total_steps - r.step)
    if cfg.progressive_resize and loader.image_size != r.train_size:
        r.train_size = r.meter.fields["image_size"] = loader.image_size
        if r.ctx.is_main:
            console(f"distres: epoch {epoch + 1}: training at {r.train_size} px (--progressive-resize)")
    batches = iter(loader)
    bar = _progress(cfg, r.ctx, epoch, plan.epochs, done, done + left)
    r.meter.start_window()
    for s in range(steps):
        if r.step == r.prof.at:  # --profile-steps: the one check a step pays outside the window
            r.prof.boundary(r.step, r.meter)
        r.watch.enter("loading data", r.step + 1)
        micro = r.meter.fetch(batches)
        if cfg.compile and s == 0:
            # A pass's first step may compile (a new run, DDP rebuilt, a new image size): not timed.
            r.watch.leave()
        else:
            r.watch.enter("the training step", r.step + 1)  # its backward all-reduces the gradients
        with r.meter.step_context(r.model, r.step):  # no_sync() in probe windows (--bench-comm-probe)
            loss = engine.train_step(r.model, micro, r.loss_fn, r.state.optimizer, r.precision, cfg.clip_grad_norm)
        r.state.scheduler.step()
        r.meter.add(loss)
        r.step += 1
        if r.state.ema is not None:
            r.state.ema.update(r.state.model, r.step)
        bar.update(1)
        # A signal on any rank stops all ranks at the same step (see preempt.py); one at the
        # pass's last step is handled after the epoch's checkpoint and evaluation.
        stopping = s < steps - 1 and r.stop.stop_requested()
        if r.step % cfg.log_every == 0 or s == steps - 1 or stopping:
            rec = r.meter.flush(r.step, epoch + (done + s + 1) / plan.steps_per_epoch, r.lr, loader.bad_samples)
            divergence.check_logged(rec["loss"], r.state.scaler, r.step, r.lr)
            bar.set_postfix(
                loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}", img_s=f"{rec['images_per_sec']:.0f}", refresh=False
            )
        if stopping or (cfg.checkpoint_every and r.step % cfg.checkpoint_every == 0 and s < steps - 1):
            r.save()
        if stopping:
            bar.close()
            raise _preempted(r, epoch, done + s + 1)
    bar.close()
    r.prof.epoch_end(r.step)
    if steps == left:
        loader.set_epoch(epoch + 1)
    r.save()


def _diverged(r: Run, err: divergence.Diverged) -> None:
    """--on-nonfinite: stop with the one-line error, or go back to the last good checkpoint with
    the lr scaled down (every rank, at the same step: the guard's verdict is shared)."""
    cfg = r.cfg
    if cfg.on_nonfinite != "rollback" or r.rollbacks >= cfg.rollback_tries or r.ckpt.last_saved is None:
        raise divergence.give_up(err, str(r.ckpt.last_saved) if r.ckpt.last_saved else None, r.rollbacks)
    r.rollbacks += 1
    peak = max(r.state.scheduler.base_lrs)  # this run's, with earlier rollbacks
    r.step = r.ckpt.roll_back(r.state)
    # The checkpoint may predate earlier rollbacks: back to this run's lr, then lower it.
    back = peak / max(r.state.scheduler.base_lrs)
    optim.scale_lr(r.state.optimizer, r.state.scheduler, back * cfg.rollback_lr_factor)
    if _match_backbone(cfg, r.state):
        r.model = models.parallelize(r.state.model, cfg, r.ctx)
    r.logger.rewind(r.step)
    r.logger.log(
        {
            "kind": "rollback",
            "step": r.step,
            "diverged_at": err.step,
            "reason": err.what,
            "lr_factor": cfg.rollback_lr_factor,
            "rollback": r.rollbacks,
        }
    )
    if r.ctx.is_main:
        console(
            f"distres: {err.what} at step {err.step}; rollback {r.rollbacks} of {cfg.rollback_tries}: back to "
            f"{r.ckpt.last_saved} (step {r.step}) with the lr x {cfg.rollback_lr_factor:g} "
            f"(now {r.state.optimizer.param_groups[0]['lr']:.4g})"
        )


def _match_backbone(cfg, state: checkpoint.TrainingState) -> bool:
    """Freeze or unfreeze the backbone for the loader's epoch (--freeze-backbone-epochs), after
    a start, a resume, a rollback or at the switch; whether it changed (DDP must then be rebuilt).
    A trainable backbone gets its SGD momentum buffers: a checkpoint from the head-only epochs
    has none for it, and fused SGD cannot step a mix (see ``optim.init_momentum``)."""
    trainable = state.loader.epoch >= cfg.freeze_backbone_epochs
    changed = models.set_backbone_trainable(state.model, trainable)
    if trainable and cfg.freeze_backbone_epochs:
        optim.init_momentum(state.optimizer)
    return changed


def _preempted(r: Run, epoch: int, in_epoch: int) -> Preempted:
    """Once the checkpoint just saved is on disk on every rank's word, what they raise to stop."""
    r.ckpt.wait()
    why = r.stop.signal_name or "signal on another rank"
    return Preempted(
        f"distres: preempted ({why}): stopped after step {r.step} (epoch {epoch + 1}, step {in_epoch} "
        f"of {r.plan.steps_per_epoch}), checkpoint in {r.ckpt.folder}; --resume continues there"
    )


def _evaluate(r: Run, logger, epoch: int) -> dict:
    """Score the weights (and their EMA) on the validation set; keep the better as best.pt
    when it beats every earlier evaluation. Every rank scores with rank 0's BatchNorm statistics,
    the ones the checkpoint holds, so that ``distres.evaluate`` on it gives the same figures."""

    def tick(*_):  # each batch renews the watchdog's clock: the timeout is per batch and final reduction
        r.watch.enter("evaluation", r.step)

    tick()
    ema_model = r.state.ema.module if r.state.ema is not None else None
    if r.cfg.broadcast_buffers:
        for module in (r.state.model, ema_model):
            if module is not None:
                dist.broadcast_buffers(module)
    result = engine.evaluate(r.model, r.bundle.val, r.precision, r.ctx.device, each=tick)
    ema = None
    if ema_model is not None:
        ema = engine.evaluate(ema_model, r.bundle.val, r.precision, r.ctx.device, each=tick)
        result.update({f"ema_{k}": v for k, v in ema.items() if k != "eval_samples"})
    which, scored, top1 = (
        ("ema", ema_model, ema["top1"])
        if ema and ema["top1"] > result["top1"]
        else ("raw", r.state.model, result["top1"])
    )
    best = r.ckpt.save_best(
        scored.state_dict(), r.state.meta, {"top1": top1, "weights": which, "step": r.step, "epoch": epoch}
    )
    logger.log({"kind": "eval", "step": r.step, "epoch": epoch, **result})
    if r.ctx.is_main:
        line = (
            f"distres: epoch {epoch} step {r.step}: top1 {result['top1']:.2f}% top5 {result['top5']:.2f}% "
            f"val_loss {result['val_loss']:.4f}"
        )
        if ema:
            line += f"; EMA top1 {ema['top1']:.2f}% top5 {ema['top5']:.2f}%"
        console(f"{line} ({result['eval_samples']} images){'; new best.pt (' + which + ')' if best else ''}")
    return result


def _progress(cfg, ctx, epoch: int, epochs: int, first: int, total: int):
    """tqdm on rank 0; a disabled bar (every call a no-op) elsewhere or with --no-progress."""
    from tqdm import tqdm

    # In a log file (SLURM, CI) redraw rarely instead of flooding it.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(
        total=total,
        initial=first,
        desc=f"epoch {epoch + 1}/{epochs}",
        unit="step",
        mininterval=interval,
        dynamic_ncols=True,
        file=sys.stderr,
        disable=not (cfg.progress and ctx.is_main),
    )


def main(argv: list[str] | None = None) -> int:
    def body():
        cfg = config.parse_args(argv)
        # The collectives' own timeout is a backstop behind the watchdog's (--dist-timeout).
        run(
            cfg,
            dist.init(
                cfg.device, cfg.dist_backend, timeout_s=cfg.dist_timeout * 60 + 120, deterministic=cfg.deterministic
            ),
        )

    return run_cli(body, rank=dist.rank_from_env, cleanup=dist.teardown)


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
