"""One loader protocol for every backend, and ``build``, which picks the backend.

A ``Loader`` is an iterable over one epoch of this rank's batches. It yields
``(images, labels)`` already on the training device: images normalised, float32 (the model's
parameter dtype; autocast lowers it inside the model), in the model's memory format; labels
int64. ``len()`` is the number of batches left in the epoch, ``set_epoch(epoch, start_batch)``
picks the epoch (and, for a resumed run, where to start), ``state_dict()`` is the position
to checkpoint. Every backend takes its order from the same ``ShardSampler`` and its random
crops from ``transforms``, so the backends differ only in how fast they get there:

- ``torch``: DataLoader worker processes decode and crop uint8; pinned memory; normalised on the device.
- ``gpu``: the whole (small) data set decoded once into one uint8 tensor on the device.
- ``dali``: NVIDIA DALI decodes and crops (on the GPU when there is one; the optional extra).
- ``synthetic``: learnable random images made on the device, no I/O (throughput runs).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from distres.data import sources, transforms
from distres.data.bad import BadSamples
from distres.data.sharding import ShardSampler
from distres.errors import RankError, UserError
from distres.tracking import console


class Normalize:
    """uint8 N x C x H x W images (any strides, any device) -> the model's input."""

    def __init__(self, mean, std, device: torch.device, memory_format: torch.memory_format,
                 dtype: torch.dtype = torch.float32):
        self.device, self.memory_format, self.dtype = device, memory_format, dtype
        self.mean_255 = [255 * m for m in mean]  # 0..255 units, as uint8 pixels come
        self.std_255 = [255 * s for s in std]
        self.mean = torch.tensor(self.mean_255, device=device, dtype=dtype).view(1, -1, 1, 1)
        self.std = torch.tensor(self.std_255, device=device, dtype=dtype).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor):
        # uint8 crosses the bus (4x less than float32); non_blocking overlaps the copy with
        # compute when the batch sits in pinned memory.
        images = images.to(self.device, non_blocking=True).contiguous(memory_format=self.memory_format)
        images = images.to(self.dtype).sub_(self.mean).div_(self.std)
        return images, labels.to(self.device, non_blocking=True)


@dataclass
class Spec:
    """What every backend gets: one split, its transforms, and this rank's share."""

    source: object  # sources.FolderSource / ArraySource / synthetic.SyntheticSource
    train: bool
    image_size: int
    norm: Normalize
    bad: BadSamples
    batch_size: int
    rank: int
    world: int
    seed: int
    workers: int  # DataLoader processes (torch) or DALI threads
    pin_memory: bool

    def sampler(self, num_samples: int) -> ShardSampler:
        return ShardSampler(num_samples, self.batch_size, self.rank, self.world, self.seed,
                            shuffle=self.train, drop_last=self.train)


class Loader:
    """The protocol. Backends implement ``_batches()`` over ``self.sampler``'s current epoch."""

    def __init__(self, sampler: ShardSampler, num_samples: int, device: torch.device, bad: BadSamples):
        self.sampler, self.num_samples, self.device, self.bad = sampler, num_samples, device, bad
        self._position = 0  # batches of the current epoch handed out (incl. skipped on resume)

    @property
    def bad_samples(self) -> int:
        """Samples left out so far on this process because they could not be decoded."""
        return self.bad.count

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)
        self._position = start_batch

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        self._position = self.sampler.start_batch
        for batch in self._batches():
            self._position += 1
            yield batch

    def state_dict(self) -> dict:
        """Where this epoch stands: ``load_state_dict`` continues with the next batch, the same
        samples and crops as an uninterrupted run."""
        return {"epoch": self.sampler.epoch, "batch": self._position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["batch"]))

    def _batches(self):
        raise NotImplementedError


def all_bad(bad, size: int) -> RankError:
    """A batch of which nothing could be decoded cannot be skipped (every rank must step)."""
    first = bad[0][0] if bad else "?"
    return RankError(f"all {size} images of a batch are unreadable (first: {first}); "
                     "check the data folder (python -m distres.prepare resize rewrites it and lists the bad files)")


@dataclass
class DataBundle:
    train: Loader
    val: Loader
    num_classes: int
    image_size: int
    backend: str = "torch"


def default_workers(cpus_per_rank: int, device: torch.device) -> int:
    if device.type == "cpu":
        # On a CPU run the same cores do the training maths: one worker decodes ahead while the
        # main process computes, more only steal cores from the matrix multiplies.
        return 1 if cpus_per_rank <= 4 else cpus_per_rank // 4
    # On a GPU run decoding is the bottleneck: every core but the one feeding the GPU.
    return max(1, min(cpus_per_rank - 1, 16))


def resolve_backend(requested: str, data: str, device: torch.device) -> str:
    """auto: synthetic for --data synthetic; gpu for CIFAR-10 on a CUDA device (it fits in
    memory many times over); torch otherwise (dali is opt-in: an optional extra)."""
    if requested != "auto":
        return requested
    if data == "synthetic":
        return "synthetic"
    return "gpu" if data == "cifar10" and device.type == "cuda" else "torch"


def build(cfg, ctx, memory_format: torch.memory_format) -> DataBundle:
    """The train and validation loaders for cfg.data on this rank."""
    backend = resolve_backend(cfg.data_backend, cfg.data, ctx.device)
    if (backend == "synthetic") != (cfg.data == "synthetic"):
        raise UserError("--data-backend synthetic goes with --data synthetic only; use --data-backend torch"
                        if backend == "synthetic" else
                        f"--data synthetic makes its images itself; drop --data-backend {backend}")
    size = cfg.image_size or (32 if cfg.data == "cifar10" else 224)
    if backend == "synthetic":
        from distres.data.synthetic import SyntheticSource
        splits = [SyntheticSource(n, cfg.synthetic_classes, size, cfg.seed, k, ctx.device)
                  for k, n in enumerate((cfg.synthetic_samples, max(1, cfg.synthetic_samples // 8)))]
        num_classes, mean, std = cfg.synthetic_classes, (0.5,) * 3, (0.25,) * 3
    else:
        if cfg.data == "cifar10":
            root = Path(cfg.data_dir) if cfg.data_dir else sources.default_cifar10_dir()
            splits = sources.cifar10_splits(root, download=ctx.local_rank == 0)
            mean, std = transforms.CIFAR_MEAN, transforms.CIFAR_STD
        else:
            splits = sources.imagefolder_splits(Path(cfg.data_dir))
            mean, std = transforms.IMAGENET_MEAN, transforms.IMAGENET_STD
        num_classes = len(splits[0].classes)
        if ctx.is_main:
            for note in splits[0].notes + splits[1].notes:
                console(note)
    workers = cfg.workers if cfg.workers >= 0 else default_workers(ctx.cpus_per_rank, ctx.device)

    loaders = []
    for src, train in zip(splits, (True, False)):
        spec = Spec(src, train, size, Normalize(mean, std, ctx.device, memory_format), BadSamples(cfg.on_bad_sample),
                    cfg.batch_size, ctx.rank, ctx.world_size, cfg.seed, workers,
                    pin_memory=ctx.device.type == "cuda")
        loaders.append(loader_class(backend)(spec))

    train_loader = loaders[0]
    if train_loader.sampler.num_batches() == 0:
        raise UserError(
            f"{train_loader.num_samples} training samples cannot fill one batch of {cfg.batch_size} on each of "
            f"{ctx.world_size} processes; lower --batch-size or launch fewer processes")
    return DataBundle(train_loader, loaders[1], num_classes, size, backend)


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
