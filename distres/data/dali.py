"""The ``dali`` backend: NVIDIA DALI decodes, crops and normalises (optional extra:
``pip install -e '.[dali]'``).

With a GPU, the decoders (``fn.decoders.image``, and its region-of-interest form
``fn.decoders.image_slice``) run on ``"mixed"`` (nvJPEG, the hardware decoder where the GPU has
one) and every later stage on the GPU; without one the same pipeline runs on the CPU with
``device_id=None``, which is how the tests run it. Training: each sample's box from
``transforms`` (RandomResizedCrop: only the box is decoded, then ``fn.resize``; small images:
resize and centre crop as in evaluation, then the pad-crop via ``fn.slice``), flip and
normalisation in ``fn.crop_mirror_normalize``, straight into NHWC for channels_last.
Evaluation: ``fn.resize`` to torchvision's sizes, centre crop with ``fn.slice``.

Why an external source instead of ``fn.readers.file(shard_id=, num_shards=, random_shuffle=)``:
DALI's reader shuffles with its own buffer and its augmentation ops draw from per-pipeline
generators, so neither the order nor the crops can be restarted at a given batch. Here the
host feeds DALI this rank's files in the ``ShardSampler``'s order together with each sample's
box and flip, so the order, the crops, the per-rank sharding and the exact evaluation counts
(the last batch is simply shorter: DALI takes variable batch sizes) are those of the other
backends, and a resumed run continues at the batch it stopped at. It costs the host a file
read and a JPEG header walk per image (``benchmarks/results/loaders-cpu.md`` compares it with
``fn.readers.file`` and ``fn.random_resized_crop``).
"""

from __future__ import annotations

import functools
import gc
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from distres.data import decode, isolate, transforms
from distres.data.base import Loader, Spec, all_bad
from distres.data.decode import DECODE_ERRORS, describe, image_size
from distres.data.sharding import sample_seeds
from distres.errors import UserError


def import_dali():
    try:
        from nvidia import dali  # noqa: F401
        from nvidia.dali import fn, types
    except ImportError:
        raise UserError(
            "--data-backend dali needs NVIDIA DALI, which is not installed; "
            "pip install -e '.[dali]' (or use --data-backend torch)"
        ) from None
    _freeze_in_forked_children()
    return dali.Pipeline, fn, types


@functools.cache
def _freeze_in_forked_children() -> None:
    """Once per process: a forked child (a DataLoader worker, an isolation probe) never collects
    the objects it inherits. A DALI pipeline left in a reference cycle here would otherwise be
    collected in the child, whose ``Pipeline.__del__`` waits for DALI threads that a fork does not
    copy: the worker hangs, and with it the loader that forked it (autotune's trials, say, run
    the dali backend and then another in one process)."""
    os.register_at_fork(after_in_child=gc.freeze)


class _Feed:
    """DALI's external source: file bytes, labels and (training) each sample's box and flip,
    one batch per call, for the current pass over the epoch (``restart``). A thread prepares
    the next batches ahead (file reads, JPEG header walks, boxes), off the training thread
    that calls ``pipe.run()``."""

    AHEAD = 2  # batches prepared ahead: DALI's own prefetch queue takes two at a time

    def __init__(self, loader: DaliLoader):
        self.loader = loader
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="distres-dali-feed")
        self.pending: deque = deque()
        self.files: dict[int, list[int]] = {}  # batch number -> the samples it fed
        self.bad: dict[int, list[tuple[str, str]]] = {}
        self.numbers = self.indices = iter(())  # nothing to feed before the first restart()
        self.epoch = 0

    def restart(self, start: int) -> None:
        """Feed this epoch's batches from ``start`` on (the sampler's epoch and order)."""
        for fut in self.pending:
            fut.cancel()
        self.pending.clear()
        self.files.clear()
        self.bad.clear()
        ld = self.loader
        self.numbers = iter(range(start, ld.sampler.num_batches()))
        self.indices = ld.sampler.id_batches(start)
        self.epoch = ld.sampler.epoch
        for _ in range(self.AHEAD):
            self._submit()

    def _submit(self) -> None:
        idx = next(self.indices, None)
        if idx is not None:
            self.pending.append(self.pool.submit(self._prepare, next(self.numbers), idx, self.epoch))

    def __call__(self):
        if not self.pending:
            raise StopIteration  # ends DALI's epoch
        k, out, files, bad = self.pending.popleft().result()
        self._submit()
        self.files[k], self.bad[k] = files, bad
        return out

    def _prepare(self, k: int, ids, epoch: int):
        ld = self.loader
        read = []  # (draw id, sample, its bytes, (height, width), why it is bad)
        for d in ids.tolist():
            i, data, hw = d % ld.num_samples, None, None
            reason = ld.known_bad.get(i)
            if reason is None:
                try:
                    data = ld.source.read(i)  # a file's bytes, or a shard member's
                    hw = image_size(data)
                    reason = None if hw else "not a complete image file"
                except DECODE_ERRORS as e:
                    reason = describe(e)
            read.append((d, i, data, hw, reason))
        ld.vet([i for _, i, data, _, reason in read if reason is None and data[:2] != decode.JPEG_MAGIC])
        datas, kept, sizes, bad = [], [], [], []  # kept: draw ids
        for d, i, data, hw, reason in read:
            reason = reason or ld.known_bad.get(i)
            if reason is not None:
                bad.append((ld.source.name(i), reason))
                continue
            datas.append(np.frombuffer(data, dtype=np.uint8))
            kept.append(d)
            sizes.append(hw)
        if not datas:
            raise all_bad(bad, len(ids))
        kept, sizes = np.array(kept), np.array(sizes)
        index = kept % ld.num_samples
        out = [datas, ld.source.labels[index].numpy()]
        if not ld.random_resized_crop:
            resized, anchor = transforms.fit_geometry(sizes, ld.size, ld.resize)
            out += [resized.astype(np.float32), anchor.astype(np.int32)]
        if ld.train:
            boxes = transforms.train_boxes(sample_seeds(ld.sampler.seed, epoch, kept), sizes, ld.size, ld.flip)
            out += [
                np.stack([boxes.top, boxes.left], 1).astype(np.int32),
                np.stack([boxes.height, boxes.width], 1).astype(np.int32),
                boxes.flip.astype(np.int32),
            ]
        return k, out, index.tolist(), bad


class DaliLoader(Loader):
    def __init__(self, spec: Spec):
        self.Pipeline, self.fn, self.types = import_dali()
        if not hasattr(spec.source, "read"):  # (arrays, not encoded images)
            raise UserError(
                "--data-backend dali reads image files or shards; write them with "
                "`python -m distres.prepare cifar10 SRC DST` (or `shards SRC DST`) and pass --data-dir DST"
            )
        if spec.sizes is not None:
            raise UserError(
                "--progressive-resize works with --data-backend torch, gpu or synthetic: the dali "
                "pipeline is built for one image size"
            )
        super().__init__(spec, len(spec.source))
        self.train, self.size, self.flip, self.resize = spec.train, spec.image_size, spec.flip, spec.resize
        self.batch_size, self.threads = spec.batch_size, max(1, spec.workers)
        self.hwc = spec.norm.memory_format == torch.channels_last
        self.random_resized_crop = self.train and self.size > transforms.SMALL_IMAGES
        self.known_bad: dict[int, str] = {}  # samples DALI failed on, found by re-decoding them
        self.vetted: set[int] = set()  # samples other than JPEGs decoded once in a throw-away process (``vet``)
        self.feed = _Feed(self)
        self._pipe, self._pass_done = None, False

    def _pipeline(self):
        fn, types = self.fn, self.types
        gpu = self.device.type == "cuda"
        pipe = self.Pipeline(
            batch_size=self.batch_size, num_threads=self.threads, device_id=self._device_id(), prefetch_queue_depth=2
        )
        size = [self.size, self.size]
        outputs = 2 + 2 * (not self.random_resized_crop) + 3 * self.train
        with pipe:
            jpegs, labels, *geometry = fn.external_source(source=self.feed, num_outputs=outputs, batch=True)
            decoder = {"device": "mixed" if gpu else "cpu", "output_type": types.RGB}
            mirror = geometry[-1] if self.train else 0
            if self.random_resized_crop:
                # Decode only the box (libjpeg-turbo and nvJPEG skip the rest: the boxes average
                # half the image), then resize it to size x size.
                images = fn.decoders.image_slice(
                    jpegs,
                    geometry[0],
                    geometry[1],
                    axis_names="HW",
                    normalized_anchor=False,
                    normalized_shape=False,
                    **decoder,
                )
                images = fn.resize(images, size=size, antialias=True)
            else:  # resize_center_crop, with torchvision's sizes and rounding from the host
                images = fn.decoders.image(jpegs, **decoder)
                resized, anchor = geometry[:2]
                images = fn.resize(images, size=resized, antialias=True)
                images = fn.slice(images, start=anchor, shape=size, axis_names="HW")
                if self.train:  # then the small-image pad-crop box, zero outside the image
                    images = fn.slice(
                        images,
                        start=geometry[2],
                        shape=geometry[3],
                        axis_names="HW",
                        out_of_bounds_policy="pad",
                        fill_values=0,
                    )
            images = fn.crop_mirror_normalize(
                images,
                mirror=mirror,
                mean=self.norm.mean_255,
                std=self.norm.std_255,
                dtype=types.FLOAT,
                output_layout="HWC" if self.hwc else "CHW",
            )
            # On the GPU the labels go with the images: no host-to-device copy per batch.
            pipe.set_outputs(images, labels.gpu() if gpu else labels)
        pipe.build()
        return pipe

    def close(self) -> None:
        self._pipe = None  # freed now, in this process, not left as garbage that a fork copies

    def _start_pass(self, start: int):
        """The pipeline for a pass from batch ``start``: the loader's one pipeline, reset for the
        new pass, when its last pass ran to the end; else a new one (one that stopped halfway
        still holds batches it prefetched for that pass)."""
        pipe, self._pipe = self._pipe, None
        if pipe is not None and self._pass_done:
            try:
                pipe.run()  # past its last batch: StopIteration, DALI's end of epoch
                pipe = None  # it had more batches than fed: not reusable
            except StopIteration:
                pass
        else:
            pipe = None
        self.feed.restart(start)
        if pipe is None:
            pipe = self._pipeline()
        else:
            pipe.reset()
        self._pipe, self._pass_done = pipe, False
        return pipe

    def _batches(self):
        k, n = 0, self.sampler.num_batches()
        while k < n:
            pipe = self._start_pass(k)
            for k in range(k, n):  # noqa: B020 (k continues after a rebuilt pipeline)
                try:
                    images, labels = pipe.run()
                except RuntimeError:
                    # A file whose header looked fine failed to decode: find it, then build a
                    # new pipeline and feed this batch again without it.
                    self._pipe = None
                    if not self._find_bad(self.feed.files[k]):
                        raise
                    break
                self.bad.report_all(self.feed.bad.pop(k))
                self.feed.files.pop(k)
                self._pass_done = k == n - 1
                yield to_torch(images, labels, self.device, self.hwc)
            else:
                return

    def _device_id(self) -> int | None:
        """The pipelines' device_id; None: DALI's CPU-only mode, no CUDA needed."""
        if self.device.type != "cuda":
            return None
        return self.device.index if self.device.index is not None else torch.cuda.current_device()

    def vet(self, samples: list[int]) -> None:
        """Decode the samples that are not JPEGs (by their bytes: shard members have no file
        name) once, in a throw-away process, before DALI meets them: its PNG decoder (libpng)
        dies on some damaged files instead of failing, and a crash in DALI's threads would end
        the run. (JPEGs are left to DALI's own error handling: ``_find_bad``.) Called by the
        feed's thread."""
        new = [i for i in samples if i not in self.vetted and i not in self.known_bad]
        if new:
            self._found(isolate.probe(new, self.source.load))
            self.vetted.update(new)

    def _found(self, found: dict[int, str]) -> None:
        for i, why in found.items():
            if why.startswith(isolate.CRASHED):
                name = self.source.name(i)
                self.bad.crashed(name, why)
                decode.exclude(name, f"{decode.EXCLUDED}: {why}")
            self.known_bad[i] = why

    def _find_bad(self, samples: list[int]) -> bool:
        """The samples of a failed batch that the workers' decoder rejects, each decoded in a
        throw-away process (``isolate.probe``: such a file may crash it); when it reads them all,
        those that DALI's decoder rejects alone."""
        found = isolate.probe(samples, self.source.load)
        if not found:
            found = {i: why for i in samples if (why := self._rejects(i)) is not None}
        self._found(found)
        return bool(found)

    def _rejects(self, i: int) -> str | None:
        """Why DALI's decoder fails on this sample alone (None: it decodes it)."""
        data = [np.frombuffer(self.source.read(i), dtype=np.uint8)]
        pipe = self.Pipeline(batch_size=1, num_threads=1, device_id=self._device_id(), prefetch_queue_depth=1)
        with pipe:
            coded = self.fn.external_source(source=lambda: data, batch=True)
            device = "mixed" if self.device.type == "cuda" else "cpu"
            pipe.set_outputs(self.fn.decoders.image(coded, device=device, output_type=self.types.RGB))
        pipe.build()
        try:
            pipe.run()
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            return f"DALI cannot decode it ({lines[-1][:120] if lines else 'no reason given'})"
        return None


def to_torch(images, labels, device: torch.device, hwc: bool):
    """A DALI pipeline's (images, labels) outputs as torch tensors on the device: a copy, since
    DALI reuses its output buffers (on CUDA a device-to-device copy on the current stream);
    NHWC output becomes an N x C x H x W view with channels_last strides."""
    from nvidia.dali.plugin.pytorch import feed_ndarray

    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    t = images.as_tensor()
    out = torch.empty(t.shape(), dtype=torch.float32, device=device)
    feed_ndarray(t, out, cuda_stream=stream)
    if hwc:
        out = out.permute(0, 3, 1, 2)
    if device.type == "cuda":
        lt = labels.as_tensor()
        ids = torch.empty(lt.shape(), dtype=torch.int64, device=device)
        feed_ndarray(lt, ids, cuda_stream=stream)
        return out, ids.reshape(-1)
    return out, torch.from_numpy(np.array(labels.as_tensor())).reshape(-1).long()
