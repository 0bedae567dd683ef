"""The ``gpu`` backend: the whole (small) data set as one uint8 tensor on the training device.

CIFAR-10's 50,000 training images are 150 MB as uint8 N x H x W x C, a rounding error on a
GPU. They are decoded once at start-up; afterwards a training batch is one gather from that
tensor that does the pad-crop and the flip of every image at once, with no worker processes
and no host-to-device image traffic. The crops are ``transforms.pad_crop_boxes``
of each sample's seed, the same as the torch backend's, and the gather reads its output in
N x H x W x C order, which is channels_last without a copy. The same code runs on a CPU device.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from distres.data import isolate, transforms
from distres.data.base import Loader, SideStream, Spec, to_device
from distres.data.decode import DECODE_ERRORS, describe
from distres.data.sources import ArraySource
from distres.errors import UserError

MEMORY_SHARE = 0.5  # of the device's free memory the data set may take; the model needs the rest


def _check_fits(n: int, size: int, device: torch.device) -> None:
    need = n * 3 * size * size
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > MEMORY_SHARE * free:
        raise UserError(
            f"--data-backend gpu would hold {n} images of {size}x{size} px ({need / 2**30:.1f} GiB) "
            f"on {device.type}, more than half of its {free / 2**30:.1f} GiB free; "
            "use --data-backend torch or dali, or a smaller --image-size"
        )


def load_all(source, size: int, bad, workers: int, resize: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Every image of source at size x size (``resize_center_crop``), as N x H x W x C uint8
    on the CPU, and the labels; undecodable files are left out (and reported)."""
    if isinstance(source, ArraySource):
        if tuple(source.images.shape[-2:]) == (size, size) and transforms.eval_size(size, resize) == size:
            return source.images.permute(0, 2, 3, 1).contiguous(), source.labels
        # Decoding releases the GIL, so threads keep all the cores busy without pickling images.
        with ThreadPoolExecutor(max(1, workers)) as pool:
            results = list(pool.map(_Fitted(source, size, resize), range(len(source)), chunksize=256))
    else:
        results = _decode_files(source, size, bad, workers, resize)
    keep = [i for i, (img, _) in enumerate(results) if img is not None]
    bad.report_all([b for _, b in results if b is not None])
    if not keep:
        raise UserError(f"none of the {len(source)} images could be decoded; check --data-dir")
    images = torch.stack([results[i][0] for i in keep])
    return images, source.labels[torch.tensor(keep)]


class _Fitted(torch.utils.data.Dataset):
    """Image i at size x size (HWC), or None and why it could not be decoded."""

    def __init__(self, source, size: int, resize: int):
        self.source, self.size, self.resize = source, size, resize

    def __call__(self, i: int):
        try:
            img, _ = self.source.load(i)
        except DECODE_ERRORS as e:
            return None, (self.source.name(i), describe(e))
        return transforms.resize_center_crop(img, self.size, self.resize).permute(1, 2, 0), None

    def __getitems__(self, index: list[int]):
        return [self(i) for i in index]


def _decode_files(source, size: int, bad, workers: int, resize: int) -> list:
    """``_Fitted`` of each image file, decoded in worker processes: a file that crashes its
    decoder costs that file (``isolate.guarded``), not the run."""
    chunks = [list(range(s, min(s + CHUNK, len(source)))) for s in range(0, len(source), CHUNK)]

    def make(k: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            _Fitted(source, size, resize),
            batch_sampler=chunks[k:],
            collate_fn=_as_is,
            **isolate.loader_options(max(1, workers)),
            generator=torch.Generator().manual_seed(0),  # (no draw from the global RNG: the model's init follows)
        )

    def files_of(k: int) -> list[str]:
        return [source.name(i) for i in chunks[k]] if k < len(chunks) else []

    return [r for part in isolate.guarded(make, files_of, source.decoder, bad) for r in part]


def _as_is(batch):
    return batch


CHUNK = 64  # images per worker call


class GpuLoader(Loader):
    def __init__(self, spec: Spec):
        largest = max([spec.image_size] + ([spec.sizes.start, spec.sizes.end] if spec.sizes else []))
        if largest > transforms.SMALL_IMAGES:
            raise UserError(
                f"--data-backend gpu is for small images (<= {transforms.SMALL_IMAGES} px, "
                f"pad-crop-flip augmentation); for --image-size {largest} use --data-backend torch or dali"
            )
        self.spec, self.train, self.flip, self.policy = spec, spec.train, spec.flip, spec.policy
        self.size = 0  # the size the images are stored at (``_store``)
        self._store(spec.image_size)
        super().__init__(spec, len(self.labels))

    def _store(self, size: int) -> None:
        """Hold every image at size x size on the device (again when --progressive-resize
        changes the size: a few times per run, each a pass over the data set)."""
        spec = self.spec
        # Training images are stored with their zero border already added (CIFAR: 40 x 40, 240 MB
        # instead of 150), so that a batch is a single gather with no padding kernel.
        self.pad = transforms.pad_for(size) if spec.train else 0
        self.images = None  # (the old size's tensor is freed before the new one is made)
        _check_fits(len(spec.source), size + 2 * self.pad, spec.device)
        images, labels = load_all(spec.source, size, spec.bad if not self.size else _Quiet(), spec.cpus, spec.resize)
        self.images = transforms.pad_nhwc(images, self.pad).to(spec.device)  # N x H x W x C
        self.labels = labels.to(spec.device)
        self.size = size

    def _batches(self):
        if self.image_size != self.size:
            self._store(self.image_size)
        # The epoch's order and crop boxes go to the device in one copy per epoch; each batch is
        # then a slice and a gather there, with nothing for the host to wait for.
        ids = self.sampler.epoch_ids()
        index = to_device(torch.from_numpy(ids % self.num_samples), self.device)
        if self.train:
            seeds = self.sampler.seeds(ids)
            crops = to_device(
                transforms.pad_crop_params(transforms.pad_crop_boxes(seeds, self.size, self.pad, self.flip)),
                self.device,
            )
            side = SideStream(self.device, index, crops) if self.policy.active else None
        for part in self.sampler.batch_slices():
            i = index[part]
            if self.train and side is not None:
                images = side.run(self._augmented, i, crops[:, part], seeds[part])
            elif self.train:
                images = transforms.gather_pad_crops(self.images, i, crops[:, part], self.size, self.pad)
            else:
                images = self.images[i]
            yield self.norm(images.permute(0, 3, 1, 2), self.labels[i])

    def _augmented(self, i: torch.Tensor, crops: torch.Tensor, seeds) -> torch.Tensor:
        """The pad-crops, then --auto-augment: the torch backend's per-sample ops, looped over
        the batch on the device."""
        images = transforms.gather_pad_crops(self.images, i, crops, self.size, self.pad)
        return self.policy.apply_batch(images.permute(0, 3, 1, 2), seeds).permute(0, 2, 3, 1)


class _Quiet:
    """Bad files were reported when the data set was first stored; storing it again at another
    size finds the same ones."""

    def report_all(self, bad) -> None:
        pass

    def crashed(self, name: str, why: str) -> None:
        pass
