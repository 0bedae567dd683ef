"""Train a ResNet with DistributedDataParallel.

    python -m distres.train --data synthetic --arch resnet18 --max-steps 20         # 1 process
    torchrun --nproc_per_node 2 -m distres.train --data synthetic --device cpu ...  # 2 gloo ranks
    torchrun --nproc_per_node 8 -m distres.train --data imagefolder --data-dir /imagenet  # 8 GPUs

Flags: ``python -m distres.train --help``. Outputs in --output-dir: config.yaml,
metrics.jsonl, checkpoints/. main() reads top to bottom: parse, init, build, loop, teardown.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from distres import checkpoint, config, data, dist, engine, models, optim, perf, preempt, telemetry, tracking
from distres.errors import EXIT_PREEMPTED, EXIT_USER_ERROR, Preempted, RankError, UserError, format_error


def _set_performance_flags(cfg, ctx) -> None:
    if ctx.device.type == "cpu":
        # N ranks on one CPU node would otherwise each start one thread per core and thrash.
        torch.set_num_threads(ctx.cpus_per_rank)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    else:
        torch.backends.cudnn.benchmark = True  # fixed input shapes: autotune convolutions once
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _data_order(cfg, ctx) -> dict:
    """What the sample order depends on (data/sharding.py derives it from these alone)."""
    return {"seed": cfg.seed, "world_size": ctx.world_size, "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum, "data": cfg.data, "data_dir": cfg.data_dir}


def _checkpoint_state(model, optimizer, scheduler, precision, cfg, ctx, epoch, step_in_epoch, step, rng):
    return {
        "format": 2,
        "model": models.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,  # optimizer steps already done in `epoch`
        "step": step,
        "world_size": ctx.world_size,
        "data_order": _data_order(cfg, ctx),
        "config": cfg.to_dict(),
        "rng": rng,  # one entry per rank
    }


def _find_resume(cfg, ckpt_dir: Path, restart: int, is_main: bool):
    resume = cfg.resume
    if restart > 0:
        # torchrun --max-restarts restarted the workers, or SLURM requeued the job, with the
        # original command line: continue from this run's newest checkpoint, also when that
        # command line named an older one with --resume PATH (the first attempt's start).
        found = checkpoint.load_latest(ckpt_dir)
        if found is not None:
            return found
        resume = resume or "latest"
    if resume is None:
        if checkpoint.step_checkpoints(ckpt_dir) or (ckpt_dir / checkpoint.LAST).exists():
            raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run "
                            "or choose a new --output-dir")
        return None
    if resume == "latest":
        found = checkpoint.load_latest(ckpt_dir)
        if found is None and is_main:
            tracking.console(f"distres: no checkpoint in {ckpt_dir}; starting from scratch")
        return found
    path = Path(cfg.resume)
    return checkpoint.load(path), path


def run(cfg: config.TrainConfig, ctx: dist.DistContext) -> dict:
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resumed = _find_resume(cfg, ckpt_dir, ctx.restart, ctx.is_main)
    _set_performance_flags(cfg, ctx)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (DDP also broadcasts)

    mem_format = models.memory_format(cfg.channels_last)
    bundle = data.build(cfg, ctx, mem_format)
    if cfg.sync_bn and ctx.distributed and ctx.device.type != "cuda":
        raise UserError("--sync-bn needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU kernel); "
                        "drop --sync-bn on CPU runs")
    net = models.build_model(cfg.arch, bundle.num_classes,
                             models.use_cifar_stem(cfg.cifar_stem, bundle.image_size),
                             cfg.zero_init_residual)
    net = models.prepare(net, ctx.device, cfg.channels_last, cfg.sync_bn, ctx.distributed)

    steps_per_epoch = bundle.train.sampler.num_batches() // cfg.grad_accum
    if steps_per_epoch == 0:
        raise UserError(f"--grad-accum {cfg.grad_accum} needs more batches than the "
                        f"{bundle.train.sampler.num_batches()} each rank has per epoch; lower it or --batch-size")
    epochs = cfg.epochs if cfg.epochs > 0 else math.ceil(cfg.max_steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch
    if cfg.max_steps > 0:
        total_steps = min(total_steps, cfg.max_steps)
        epochs = min(epochs, math.ceil(total_steps / steps_per_epoch))

    lr = optim.peak_lr(cfg, ctx.world_size)
    optimizer = optim.build_optimizer(cfg, net, lr, ctx.device)
    scheduler = optim.build_scheduler(cfg, optimizer, total_steps, steps_per_epoch)
    precision = engine.Precision(cfg.amp, ctx.device)
    loss_fn = optim.build_loss(cfg)

    start_epoch, start_in_epoch, step = 0, 0, 0
    if resumed is not None:
        state, path = resumed
        try:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            saved = state.get("config", {})
            raise UserError(f"checkpoint {path} does not fit this run (saved with --arch {saved.get('arch')} "
                            f"--optimizer {saved.get('optimizer')}; {str(e).splitlines()[0][:120]}); resume with "
                            "the settings of its config.yaml or start a new --output-dir") from None
        scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(checkpoint.rank_rng(state, ctx.rank))
        start_epoch, start_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        saved_order = state.get("data_order", {"world_size": state["world_size"]})
        changed = sorted(k for k, v in _data_order(cfg, ctx).items() if k in saved_order and saved_order[k] != v)
        if changed and start_in_epoch:
            warnings.warn(f"{', '.join(changed)} changed since the checkpoint, so the order of the "
                          "interrupted epoch differs: that epoch restarts from its beginning", stacklevel=1)
            start_in_epoch = 0
        if ctx.is_main:
            tracking.console(f"distres: resumed from {path} at step {step} (epoch {start_epoch + 1})")
    # Each rank found its checkpoint itself. Where the output directory is not one shared folder
    # (node-local disks, stale NFS caches) they could differ, and the first collective would hang.
    steps = sorted(set(dist.gather_objects(step)))
    if len(steps) > 1:
        raise UserError(f"the processes resumed from different steps {steps}; put --output-dir on a "
                        "file system that every node shares")

    model = net
    if ctx.distributed:
        model = models.wrap_ddp(net, ctx.device, cfg.bucket_cap_mb, cfg.static_graph)
    if cfg.compile:
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world_size
    # A resume that found no checkpoint still continues this output directory: drop the records
    # of the attempt that died before its first checkpoint, and keep its W&B run id.
    resume_step = step if resumed else (0 if cfg.resume is not None or ctx.restart > 0 else None)
    logger = tracking.build(cfg, ctx.is_main, out, resume_step,
                            run_info={"world_size": ctx.world_size, "device_type": ctx.device.type,
                                      "backend": ctx.backend, "global_batch": global_batch})
    meter = perf.StepMeter(cfg, ctx, model, global_batch)  # step-time fields, epoch verdict
    telem = telemetry.start(ctx)
    if ctx.is_main:
        tracking.console(
            f"distres: {cfg.arch} on {ctx.world_size} x {ctx.device.type} ({ctx.backend or 'single process'}), "
            f"{cfg.data} {bundle.image_size}px ({bundle.backend} loader), {bundle.num_classes} classes, global batch {global_batch}, "
            f"lr {lr:g}, amp {cfg.amp}, {steps_per_epoch} steps/epoch, {total_steps} steps")

    def save(epoch: int, in_epoch: int) -> None:
        rng = dist.gather_objects(checkpoint.rng_state())  # a collective: every rank calls save
        if ctx.is_main:
            state = _checkpoint_state(model, optimizer, scheduler, precision, cfg, ctx, epoch, in_epoch, step, rng)
            checkpoint.save(state, ckpt_dir, step, cfg.keep_checkpoints)

    def preempted(epoch: int, in_epoch: int) -> Preempted:
        why = stop.signal_name or "signal on another rank"
        return Preempted(f"distres: preempted ({why}): stopped after step {step} (epoch {epoch + 1}, step {in_epoch} of "
                         f"{steps_per_epoch}), checkpoint in {ckpt_dir}; --resume continues there")

    stop = preempt.PreemptionFlag(ctx.distributed)
    last_eval = None
    completed = False  # the outstanding preemption all-reduce exists on every rank only then
    t_run = time.perf_counter()
    try:
        for epoch in range(start_epoch, epochs):
            if step >= total_steps:
                break
            first = start_in_epoch if epoch == start_epoch else 0
            bundle.train.set_epoch(epoch, start_batch=first * cfg.grad_accum)
            batches = iter(bundle.train)
            steps_here = min(steps_per_epoch, first + total_steps - step)
            bar = _progress(cfg, ctx, epoch, epochs, first, steps_per_epoch)
            loss_sum = torch.zeros((), device=ctx.device)
            n_since, wait, t_log = 0, 0.0, time.perf_counter()
            for s in range(first, steps_here):
                t0 = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.grad_accum)]
                wait += time.perf_counter() - t0
                with meter.step_context(step):  # no_sync() in probe windows (--bench-comm-probe)
                    loss_sum += engine.train_step(model, micro, loss_fn, optimizer, precision, cfg.clip_grad_norm)
                scheduler.step()
                step += 1
                n_since += 1
                if bar is not None:
                    bar.update(1)
                # A signal on any rank stops all ranks at the same step (see preempt.py); one
                # at an epoch's last step is handled after the epoch's checkpoint and evaluation.
                stopping = s < steps_here - 1 and stop.stop_requested()
                if step % cfg.log_every == 0 or s == steps_here - 1 or stopping:
                    # Note: a host-device sync point (and, with N ranks, an all-reduce); kept off
                    # the other steps so the GPU queue never drains.
                    red = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n_since), device=ctx.device),
                                                           torch.tensor(float(bundle.train.bad_samples), device=ctx.device)]))
                    elapsed = time.perf_counter() - t_log
                    rec = {"kind": "train", "step": step, "epoch": epoch + (s + 1) / steps_per_epoch,
                           "loss": (red[0] / red[1]).item(), "lr": scheduler.get_last_lr()[0],
                           "images_per_sec": n_since * global_batch / elapsed,
                           "data_wait_frac": wait / elapsed, "time": time.perf_counter() - t_run,
                           "bad_samples": int(red[2].item()),  # undecodable images skipped so far, all ranks
                           **meter.window(n_since, elapsed, wait, step)}
                    logger.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}",
                                        img_s=f"{rec['images_per_sec']:.0f}", refresh=False)
                    loss_sum.zero_()
                    n_since, wait, t_log = 0, 0.0, time.perf_counter()
                if stopping or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and s < steps_here - 1):
                    save(epoch, s + 1)
                if stopping:
                    dist.barrier()  # exit only once rank 0's checkpoint is on disk
                    if bar is not None:
                        bar.close()
                    raise preempted(epoch, s + 1)
            if bar is not None:
                bar.close()
            epoch_done = steps_here == steps_per_epoch
            save(epoch + 1, 0) if epoch_done else save(epoch, steps_here)
            final = step >= total_steps
            if final or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                last_eval = _evaluate(model, bundle, precision, ctx, logger, step, epoch + 1)
            meter.epoch_end(logger, telem, step, epoch + 1)  # data-wait verdict, GPU telemetry
            if not final and stop.stop_requested():  # (not final: the epoch ran to its end)
                raise preempted(epoch + 1, 0)
        if last_eval is None:  # resumed after the last step: still report the accuracy
            last_eval = _evaluate(model, bundle, precision, ctx, logger, step, epochs)
        completed = True
    except Preempted:
        completed = True  # every rank raised it at the same step
        raise
    finally:
        stop.close(wait=completed)
        telem.close()
        logger.close()
    if ctx.is_main:
        secs = time.perf_counter() - t_run
        tracking.console(f"distres: done, {step} steps in {secs:.0f} s; top1 {last_eval['top1']:.2f}% "
                         f"top5 {last_eval['top5']:.2f}%; outputs in {out}")
    return last_eval


def _evaluate(model, bundle, precision, ctx, logger, step: int, epoch: int) -> dict:
    result = engine.evaluate(model, bundle.val, precision, ctx.device)
    logger.log({"kind": "eval", "step": step, "epoch": epoch, **result})
    if ctx.is_main:
        tracking.console(f"distres: epoch {epoch} step {step}: top1 {result['top1']:.2f}% "
                         f"top5 {result['top5']:.2f}% val_loss {result['val_loss']:.4f} "
                         f"({result['eval_samples']} images)")
    return result


def _progress(cfg, ctx, epoch: int, epochs: int, first: int, total: int):
    if not (cfg.progress and ctx.is_main):
        return None
    from tqdm import tqdm
    # In a log file (SLURM, CI) redraw rarely instead of flooding it.
    interval = 0.5 if sys.stderr.isatty() else 30.0
    return tqdm(total=total, initial=first, desc=f"epoch {epoch + 1}/{epochs}", unit="step",
                mininterval=interval, dynamic_ncols=True, file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = config.parse_args(argv)
        ctx = dist.init(cfg.device, cfg.dist_backend)
        run(cfg, ctx)
        return 0
    except UserError as e:
        if dist.rank_from_env() == 0 or isinstance(e, RankError):
            print(format_error(e), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except Preempted as e:
        if dist.rank_from_env() == 0:
            print(e, file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except KeyboardInterrupt:
        return 130
    finally:
        dist.teardown()


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
