"""The ``torch`` backend: a DataLoader whose worker processes decode and crop whole batches.

Tuned for throughput on any machine: workers decode to uint8 (a quarter of float32's bytes
through shared memory); batches are pinned and, on CUDA, copied one batch ahead on a side
stream (``base.prefetch``); the conversion to float and the normalisation run on the device.
Workers stay alive across epochs (persistent_workers) and keep 4 batches each in flight; their
number comes from the CPUs this process may use (``default_workers``). The decoder is
torchvision.io's (``decode.py`` says why).

``--decode-on device`` moves the JPEG decoding and the crops to the training device: the workers
read and check the files, the device decodes each batch in one ``decode_jpeg`` call (nvJPEG on
CUDA) and crops it there, on a side stream. For many cores per GPU the workers are the cheaper
path; when they cannot keep up with the GPU, this one frees them. Either way the samples, their
crops and the resume position are the sampler's and ``transforms``' own, as in every backend.
"""

from __future__ import annotations

import numpy as np
import torch

from torchvision.io import ImageReadMode, decode_jpeg

from distres.data import transforms
from distres.data.decode import DECODE_ERRORS, JPEG_MAGIC, decode_torchvision, describe, jpeg_size, read_bytes
from distres.data.base import Loader, SideStream, Spec, all_bad, prefetch, to_device
from distres.errors import UserError


def assemble(images: list[torch.Tensor], seeds: np.ndarray, size: int, train: bool, policy, flip: bool,
             resize: int) -> torch.Tensor:
    """Decoded uint8 CHW images (any sizes, any one device) -> the batch, B x C x size x size:
    the training crops of their seeds (pad-crop-flip for small images, RandomResizedCrop + flip
    otherwise) and --auto-augment, or the evaluation resize + centre crop. The workers call it
    on the CPU; with --decode-on device the training device does, on what it decoded."""
    if not train or size <= transforms.SMALL_IMAGES:
        images = [transforms.resize_center_crop(img, size, resize) for img in images]
    if not train:
        return torch.stack(images)
    if size <= transforms.SMALL_IMAGES:  # the whole batch's pad-crops in one gather
        pad = transforms.pad_for(size)
        boxes = transforms.pad_crop_boxes(seeds, size, pad, flip)
        padded = transforms.pad_nhwc(torch.stack(images).permute(0, 2, 3, 1), pad)
        index = torch.arange(len(images), device=padded.device)
        params = to_device(transforms.pad_crop_params(boxes), padded.device)
        batch = transforms.gather_pad_crops(padded, index, params, size, pad).permute(0, 3, 1, 2)
    else:
        boxes = transforms.rrc_boxes(seeds, [img.shape[-2] for img in images], [img.shape[-1] for img in images], flip)
        batch = torch.stack([transforms.resized_crop_flip(img, boxes[k], size) for k, img in enumerate(images)])
    return policy.apply_batch(batch, seeds)


class BatchDataset(torch.utils.data.Dataset):
    """Decodes and augments one whole batch per worker call (``__getitems__``): the crop boxes
    of the batch come from one vectorised draw, and an undecodable file is left out of its
    batch and reported back, instead of killing the worker. Each item is (index, seed, crop
    size): the workers persist across epochs, and the size may change between them.

    With ``encoded`` (--decode-on device) a worker only reads each JPEG's bytes and checks that
    the file is whole; decoding and cropping are left to the training device (``DeviceDecoder``).
    Files in other formats are decoded here all the same."""

    def __init__(self, source, train: bool, policy, flip: bool = True, resize: int = 0, encoded: bool = False):
        self.source, self.train, self.policy, self.flip, self.resize = source, train, policy, flip, resize
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.source)

    def __getitems__(self, items: list[tuple[int, int, int]]):
        images, labels, seeds, bad, names = [], [], [], [], []
        size = items[0][2]
        for index, seed, _ in items:
            try:
                img, label = self._read(index) if self.encoded else self.source.load(index)
            except DECODE_ERRORS as e:
                bad.append((self.source.name(index), describe(e)))
                continue
            images.append(img)
            labels.append(label)
            seeds.append(seed)
            names.append(self.source.name(index))
        labels = torch.tensor(labels, dtype=torch.int64)
        seeds = np.array(seeds, dtype=np.uint64)
        if self.encoded:
            return images, labels, bad, (seeds, size, names)
        if not images:
            return torch.empty(0, 3, size, size, dtype=torch.uint8), labels, bad
        return assemble(images, seeds, size, self.train, self.policy, self.flip, self.resize), labels, bad

    def _read(self, index: int) -> tuple[torch.Tensor, int]:
        """A JPEG as its bytes (a 1-D uint8 tensor), any other image decoded (CHW)."""
        path = self.source.name(index)
        data = read_bytes(path)
        if data[:2] != JPEG_MAGIC:
            return self.source.load(index)
        if jpeg_size(data) is None:
            raise ValueError("not a whole JPEG (truncated or damaged header)")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(self.source.labels[index])


class DeviceDecoder:
    """--decode-on device: a batch of JPEG bytes decoded in one call on the training device
    (torchvision's ``decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on a CPU device, where the
    pixels are the workers' own), then cropped there by ``assemble``. An image the batched
    call rejects is retried alone, then on the CPU (nvJPEG lacks some JPEG variants, e.g. CMYK),
    and only left out, as bad, when the CPU cannot decode it either."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, items: list[torch.Tensor], names) -> tuple[list[torch.Tensor], list[int], list]:
        """(decoded images on the device, the positions kept, [(name, why)] of the bad ones)."""
        coded = [k for k, t in enumerate(items) if t.dim() == 1]
        out = {k: to_device(t, self.device) for k, t in enumerate(items) if t.dim() != 1}
        bad = {}
        try:
            out.update(zip(coded, self._decode([items[k] for k in coded])))
        except DECODE_ERRORS:
            for k in coded:
                try:
                    out[k] = self._decode([items[k]])[0]
                except DECODE_ERRORS as e:
                    try:  # the workers' decoder, from the file
                        out[k] = to_device(decode_torchvision(names[k]), self.device)
                    except DECODE_ERRORS:
                        bad[k] = describe(e)
        kept = [k for k in range(len(items)) if k in out]
        return [out[k] for k in kept], kept, [(names[k], why) for k, why in bad.items()]

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor]:
        if not data:
            return []
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)


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
        if spec.decode_on_device and not hasattr(spec.source, "paths"):
            raise UserError(f"--decode-on device decodes image files, and {spec.source.name(0).split('[')[0]} "
                            "comes as arrays already decoded; drop --decode-on device")
        self.spec, workers = spec, spec.workers
        self.loader = torch.utils.data.DataLoader(
            BatchDataset(spec.source, spec.train, spec.policy, spec.flip, spec.resize, spec.decode_on_device),
            batch_sampler=_SizedBatches(self),
            collate_fn=_whole_batch, num_workers=workers, pin_memory=spec.pin_memory,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
        )

    def _batches(self):
        if self.spec.decode_on_device:
            yield from self._device_batches()
        else:
            yield from prefetch(self._host_batches(), self.norm)

    def _device_batches(self):
        spec, decode, side = self.spec, DeviceDecoder(self.device), SideStream(self.device)

        def batch(items, labels, seeds, size, names):
            images, kept, bad = decode(items, names)
            self.bad.report_all(bad)
            if not kept:
                raise all_bad(bad, len(items))
            if len(kept) < len(items):  # (indexing only then keeps the labels in pinned memory)
                seeds, labels = seeds[kept], labels[kept]
            return self.norm(assemble(images, seeds, size, spec.train, spec.policy, spec.flip, spec.resize), labels)

        for items, labels, bad, (seeds, size, names) in self.loader:
            self.bad.report_all(bad)
            if not items:
                raise all_bad(bad, len(bad))
            yield side.run(batch, items, labels, seeds, size, names)

    def _host_batches(self):
        for images, labels, bad in self.loader:
            self.bad.report_all(bad)
            if len(labels) == 0:
                raise all_bad(bad, len(bad))
            yield images, labels
