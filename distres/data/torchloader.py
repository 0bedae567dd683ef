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

from distres.data import decode, isolate, transforms
from distres.data.base import Loader, SideStream, Spec, all_bad, prefetch, to_device
from distres.data.decode import DECODE_ERRORS, decode_torchvision, describe, jpeg_size
from distres.errors import UserError


def fit(img: torch.Tensor, size: int, train: bool, resize: int) -> torch.Tensor:
    """What happens to an image before the batch's crops: small training images and every
    evaluation image are brought to size x size (``resize_center_crop``); larger training images
    stay whole for their RandomResizedCrop box."""
    return transforms.resize_center_crop(img, size, resize) if not train or size <= transforms.SMALL_IMAGES else img


def assemble(images: list[torch.Tensor], seeds: np.ndarray, size: int, train: bool, policy, flip: bool) -> torch.Tensor:
    """Decoded uint8 CHW images, each already through ``fit`` (any one device) -> the batch,
    B x C x size x size: the training crops of their seeds (pad-crop-flip for small images,
    RandomResizedCrop + flip otherwise) and --auto-augment; evaluation images as they are. The
    workers call it on the CPU; with --decode-on device the training device does."""
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

    With ``encoded`` (--decode-on device) a worker only reads the batch's JPEGs and checks that
    each is whole, and hands them over as one byte tensor (one shared-memory transfer per batch,
    not one per image); decoding and cropping are left to the training device
    (``DeviceDecoder``). Other files, and JPEGs whose layout the check does not know, are
    decoded here all the same."""

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
            # fitted one by one: a worker holds one full-size image at a time, not a batch of them
            images.append(img if self.encoded else fit(img, size, self.train, self.resize))
            labels.append(label)
            seeds.append(seed)
            names.append(self.source.name(index))
        labels = torch.tensor(labels, dtype=torch.int64)
        seeds = np.array(seeds, dtype=np.uint64)
        if self.encoded:
            coded = b"".join(img for img in images if isinstance(img, bytes))
            lengths = [len(img) if isinstance(img, bytes) else 0 for img in images]
            decoded = [img for img in images if not isinstance(img, bytes)]
            return (
                torch.frombuffer(bytearray(coded) or bytearray(1), dtype=torch.uint8),
                labels,
                bad,
                (lengths, decoded, seeds, size, names),
            )
        if not images:
            return torch.empty(0, 3, size, size, dtype=torch.uint8), labels, bad
        return assemble(images, seeds, size, self.train, self.policy, self.flip), labels, bad

    def _read(self, index: int) -> tuple[bytes | torch.Tensor, int]:
        """A whole JPEG as its bytes; any other image decoded (CHW)."""
        data = self.source.read(index)  # a file's bytes or a shard member's, checked (``decode.read_checked``)
        if jpeg_size(data) is None:  # not a JPEG, or not one whose layout the check knows
            return self.source.load(index)  # (a damaged JPEG fails here, as in the workers' path)
        return data, int(self.source.labels[index])


class DeviceDecoder:
    """--decode-on device: a batch of JPEG bytes decoded in one call on the training device
    (torchvision's ``decode_jpeg``: nvJPEG on CUDA, libjpeg-turbo on a CPU device, where the
    pixels are the workers' own). An image the batched call rejects is retried alone, then with
    the workers' decoder (nvJPEG lacks some JPEG variants, e.g. CMYK), and only left out, as bad,
    when that fails too. Running out of device memory is not a bad image: it is raised."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, coded: list[torch.Tensor | None], decoded: list[torch.Tensor], names: list[str]):
        """``coded[k]``: image k's JPEG bytes, or None where ``decoded`` holds it (in order).
        Returns (the images on the device, the positions kept, [(name, why)] of the bad ones)."""
        rest = iter(decoded)
        out = {k: to_device(next(rest), self.device) for k, t in enumerate(coded) if t is None}
        jpegs = [k for k, t in enumerate(coded) if t is not None]
        bad = {}
        try:
            out.update(zip(jpegs, self._decode([coded[k] for k in jpegs])))
        except DECODE_ERRORS as batch_err:
            _raise_if_device_failed(batch_err)
            for k in jpegs:
                try:
                    out[k] = self._decode([coded[k]], after_failure=True)[0]
                except DECODE_ERRORS as one_err:
                    _raise_if_device_failed(one_err)
                    try:  # the workers' decoder, from the file
                        out[k] = to_device(decode_torchvision(names[k]), self.device)
                    except DECODE_ERRORS as cpu_err:
                        bad[k] = describe(cpu_err)
        kept = sorted(out)
        return [out[k] for k in kept], kept, [(names[k], why) for k, why in bad.items()]

    def _decode(self, data: list[torch.Tensor], after_failure: bool = False) -> list[torch.Tensor]:
        if not data:
            return []
        if self.device.type == "cuda":
            # torchvision's CUDA decoder allocates its outputs on the current stream but writes
            # them from a stream of its own that does not wait for ours: memory freed by the last
            # batch could be rewritten while our queued crops still read it. Let those finish
            # (after a failed call, everything: its writes may still be running).
            if after_failure:
                torch.cuda.synchronize(self.device)
            else:
                torch.cuda.current_stream(self.device).synchronize()
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)


def _raise_if_device_failed(err: BaseException) -> None:
    """torchvision rewraps the device's errors (out of memory, a CUDA fault) in the RuntimeError
    a bad file gives; those are not the file's fault and must not drop good images."""
    text = str(err)
    if isinstance(err, torch.OutOfMemoryError) or "out of memory" in text or "CUDA error" in text:
        raise err


class _SizedBatches:
    """The sampler's batches of (index, seed) from batch ``start`` of the pass on, each item
    with the current epoch's crop size."""

    def __init__(self, loader: Loader, start: int = 0):
        self.loader, self.start = loader, start

    def __len__(self) -> int:
        return max(0, len(self.loader.sampler) - self.start)

    def __iter__(self):
        size, sampler = self.loader.image_size, self.loader.sampler
        for ids in sampler.id_batches(self.start):
            yield [
                (index, seed, size)
                for index, seed in zip((ids % sampler.num_samples).tolist(), sampler.seeds(ids).tolist())
            ]


def _whole_batch(batch):
    return batch  # __getitems__ already returns the collated batch


class TorchLoader(Loader):
    def __init__(self, spec: Spec):
        super().__init__(spec, len(spec.source))
        if spec.decode_on_device and not hasattr(spec.source, "read"):  # (arrays, not encoded images)
            raise UserError(
                f"--decode-on device decodes image files, and {spec.source.name(0).split('[')[0]} "
                "comes as arrays already decoded; drop --decode-on device"
            )
        self.spec = spec
        self.loader = self._loader(0)

    def _loader(self, start: int) -> torch.utils.data.DataLoader:
        """A DataLoader over the current pass from batch ``start``, its workers forked with the
        files excluded so far."""
        spec, workers = self.spec, self.spec.workers
        self._excluded = len(decode.excluded())
        self._start = start
        return torch.utils.data.DataLoader(
            BatchDataset(spec.source, spec.train, spec.policy, spec.flip, spec.resize, spec.decode_on_device),
            batch_sampler=_SizedBatches(self, start),
            collate_fn=_whole_batch,
            pin_memory=spec.pin_memory,
            persistent_workers=workers > 0,
            **isolate.loader_options(workers),
            # The workers' seeds come from this generator, not from the global one: a loader
            # rebuilt after a crash leaves the training's random draws as they were.
            generator=torch.Generator().manual_seed(0),
        )

    def close(self) -> None:
        # (this loader and its DataLoader hold each other: without this, only the garbage
        # collector would end the workers, slowly: ``isolate.end_workers``)
        if self.loader is not None:
            isolate.end_workers(getattr(self.loader, "_iterator", None))
            self.loader = None

    def _pass(self):
        """The DataLoader's batches of this pass (``isolate.guarded``: a worker's crash costs the
        file that caused it)."""

        def make(k: int):
            if k or self._start or self._excluded != len(decode.excluded()):
                self.loader = None  # (the old workers end before new ones start)
                self.loader = self._loader(k)
            return self.loader

        def files_of(k: int) -> list[str]:
            batch = next(self.sampler.index_batches(k), None)
            return [] if batch is None else [self.source.name(int(i)) for i in batch]

        decoder = getattr(self.source, "decoder", decode_torchvision)
        return isolate.guarded(make, files_of, decoder, self.bad)

    def _batches(self):
        if self.spec.decode_on_device:
            yield from self._device_batches()
        else:
            yield from prefetch(self._host_batches(), self.norm)

    def _device_batches(self):
        spec, decode, side = self.spec, DeviceDecoder(self.device), SideStream(self.device)

        def batch(coded, labels, decoded, seeds, size, names):
            images, kept, bad = decode(coded, decoded, names)
            self.bad.report_all(bad)
            if not kept:
                raise all_bad(bad, len(coded))
            images = [fit(img, size, spec.train, spec.resize) for img in images]
            if len(kept) < len(coded):  # (indexing only then keeps the labels in pinned memory)
                seeds, labels = seeds[kept], labels[kept]
            return self.norm(assemble(images, seeds, size, spec.train, spec.policy, spec.flip), labels)

        for blob, labels, bad, (lengths, decoded, seeds, size, names) in self._pass():
            self.bad.report_all(bad)
            if not lengths:
                raise all_bad(bad, len(bad))
            sizes = [n for n in lengths if n]
            parts = iter(torch.split(blob[: sum(sizes)], sizes) if sizes else ())
            coded = [next(parts) if n else None for n in lengths]
            yield side.run(batch, coded, labels, decoded, seeds, size, names)

    def _host_batches(self):
        for images, labels, bad in self._pass():
            self.bad.report_all(bad)
            if len(labels) == 0:
                raise all_bad(bad, len(bad))
            yield images, labels
