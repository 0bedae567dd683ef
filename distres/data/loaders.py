"""One loader protocol for every backend.

A ``Loader`` is an iterable over one epoch of this rank's batches. It yields
``(images, labels)`` already on the training device: images float32, normalised, in the
model's memory format; labels int64. ``len()`` is the number of batches left in the epoch,
``set_epoch(epoch, start_batch)`` picks the epoch (and, for a resumed run, where to start).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from distres.data import sources, transforms
from distres.data.sharding import ShardSampler
from distres.errors import UserError


def to_device(images: torch.Tensor, labels: torch.Tensor, device: torch.device,
              mean: torch.Tensor, std: torch.Tensor, memory_format: torch.memory_format):
    # uint8 crosses the bus (4x less than float32); non_blocking overlaps the copy with compute
    # when the batch sits in pinned memory.
    images = images.to(device, non_blocking=True).contiguous(memory_format=memory_format)
    images = images.float().sub_(mean).div_(std)
    return images, labels.to(device, non_blocking=True)


class Loader:
    def __init__(self, batches: Callable[[], Iterable], sampler: ShardSampler, num_samples: int,
                 device: torch.device, mean, std, memory_format: torch.memory_format):
        self._batches, self.sampler, self.num_samples = batches, sampler, num_samples
        self.device, self.memory_format = device, memory_format
        # mean/std in 0..255 units, shaped to broadcast over N x C x H x W
        self.mean = torch.tensor(mean, device=device).mul(255).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).mul(255).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_batch)

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        for images, labels in self._batches():
            yield to_device(images, labels, self.device, self.mean, self.std, self.memory_format)


class AugmentedDataset(torch.utils.data.Dataset):
    """Source + augmentation; indexed by (sample index, augmentation seed) from ShardSampler."""

    def __init__(self, source, train: bool, image_size: int, small_images: bool):
        self.source, self.train = source, train
        self.image_size, self.small_images = image_size, small_images

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item):
        index, seed = item
        img, label = self.source.load(index)
        size = self.image_size
        if self.train:
            g = torch.Generator().manual_seed(seed)
            if self.small_images:
                img = transforms.pad_crop_flip(transforms.fit(img, size), g, size)
            else:
                img = transforms.random_resized_crop_flip(img, g, size)
        else:
            img = transforms.fit(img, size) if self.small_images else transforms.resize_center_crop(img, size)
        return img.contiguous(), label


class SyntheticSource:
    """Learnable random data made on the device: a pool of images, each a noisy copy of its
    class's template, cycled by index. No I/O and no decode, for throughput runs and tests."""

    def __init__(self, num_samples: int, num_classes: int, image_size: int, seed: int,
                 split: int, device: torch.device, pool: int = 256):
        # The class templates depend on the seed alone, so train and val share them.
        templates = torch.randint(0, 256, (num_classes, 3, 8, 8), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(seed))
        g = torch.Generator().manual_seed(seed * 7919 + split + 1)
        pool = min(pool, num_samples)
        self.num_samples = num_samples
        self.labels = torch.randint(0, num_classes, (pool,), generator=g)
        up = torch.nn.functional.interpolate(templates[self.labels].float(), size=image_size, mode="nearest")
        noise = torch.randint(0, 256, (pool, 3, image_size, image_size), generator=g).float()
        self.images = (0.7 * up + 0.3 * noise).to(torch.uint8).to(device)
        self.labels = self.labels.to(device)

    def __len__(self) -> int:
        return self.num_samples

    def batch(self, items) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.tensor([i for i, _ in items], device=self.images.device) % len(self.labels)
        return self.images[idx], self.labels[idx]


@dataclass
class DataBundle:
    train: Loader
    val: Loader
    num_classes: int
    image_size: int


def default_workers(cpus_per_rank: int, device: torch.device) -> int:
    if device.type == "cpu":
        # On a CPU run the same cores do the training maths: one worker decodes ahead while the
        # main process computes, more only steal cores from the matrix multiplies.
        return 1 if cpus_per_rank <= 4 else cpus_per_rank // 4
    return min(cpus_per_rank, 12)


def build(cfg, ctx, memory_format: torch.memory_format) -> DataBundle:
    """The train and validation loaders for cfg.data on this rank."""
    backend = cfg.data_backend
    if backend == "auto":
        backend = "synthetic" if cfg.data == "synthetic" else "torch"
    if (backend == "synthetic") != (cfg.data == "synthetic"):
        raise UserError("--data-backend synthetic goes with --data synthetic only; use --data-backend torch")
    size = cfg.image_size or (32 if cfg.data == "cifar10" else 224)
    eval_bs = cfg.batch_size

    def sampler(n: int, train: bool) -> ShardSampler:
        return ShardSampler(n, cfg.batch_size if train else eval_bs, ctx.rank, ctx.world_size,
                            cfg.seed, shuffle=train, drop_last=train)

    if backend == "synthetic":
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
    train_src, val_src = splits

    loaders = []
    for src, train in ((train_src, True), (val_src, False)):
        s = sampler(len(src), train)
        if backend == "synthetic":
            batches = (lambda s=s, src=src: (src.batch(items) for items in s))
        else:
            batches = _dataloader(AugmentedDataset(src, train, size, small_images=size <= 64), s, cfg, ctx)
        loaders.append(Loader(batches, s, len(src), ctx.device, mean, std, memory_format))

    train_loader = loaders[0]
    if train_loader.sampler.num_batches() == 0:
        raise UserError(
            f"{len(train_src)} training samples cannot fill one batch of {cfg.batch_size} on each of "
            f"{ctx.world_size} processes; lower --batch-size or launch fewer processes")
    return DataBundle(train_loader, loaders[1], num_classes, size)


def _dataloader(dataset, sampler, cfg, ctx) -> Callable[[], Iterable]:
    workers = cfg.workers if cfg.workers >= 0 else default_workers(ctx.cpus_per_rank, ctx.device)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
    )
    return lambda: iter(loader)
