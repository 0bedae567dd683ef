"""The sample order of an epoch, defined over the global batch, and each rank's share of it.

Every rank computes the same permutation of the whole epoch from (seed, epoch). Training step s
takes the next G = B x A x W positions of it (B the per-rank batch, A the micro-batches of
--grad-accum, W the world size), whatever the split: a run resumed with another split (other
world size, other --grad-accum) continues with exactly the samples the interrupted one had not
reached, so a run's place in an epoch is a number of samples. Within a step, micro-batch a of
rank r holds positions s*G + j*A*W + a*W + r (j < B): its "slot" a*W + r strides through the
step. A split with the same B and A x W therefore gives every slot the same images, e.g. 2
processes or 1 process with --grad-accum 2: the same BatchNorm batches and, up to the order of
one addition, the same gradients. The shards are disjoint, their union is the epoch, and there
is no padding (DistributedSampler pads, which double-counts in evaluation). Evaluation gives
rank r every W-th sample from r.

With repeated augmentation (``repeats`` > 1, as torchvision's RASampler) the order is a
permutation of the images with each repeated ``repeats`` times in a row, cut to the epoch's
length: consecutive positions go to consecutive ranks, so the copies of an image are augmented
differently on different ranks within one step.

Each draw (an image, or one copy of it) also gets its own augmentation seed from
(seed, epoch, draw id). Augmentation then does not depend on which backend, worker process,
world size or resumed run processes it.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

_MIX = 1_000_003  # a prime spreading (seed, epoch) over distinct generator seeds
_MASK63 = 0x7FFF_FFFF_FFFF_FFFF


def epoch_order(
    num_samples: int, seed: int, epoch: int, shuffle: bool, repeats: int = 1, blocks: np.ndarray | None = None
) -> torch.Tensor:
    """The epoch's draw ids in order: id = copy * num_samples + image index, so the image is
    ``id % num_samples`` and copy 0 of an image has the image's own index as its id.

    ``blocks`` (--shuffle-scope shard: each sample's shard, in sample order): the blocks in a
    shuffled order, each block's samples shuffled within it, so that at any time all ranks read
    from one or two shards (sequential reads on storage where random ones are slow); still a
    function of (seed, epoch) alone, hence exact and elastic like the global order."""
    if not shuffle:
        return torch.arange(num_samples)
    g = torch.Generator().manual_seed(seed * _MIX + epoch)
    perm = torch.randperm(num_samples, generator=g) if blocks is None else _block_order(blocks, g)
    if repeats == 1:
        return perm
    copies = perm[:, None] + num_samples * torch.arange(repeats)[None, :]  # image-major: copies adjacent
    return copies.reshape(-1)[:num_samples]


def _block_order(blocks: np.ndarray, g: torch.Generator) -> torch.Tensor:
    starts = np.concatenate([[0], np.flatnonzero(np.diff(blocks)) + 1, [len(blocks)]])
    parts = [
        torch.randperm(int(starts[k + 1] - starts[k]), generator=g) + int(starts[k])
        for k in torch.randperm(len(starts) - 1, generator=g).tolist()
    ]
    return torch.cat(parts)


def sample_seeds(seed: int, epoch: int, ids: np.ndarray) -> np.ndarray:
    """Each draw's augmentation seed, (seed, epoch) mixed with its id (uint64 array)."""
    base = np.uint64(((seed * _MIX + epoch) * 1_000_000_007) & _MASK63)
    return (np.asarray(ids, dtype=np.uint64) + base) & np.uint64(_MASK63)


class ShardSampler(torch.utils.data.Sampler):
    """Yields batches of (index, augmentation seed) for this rank and the current epoch.

    ``drop_last`` (training) yields the same number of full batches on every rank; without it
    (evaluation) the whole shard is yielded, the last batch possibly short.
    ``set_epoch(epoch, start_sample)`` picks the epoch and the position in its global order to
    start at (a resumed run: the samples every rank consumed so far); batches are counted
    from there.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool,
        drop_last: bool,
        repeats: int = 1,
        accum: int = 1,
        blocks: np.ndarray | None = None,
    ):
        self.num_samples, self.batch_size, self.accum = num_samples, batch_size, accum if drop_last else 1
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle, self.drop_last = shuffle, drop_last
        self.repeats = repeats if shuffle else 1  # evaluation counts every sample once
        self.epoch, self.start_sample = 0, 0
        self.blocks = blocks if shuffle else None  # --shuffle-scope shard (``epoch_order``)

    @property
    def global_batch(self) -> int:
        """Samples of one micro-batch over all ranks."""
        return self.batch_size * self.world_size

    @property
    def step_samples(self) -> int:
        """Samples of one optimizer step over all ranks and micro-batches."""
        return self.global_batch * self.accum

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.epoch, self.start_sample = epoch, start_sample

    def num_batches(self) -> int:
        """This rank's batches from the start position to the end of the epoch."""
        left = max(0, self.num_samples - self.start_sample)
        if self.drop_last:  # whole steps only
            return left // self.step_samples * self.accum
        mine = len(range(self.rank, left, self.world_size))
        return -(-mine // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches()

    def epoch_ids(self) -> np.ndarray:
        """This rank's draw ids from the start position to the end of the epoch, in order
        (batch k is the k-th slice of batch_size of them; training leaves the tail that fills
        no batch unused)."""
        order = epoch_order(self.num_samples, self.seed, self.epoch, self.shuffle, self.repeats, self.blocks)
        rest = order[self.start_sample :].numpy()
        if not self.drop_last:
            return np.ascontiguousarray(rest[self.rank :: self.world_size])
        steps = len(rest) // self.step_samples
        slots = rest[: steps * self.step_samples].reshape(steps, self.batch_size, self.accum, self.world_size)
        return np.ascontiguousarray(slots[:, :, :, self.rank].transpose(0, 2, 1).reshape(-1))

    def epoch_indices(self) -> np.ndarray:
        """``epoch_ids`` as image indices."""
        return self.epoch_ids() % self.num_samples

    def seeds(self, ids: np.ndarray) -> np.ndarray:
        """The augmentation seeds of these draws (``epoch_ids`` values) in this epoch."""
        return sample_seeds(self.seed, self.epoch, ids)

    def batch_key(self, k: int) -> int:
        """An identity of this rank's batch k (counted from the start position) for per-batch
        random draws: the position of its first sample in the epoch's order. The same images
        in the same slot of a step give the same key, whatever the split of the global batch."""
        return (
            self.start_sample + (k // self.accum) * self.step_samples + (k % self.accum) * self.world_size + self.rank
        )

    def batch_slices(self, start: int = 0) -> Iterator[slice]:
        """This rank's batches from batch ``start`` (counted from the start position) as slices
        of ``epoch_ids()``."""
        b = self.batch_size
        for i in range(start, self.num_batches()):
            yield slice(i * b, (i + 1) * b)

    def id_batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """This rank's batches from batch ``start`` as arrays of draw ids."""
        ids = self.epoch_ids()
        for part in self.batch_slices(start):
            yield ids[part]

    def index_batches(self, start: int = 0) -> Iterator[np.ndarray]:
        """This rank's batches from batch ``start`` as arrays of image indices."""
        for ids in self.id_batches(start):
            yield ids % self.num_samples

    def __iter__(self):
        for ids in self.id_batches():
            yield list(zip((ids % self.num_samples).tolist(), self.seeds(ids).tolist()))
