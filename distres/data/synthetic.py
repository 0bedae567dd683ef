"""Learnable random data made on the device: no I/O and no decode, for throughput runs and tests."""

from __future__ import annotations

import torch

from distres.data.base import Loader, Spec, to_device


class SyntheticSource:
    """A pool of images, each a noisy copy of its class's template, cycled by index."""

    def __init__(
        self,
        num_samples: int,
        num_classes: int,
        image_size: int,
        seed: int,
        split: int,
        device: torch.device,
        pool: int = 256,
    ):
        # The class templates depend on the seed alone, so train and val share them.
        templates = torch.randint(
            0, 256, (num_classes, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
        )
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

    def name(self, i: int) -> str:
        return f"synthetic[{i}]"


class SyntheticLoader(Loader):
    def __init__(self, spec: Spec):
        super().__init__(spec, len(spec.source))

    def _batches(self):
        src = self.source
        # One copy of the epoch's order per epoch, then device-side slices: no per-step host wait.
        pool_index = to_device(torch.from_numpy(self.sampler.epoch_indices() % len(src.labels)), self.device)
        size = self.image_size  # (--progressive-resize: the pool is made at the final size)
        for part in self.sampler.batch_slices():
            i = pool_index[part]
            images = src.images[i]
            if images.shape[-1] != size:
                images = torch.nn.functional.interpolate(images.float(), size=size, mode="bilinear", antialias=True)
                images = images.round_().clamp_(0, 255).to(torch.uint8)
            yield self.norm(images, src.labels[i])
