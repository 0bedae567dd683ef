"""The loader protocol every backend implements (the factory that picks one is ``loaders.py``).

A ``Loader`` is an iterable over one epoch of this rank's batches. It yields
``(images, labels)`` already on the training device: images normalised, float32 (the model's
parameter dtype; autocast lowers it inside the model), in the model's memory format; labels
int64. ``len()`` is the number of batches left in the epoch. ``set_epoch(epoch, start_sample)``
picks the epoch and where in its global order to start; ``state_dict()`` is that position as
the samples all ranks have been handed so far, which the trainer checkpoints: the loader is the
one record of where training stands within an epoch, in units that do not depend on how the
global batch is split (``sharding`` says why). Every backend takes its order from the same
``ShardSampler`` and its random crops from ``transforms``, so backends hand out the same samples,
crops and labels. The pixels can differ by their decoder: nvJPEG (``--decode-on device``, DALI)
upsamples subsampled (4:2:0) chroma by replication where the workers' libjpeg-turbo
interpolates, a few grey levels on average; DALI also normalises in its own float kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from distres.data.autoaug import Policy
from distres.data.bad import BadSamples
from distres.data.sharding import ShardSampler
from distres.errors import RankError


class Normalize:
    """uint8 N x C x H x W images (any strides, any device) -> the model's input."""

    def __init__(
        self, mean, std, device: torch.device, memory_format: torch.memory_format, dtype: torch.dtype = torch.float32
    ):
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
    world_size: int
    seed: int
    workers: int  # DataLoader processes (torch) or DALI threads
    cpus: int  # this rank's share of the CPUs (threads for one-off work such as decoding a data set)
    repeats: int = 1  # --repeated-aug: copies of each training image per epoch
    accum: int = 1  # --grad-accum: micro-batches per optimizer step
    policy: Policy = field(default_factory=lambda: Policy("none"))  # --auto-augment (training)
    batch_aug: object = None  # batchaug.BatchAugment: erasing, mixup/cutmix (training), or None
    flip: bool = True  # random horizontal flips in training (not for data whose mirror image differs, digits)
    resize: int = 0  # evaluation: the shorter side before the centre crop (0: ``transforms.eval_size``'s default)
    sizes: object = None  # training: the crop size per epoch, a ``resolution.Schedule`` (None: image_size)
    decode_on_device: bool = False  # --decode-on device (torch backend)
    shuffle_scope: str = "global"  # --shuffle-scope: "shard" shuffles blocks of shards (``sharding.epoch_order``)

    @property
    def device(self) -> torch.device:
        return self.norm.device

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def sampler(self, num_samples: int) -> ShardSampler:
        return ShardSampler(
            num_samples,
            self.batch_size,
            self.rank,
            self.world_size,
            self.seed,
            shuffle=self.train,
            drop_last=self.train,
            repeats=self.repeats,
            accum=self.accum,
            blocks=self.source.shard if self.shuffle_scope == "shard" else None,
        )


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on the device without making the host wait: on CUDA the copy goes through
    page-locked memory (a pageable source would make the copy synchronous), and torch's
    pinned-memory cache keeps that buffer until the copy has run, then reuses it."""
    if device.type != "cuda":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)


def prefetch(batches, norm: Normalize):
    """Host (uint8 images, labels) batches -> device batches, on CUDA copied and normalised on a
    side stream one batch ahead, so the copy of batch k+1 overlaps the compute of batch k."""
    if norm.device.type != "cuda":
        yield from (norm(images, labels) for images, labels in batches)
        return
    side = torch.cuda.Stream(norm.device)
    ahead = None  # (batch, event recorded after its work on the side stream)
    for images, labels in batches:
        with torch.cuda.stream(side):
            ready = (norm(images, labels), torch.cuda.Event())
            ready[1].record(side)
        if ahead is not None:
            yield _handed_over(*ahead)
        ahead = ready
    if ahead is not None:
        yield _handed_over(*ahead)


def _handed_over(batch, done: torch.cuda.Event):
    """Make the compute stream wait for batch's copy (only that: the next batch's copy may
    already be queued behind it), and tell the caching allocator that the compute stream uses
    its memory, or it could be handed out again while compute still reads it."""
    compute = torch.cuda.current_stream(batch[0].device)
    compute.wait_event(done)
    for t in batch:
        t.record_stream(compute)
    return batch


class SideStream:
    """Where a backend's per-batch device work runs on CUDA: on a stream of its own, so that any
    wait for it (torchvision's geometric ops and decoders copy to the device synchronously, which
    makes the host wait for the stream they run on) covers only that work, never the training step
    queued on the compute stream. On other devices ``run`` just calls."""

    def __init__(self, device: torch.device, *epoch_inputs: torch.Tensor):
        self.stream = None
        if device.type != "cuda":
            return
        self.stream, self.compute = torch.cuda.Stream(device), torch.cuda.current_stream(device)
        self.stream.wait_stream(self.compute)  # e.g. an epoch's order and boxes, copied on the compute stream
        for t in epoch_inputs:
            t.record_stream(self.stream)

    def run(self, fn, *args):
        """fn(*args): a tensor or a tuple of tensors, ready for the compute stream to read."""
        if self.stream is None:
            return fn(*args)
        with torch.cuda.stream(self.stream):
            out = fn(*args)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.compute.wait_event(done)
        for t in out if isinstance(out, tuple) else (out,):
            t.record_stream(self.compute)  # made on the side stream, read on the compute stream
        return out


class Loader:
    """The protocol. Backends implement ``_batches()`` over ``self.sampler``'s current epoch."""

    def __init__(self, spec: Spec, num_samples: int):
        self.sampler = spec.sampler(num_samples)
        self.source = spec.source  # ``source.name(i)`` names sample i in messages and reports
        self.num_samples, self.device, self.norm, self.bad = num_samples, spec.device, spec.norm, spec.bad
        self.batch_aug = spec.batch_aug if spec.train else None
        self._size, self._sizes = spec.image_size, spec.sizes
        self._position = 0  # batches handed out since the start position

    def close(self) -> None:
        """End what the loader started (worker processes); the loader is not used after."""

    @property
    def bad_samples(self) -> int:
        """Samples left out so far on this process because they could not be decoded."""
        return self.bad.count

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    @property
    def image_size(self) -> int:
        """The crop size of the current epoch's images (--progressive-resize: a function of the
        epoch alone, so a resumed run continues at the size it stopped at)."""
        return self._sizes.size(self.epoch) if self._sizes is not None else self._size

    @property
    def position(self) -> int:
        """Samples of the current epoch's global order handed out so far, on all ranks
        (including those before the start position of a resumed run)."""
        return self.sampler.start_sample + self._position * self.sampler.global_batch

    def set_epoch(self, epoch: int, start_sample: int = 0) -> None:
        self.sampler.set_epoch(epoch, start_sample)
        self._position = 0

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        self._position = 0
        aug = self.batch_aug
        if aug is not None:
            aug.start_epoch(self.epoch, self.sampler.seeds(self.sampler.epoch_ids()))
        for batch in self._batches():
            if aug is not None:
                # A batch short of undecodable files takes the first seeds of its slice: still
                # the same draws on every backend and on resume, which drop the same files.
                first = self._position * self.sampler.batch_size
                batch = aug(*batch, self.sampler.batch_key(self._position), slice(first, first + len(batch[1])))
            self._position += 1
            yield batch

    def state_dict(self) -> dict:
        """Where this epoch stands: ``load_state_dict`` continues with the next sample of the
        epoch's order, the same samples and crops as an uninterrupted run."""
        return {"epoch": self.sampler.epoch, "sample": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.set_epoch(int(state["epoch"]), int(state["sample"]))

    def _batches(self):
        raise NotImplementedError


def all_bad(bad, size: int) -> RankError:
    """A batch of which nothing could be decoded cannot be skipped (every rank must step)."""
    first = bad[0][0] if bad else "?"
    return RankError(
        f"all {size} images of a batch are unreadable (first: {first}); "
        "check the data folder (python -m distres.prepare resize rewrites it and lists the bad files)"
    )
