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

from distres import checkpoint, config, data, dist, engine, models, optim, tracking
from distres.errors import EXIT_USER_ERROR, UserError, format_error


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


def _checkpoint_state(model, optimizer, scheduler, precision, cfg, ctx, epoch, step_in_epoch, step):
    return {
        "format": 1,
        "model": models.unwrap(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": precision.scaler.state_dict(),
        "epoch": epoch,
        "step_in_epoch": step_in_epoch,  # optimizer steps already done in `epoch`
        "step": step,
        "world_size": ctx.world_size,
        "config": cfg.to_dict(),
        "rng": checkpoint.rng_state(),
    }


def _find_resume(cfg, ckpt_dir: Path):
    if cfg.resume is None:
        if checkpoint.step_checkpoints(ckpt_dir) or (ckpt_dir / checkpoint.LAST).exists():
            raise UserError(f"{ckpt_dir} already holds checkpoints; pass --resume to continue that run "
                            "or choose a new --output-dir")
        return None
    if cfg.resume == "latest":
        found = checkpoint.load_latest(ckpt_dir)
        if found is None:
            tracking.console(f"distres: no checkpoint in {ckpt_dir}; starting from scratch")
        return found
    path = Path(cfg.resume)
    return checkpoint.load(path), path


def run(cfg: config.TrainConfig, ctx: dist.DistContext) -> dict:
    out = Path(cfg.output_dir)
    ckpt_dir = out / "checkpoints"
    resumed = _find_resume(cfg, ckpt_dir)
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
        net.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        precision.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        start_epoch, start_in_epoch, step = state["epoch"], state["step_in_epoch"], state["step"]
        if state["world_size"] != ctx.world_size and start_in_epoch:
            warnings.warn(f"checkpoint from {state['world_size']} processes, now {ctx.world_size}: "
                          "the data shards differ, so the interrupted epoch restarts", stacklevel=1)
            start_in_epoch = 0
        if ctx.is_main:
            tracking.console(f"distres: resumed from {path} at step {step} (epoch {start_epoch + 1})")

    model = net
    if ctx.distributed:
        model = models.wrap_ddp(net, ctx.device, cfg.bucket_cap_mb, cfg.static_graph)
    if cfg.compile:
        model = torch.compile(model, mode=None if cfg.compile_mode == "default" else cfg.compile_mode)

    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
    logger = tracking.build(cfg, ctx.is_main, out, step if resumed else None)
    global_batch = cfg.batch_size * cfg.grad_accum * ctx.world_size
    if ctx.is_main:
        tracking.console(
            f"distres: {cfg.arch} on {ctx.world_size} x {ctx.device.type} ({ctx.backend or 'single process'}), "
            f"{cfg.data} {bundle.image_size}px, {bundle.num_classes} classes, global batch {global_batch}, "
            f"lr {lr:g}, amp {cfg.amp}, {steps_per_epoch} steps/epoch, {total_steps} steps")

    def save(epoch: int, in_epoch: int) -> None:
        if ctx.is_main:
            state = _checkpoint_state(model, optimizer, scheduler, precision, cfg, ctx, epoch, in_epoch, step)
            checkpoint.save(state, ckpt_dir, step, cfg.keep_checkpoints)

    last_eval = None
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
                loss_sum += engine.train_step(model, micro, loss_fn, optimizer, precision, cfg.clip_grad_norm)
                scheduler.step()
                step += 1
                n_since += 1
                if bar is not None:
                    bar.update(1)
                if step % cfg.log_every == 0 or s == steps_here - 1:
                    # Note: a host-device sync point (and, with N ranks, an all-reduce); kept off
                    # the other steps so the GPU queue never drains.
                    red = dist.all_reduce_sum(torch.stack([loss_sum, torch.tensor(float(n_since), device=ctx.device)]))
                    elapsed = time.perf_counter() - t_log
                    rec = {"kind": "train", "step": step, "epoch": epoch + (s + 1) / steps_per_epoch,
                           "loss": (red[0] / red[1]).item(), "lr": scheduler.get_last_lr()[0],
                           "images_per_sec": n_since * global_batch / elapsed,
                           "data_wait_frac": wait / elapsed, "time": time.perf_counter() - t_run}
                    logger.log(rec)
                    if bar is not None:
                        bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.3g}",
                                        img_s=f"{rec['images_per_sec']:.0f}", refresh=False)
                    loss_sum.zero_()
                    n_since, wait, t_log = 0, 0.0, time.perf_counter()
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and s < steps_here - 1:
                    save(epoch, s + 1)
            if bar is not None:
                bar.close()
            epoch_done = steps_here == steps_per_epoch
            save(epoch + 1, 0) if epoch_done else save(epoch, steps_here)
            final = step >= total_steps
            if final or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
                last_eval = _evaluate(model, bundle, precision, ctx, logger, step, epoch + 1)
        if last_eval is None:  # resumed after the last step: still report the accuracy
            last_eval = _evaluate(model, bundle, precision, ctx, logger, step, epochs)
    finally:
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
        if dist.rank_from_env() == 0:
            print(format_error(e), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130
    finally:
        dist.teardown()


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
