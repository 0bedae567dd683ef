"""The ``torch`` backend: a DataLoader whose worker processes decode and crop whole batches.

Tuned for throughput on any machine: workers decode to uint8 (a quarter of float32's bytes
through shared memory); batches are pinned and, on CUDA, copied one batch ahead on a side
stream (``base.prefetch``); the conversion to float and the normalisation run on the device.
Workers stay alive across epochs (persistent_workers) and keep 4 batches each in flight; their
number comes from the CPUs this process may use (``default_workers``). The decoder is
torchvision.io's (``decode.py`` says why).
"""

from __future__ import annotations

import numpy as np
import torch

from distres.data import transforms
from distres.data.decode import DECODE_ERRORS, describe
from distres.data.base import Loader, Spec, all_bad, prefetch


class BatchDataset(torch.utils.data.Dataset):
    """Decodes and augments one whole batch per worker call (``__getitems__``): the crop boxes
    of the batch come from one vectorised draw, and an undecodable file is left out of its
    batch and reported back, instead of killing the worker. Each item is (index, seed, crop
    size): the workers persist across epochs, and the size may change between them."""

    def __init__(self, source, train: bool, policy, flip: bool = True, resize: int = 0):
        self.source, self.train, self.policy, self.flip, self.resize = source, train, policy, flip, resize

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, items: list[tuple[int, int, int]]):
        images, labels, seeds, bad = [], [], [], []
        size = items[0][2]
        fit_first = size <= transforms.SMALL_IMAGES or not self.train
        for index, seed, _ in items:
            try:
                img, label = self.source.load(index)
            except DECODE_ERRORS as e:
                bad.append((self.source.name(index), describe(e)))
                continue
            images.append(transforms.resize_center_crop(img, size, self.resize) if fit_first else img)
            labels.append(label)
            seeds.append(seed)
        labels = torch.tensor(labels, dtype=torch.int64)
        if not images:
            return torch.empty(0, 3, size, size, dtype=torch.uint8), labels, bad
        seeds = np.array(seeds, dtype=np.uint64)
        if not self.train:
            batch = torch.stack(images)
        elif size <= transforms.SMALL_IMAGES:  # the whole batch's pad-crops in one gather
            pad = transforms.pad_for(size)
            boxes = transforms.pad_crop_boxes(seeds, size, pad, self.flip)
            padded = transforms.pad_nhwc(torch.stack(images).permute(0, 2, 3, 1), pad)
            batch = transforms.gather_pad_crops(padded, torch.arange(len(images)), transforms.pad_crop_params(boxes),
                                                size, pad).permute(0, 3, 1, 2)
        else:
            boxes = transforms.rrc_boxes(seeds, [img.shape[-2] for img in images], [img.shape[-1] for img in images],
                                         self.flip)
            batch = torch.stack([transforms.resized_crop_flip(img, boxes[k], size) for k, img in enumerate(images)])
        if self.train:
            batch = self.policy.apply_batch(batch, seeds)
        return batch, labels, bad


class _SizedBatches:
    """The sampler's batches of (index, seed), each item with the current epoch's crop size."""

    def __init__(self, loader: Loader):
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader.sampler)

    def __iter__(self):
        size = self.loader.image_size
        for batch in self.loader.sampler:
            yield [(index, seed, size) for index, seed in batch]


def _whole_batch(batch):
    return batch  # __getitems__ already returns the collated batch


class TorchLoader(Loader):
    def __init__(self, spec: Spec):
        super().__init__(spec, len(spec.source))
        workers = spec.workers
        self.loader = torch.utils.data.DataLoader(
            BatchDataset(spec.source, spec.train, spec.policy, spec.flip, spec.resize),
            batch_sampler=_SizedBatches(self),
            collate_fn=_whole_batch, num_workers=workers, pin_memory=spec.pin_memory,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )

    def _batches(self):
        yield from prefetch(self._host_batches(), self.norm)

    def _host_batches(self):
        for images, labels, bad in self.loader:
            self.bad.report_all(bad)
            if len(labels) == 0:
                raise all_bad(bad, len(bad))
            yield images, labels
