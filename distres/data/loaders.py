"""``build``: the train and validation loaders of a run, on the backend it asks for.

- ``torch``: DataLoader worker processes decode and crop uint8; pinned memory; normalised on the device
  (``--decode-on device``: the workers read the files, the device decodes and crops).
- ``gpu``: the whole (small) data set decoded once into one uint8 tensor on the device.
- ``dali``: NVIDIA DALI decodes and crops (on the GPU when there is one; the optional extra).
- ``synthetic``: learnable random images made on the device, no I/O (throughput runs).

The protocol they share is ``base.Loader``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distres.data import decode, known, sources, transforms
from distres.data.autoaug import Policy
from distres.data.bad import BadSamples
from distres.data.base import Loader, Normalize, Spec
from distres.data.batchaug import BatchAugment
from distres.errors import UserError, console


@dataclass
class DataBundle:
    train: Loader | None  # None: built for evaluation only
    val: Loader
    num_classes: int
    image_size: int  # the (final) training crop
    backend: str  # the resolved --data-backend
    classes: list[str]  # label -> name
    mean: tuple[float, ...]  # the normalisation the loaders apply (0..1 units)
    std: tuple[float, ...]
    eval_image_size: int = 0  # the validation crop
    eval_resize: int = 0  # its shorter side before the crop (``transforms.eval_size``)

    def close(self) -> None:
        for loader in (self.train, self.val):
            if loader is not None:
                loader.close()


def default_workers(cpus_per_rank: int, device: torch.device) -> int:
    if device.type == "cpu":
        # On a CPU run the same cores do the training maths: one worker decodes ahead while the
        # main process computes, more only steal cores from the matrix multiplies.
        return 1 if cpus_per_rank <= 4 else cpus_per_rank // 4
    # On a GPU run decoding is the bottleneck: every core but the one feeding the GPU.
    return max(1, min(cpus_per_rank - 1, 16))


def resolve_backend(requested: str, data: str, device: torch.device) -> str:
    """auto: synthetic for --data synthetic; gpu for CIFAR-10/100 and MNIST on a CUDA device
    (they fit in memory many times over); torch otherwise (dali is opt-in: an optional extra)."""
    if requested != "auto":
        return requested
    if data == "synthetic":
        return "synthetic"
    return "gpu" if data in known.KNOWN and device.type == "cuda" else "torch"


def build(
    cfg, ctx, memory_format: torch.memory_format, stats=None, train: bool = True, classes: list[str] | None = None
) -> DataBundle:
    """The train and validation loaders for the configured data set on this rank (only the validation loader
    with ``train=False``). ``stats``: a (mean, std) normalisation instead of the data set's,
    e.g. the one pretrained weights were trained with; ``classes``: the label names the
    validation split must use (a model's), checked against its folders."""
    backend = resolve_backend(cfg.data.data_backend, cfg.data.dataset, ctx.device)
    _check_backend(cfg, backend, train)
    size = cfg.data.train_image_size
    eval_crop, eval_resize = cfg.data.eval_sizes
    eval_resize = transforms.eval_size(eval_crop, eval_resize)
    splits, names, (mean, std) = _splits(cfg, ctx, (size, eval_crop), classes)
    mean, std = stats or (mean, std)
    workers = cfg.data.workers if cfg.data.workers >= 0 else default_workers(ctx.cpus_per_rank, ctx.device)
    decode.configure(cfg.data.max_image_pixels, decode.excluded_by_flag(cfg.data.exclude_files))
    listing = Path(cfg.run.output_dir) / "bad_samples.txt" if train else None

    loaders = []
    for src, is_train in zip(splits, (True, False)):
        if is_train and not train:
            loaders.append(None)
            continue
        spec = Spec(
            src,
            is_train,
            size if is_train else eval_crop,
            Normalize(mean, std, ctx.device, memory_format),
            BadSamples(cfg.data.on_bad_sample, listing),
            cfg.optim.batch_size,
            ctx.rank,
            ctx.world_size,
            cfg.run.seed,
            workers,
            ctx.cpus_per_rank,
            repeats=cfg.data.repeated_aug,
            accum=cfg.optim.grad_accum,
            policy=Policy(cfg.augment.auto_augment, cfg.augment.ra_magnitude),
            batch_aug=BatchAugment.from_config(cfg.augment, len(names), cfg.run.seed),
            flip=getattr(src, "dataset", cfg.data.dataset) not in known.NO_FLIP,
            resize=0 if is_train else eval_resize,
            sizes=cfg.data.resize_schedule if is_train else None,
            decode_on_device=cfg.data.decode_on == "device",
            shuffle_scope=cfg.data.shuffle_scope,
        )
        loaders.append(loader_class(backend)(spec))

    train_loader = loaders[0]
    if train_loader is not None and train_loader.num_samples < cfg.optim.batch_size * ctx.world_size:
        raise UserError(
            f"{train_loader.num_samples} training samples cannot fill one batch of {cfg.optim.batch_size} on each of "
            f"{ctx.world_size} processes; lower --batch-size or launch fewer processes"
        )
    return DataBundle(
        train_loader, loaders[1], len(names), size, backend, names, tuple(mean), tuple(std), eval_crop, eval_resize
    )


def _check_backend(cfg, backend: str, train: bool) -> None:
    """The options a backend cannot honour, each as its one-line error."""
    if (backend == "synthetic") != (cfg.data.dataset == "synthetic"):
        raise UserError(
            "--data-backend synthetic goes with --data synthetic only; use --data-backend torch"
            if backend == "synthetic"
            else f"--data synthetic makes its images itself; drop --data-backend {backend}"
        )
    if train and cfg.augment.auto_augment != "none" and backend in ("dali", "synthetic"):
        raise UserError(
            f"--auto-augment {cfg.augment.auto_augment} runs in the torch and gpu backends only: "
            + (
                "DALI's auto_aug draws from its own generators, not from the per-sample seeds; "
                if backend == "dali"
                else ""
            )
            + "use --data-backend torch (or gpu)"
        )
    if cfg.data.decode_on == "device" and backend != "torch":
        raise UserError(
            f"--decode-on device is an option of --data-backend torch; the {backend} backend "
            + ("makes its images on the device" if backend == "synthetic" else "decodes by itself")
            + ": drop --decode-on device or pass --data-backend torch"
        )


def _splits(cfg, ctx, sizes: tuple[int, int], classes: list[str] | None):
    """(train source, val source), the class names, and the data set's (mean, std); ``sizes``:
    the training and evaluation crops (synthetic images are made at them)."""
    if cfg.data.dataset == "synthetic":
        from distres.data.synthetic import SyntheticSource

        splits = [
            SyntheticSource(n, cfg.data.synthetic_classes, sizes[k], cfg.run.seed, k, ctx.device)
            for k, n in enumerate((cfg.data.synthetic_samples, max(1, cfg.data.synthetic_samples // 8)))
        ]
        names = [str(k) for k in range(cfg.data.synthetic_classes)]
        if classes is not None and len(classes) != len(names):
            raise UserError(
                f"the model has {len(classes)} classes, --data synthetic {len(names)}; "
                f"pass --synthetic-classes {len(classes)}"
            )
        return splits, classes or names, ((0.5,) * 3, (0.25,) * 3)
    if cfg.data.dataset == "shards":
        from distres.data.shards import shard_splits

        splits = shard_splits(cfg.data.data_dir, cfg.data.cache_dir, cfg.data.cache_bytes, classes)
        kind = known.KNOWN.get(splits[1].dataset)
        stats = (kind.mean, kind.std) if kind else (transforms.IMAGENET_MEAN, transforms.IMAGENET_STD)
    elif cfg.data.dataset in known.KNOWN:
        root = Path(cfg.data.data_dir) if cfg.data.data_dir else known.default_dir(cfg.data.dataset)
        splits = known.splits(cfg.data.dataset, root, download=ctx.local_rank == 0, classes=classes)
        stats = known.KNOWN[cfg.data.dataset].mean, known.KNOWN[cfg.data.dataset].std
    else:
        splits = sources.imagefolder_splits(Path(cfg.data.data_dir), classes=classes)
        stats = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
    if ctx.is_main:
        for note in [n for split in splits if split is not None for n in split.notes]:
            console(note)
    return splits, list(splits[1].classes), stats


def loader_class(name: str) -> type[Loader]:
    # Imported on use: the dali module needs the optional extra, the others stay light.
    if name == "torch":
        from distres.data.torchloader import TorchLoader

        return TorchLoader
    if name == "gpu":
        from distres.data.gpu import GpuLoader

        return GpuLoader
    if name == "dali":
        from distres.data.dali import DaliLoader

        return DaliLoader
    from distres.data.synthetic import SyntheticLoader

    return SyntheticLoader
