"""Per-rank, per-epoch sample order: disjoint shards, reshuffled every epoch from the seed.

Every rank computes the same permutation of the whole epoch from (seed, epoch) and takes every
world-th element starting at its rank, so the shards are disjoint and their union is the epoch,
with no padding duplicates (DistributedSampler pads, which double-counts in evaluation).

Each sample also gets its own augmentation seed from (seed, epoch, index). Augmentation then
does not depend on which backend, worker process or resumed run processes it.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

_MIX = 1_000_003  # a prime spreading (seed, epoch) over distinct generator seeds
_MASK63 = 0x7FFF_FFFF_FFFF_FFFF


def epoch_order(num_samples: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(seed * _MIX + epoch)
    return torch.randperm(num_samples, generator=g)


def sample_seeds(seed: int, epoch: int, indices: np.ndarray) -> np.ndarray:
    """Each sample's augmentation seed, (seed, epoch) mixed with its index (uint64 array)."""
    base = np.uint64(((seed * _MIX + epoch) * 1_000_000_007) & _MASK63)
    return (np.asarray(indices, dtype=np.uint64) + base) & np.uint64(_MASK63)


def train_batches_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    # Every rank must take the same number of optimizer steps (DDP all-reduces each one), so
    # the count comes from the smallest shard; the few leftover samples change every epoch.
    return (num_samples // world) // batch_size


class ShardSampler(torch.utils.data.Sampler):
    """Yields batches of (index, augmentation seed) for this rank and the current epoch.

    ``drop_last`` (training) yields ``train_batches_per_epoch`` full batches on every rank;
    without it (evaluation) the whole shard is yielded, the last batch possibly short.
    ``set_epoch(epoch, start_batch)`` also lets a resumed run skip the batches already done.
    """

    def __init__(self, num_samples: int, batch_size: int, rank: int, world: int, seed: int,
                 shuffle: bool, drop_last: bool):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.rank, self.world, self.seed = rank, world, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def num_batches(self) -> int:
        if self.drop_last:
            return train_batches_per_epoch(self.num_samples, self.world, self.batch_size)
        mine = len(range(self.rank, self.num_samples, self.world))
        return -(-mine // self.batch_size)

    def __len__(self) -> int:
        return max(0, self.num_batches() - self.start_batch)

    def epoch_indices(self) -> np.ndarray:
        """This rank's sample indices for the whole epoch, in order (batch k is the k-th slice of
        batch_size of them; training leaves the tail that fills no batch unused)."""
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle)
        return np.ascontiguousarray(order[self.rank::self.world].numpy())

    def batch_slices(self, start: int | None = None) -> Iterator[slice]:
        """This epoch's batches from ``start`` (default: the resume point) as slices of
        ``epoch_indices()``."""
        b = self.batch_size
        for i in range(self.start_batch if start is None else start, self.num_batches()):
            yield slice(i * b, (i + 1) * b)

    def index_batches(self, start: int | None = None) -> Iterator[np.ndarray]:
        """This epoch's batches from ``start`` (default: the resume point) as arrays of sample
        indices."""
        idx = self.epoch_indices()
        for part in self.batch_slices(start):
            yield idx[part]

    def __iter__(self):
        for batch in self.index_batches():
            yield list(zip(batch.tolist(), sample_seeds(self.seed, self.epoch, batch).tolist()))
