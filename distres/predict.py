"""Classify image files with a trained model: a CSV with one row per image.

    python -m distres.predict --checkpoint runs/x/checkpoints/best.pt photos/ more/img.jpg --output preds.csv

INPUTs are image files, folders (searched recursively) or shard sets (``python -m distres.prepare
shards``: a folder or URL holding its manifest; each sample is named SHARD.tar:KEY). Videos:
extract their frames first (``python -m distres.prepare video SRC DST --fps 2``) and pass the
frame folder. Images are decoded by DataLoader workers and scored in batches, on the GPU when
there is one, with the validation preprocessing of the model's training run. A file that cannot
be read, that declares more than --max-image-pixels pixels or that crashes the decoder
(``data/isolate.py``) is listed and counted, and the rest go on.
"""

from __future__ import annotations

import csv
import os
import sys

import torch

from distres import dist, inference
from distres.config import AMP
from distres.data import decode, isolate
from distres.data import shardformat as fmt
from distres.data.decode import DECODE_ERRORS, describe
from distres.data.formats import IMAGE_EXTENSIONS
from distres.data.remote import is_url, open_store
from distres.data.shards import ShardSource, read_manifest
from distres.engine import Precision
from distres.errors import ArgumentParser, UserError, console, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m distres.predict",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders of them, or shard sets")
    p.add_argument("--split", choices=("all", "train", "val"), default="all", help="which samples of a shard set")
    p.add_argument("--checkpoint", required=True, help="a distres checkpoint or .safetensors export")
    p.add_argument("--weights", choices=inference.WEIGHT_CHOICES, default="auto", help=inference.WEIGHTS_HELP)
    p.add_number("--top-k", int, 5, "classes listed per image (at most the class count)", at_least=1)
    p.add_argument("--output", default="predictions.csv", help="the CSV to write ('-': standard output)")
    p.add_number("--batch-size", int, 64, "images per forward pass", at_least=1)
    p.add_number("--workers", int, min(4, os.cpu_count() or 1), "decoding processes", at_least=0)
    p.add_argument("--amp", choices=AMP, default=None, help="autocast precision (default: the checkpoint's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_number(
        "--max-image-pixels",
        int,
        decode.DEFAULT_MAX_PIXELS,
        "an image whose header declares more pixels is skipped, not decoded (PIL's limit); 0: no limit",
        at_least=0,
    )
    return p


class Inputs:
    """The images to classify under one index: the files, then each shard set's samples."""

    def __init__(self, files: list[str], sets: list[ShardSource]):
        self.files, self.sets = files, sets
        self.starts = [len(files)]
        for source in sets:
            self.starts.append(self.starts[-1] + len(source))

    def __len__(self) -> int:
        return self.starts[-1]

    def _where(self, i: int) -> tuple[ShardSource, int]:
        k = next(k for k, end in enumerate(self.starts[1:]) if i < end)
        return self.sets[k], i - self.starts[k]

    def name(self, i: int) -> str:
        if i < len(self.files):
            return self.files[i]
        source, j = self._where(i)
        return source.name(j)

    def image(self, i: int) -> torch.Tensor:
        if i < len(self.files):
            return decode.decode_torchvision(self.files[i])
        source, j = self._where(i)
        return decode.decode_bytes(source.read(j))

    def decode(self, name: str) -> torch.Tensor:
        """The image called ``name``: how ``data.isolate`` decodes a crashed batch's images again."""
        for source in self.sets:
            if name.rpartition(":")[0] in source.urls:
                return source.decoder(name)
        return decode.decode_torchvision(name)


def find_inputs(inputs: list[str], split: str) -> tuple[Inputs, list[tuple[str, str]]]:
    """The images among ``inputs``; what was left out, and why."""
    plain, sets = [], []
    for item in inputs:
        if is_url(item) or os.path.isfile(os.path.join(item, fmt.MANIFEST)):
            store = open_store(item)
            manifest = read_manifest(store)
            sets += [ShardSource(store, manifest, name) for name in manifest["splits"] if split in ("all", name)]
        else:
            plain.append(item)
    files, skipped = inference.find_images(plain)
    return Inputs(files, sets), skipped


class Images(torch.utils.data.Dataset):
    """The inputs from ``start`` on, each as (its index, the model's input or None, why not)."""

    def __init__(self, inputs: Inputs, meta: dict, start: int = 0):
        self.inputs, self.meta, self.start = inputs, meta, start

    def __len__(self) -> int:
        return len(self.inputs) - self.start

    def __getitem__(self, j: int):
        i = self.start + j
        try:
            return i, inference.model_input(self.inputs.image(i), self.meta), None
        except DECODE_ERRORS as e:
            return i, None, describe(e)


def _batch(items):
    good = [(i, img) for i, img, _ in items if img is not None]
    bad = [(i, err) for i, _, err in items if err is not None]
    index = [i for i, _ in good]
    images = torch.stack([img for _, img in good]) if good else None
    return index, images, bad


def _loader(a, inputs, meta: dict, device: torch.device):
    """The batches of the inputs, each with the indices of its images and its unreadable ones;
    a file that crashes the decoder costs that file alone (``isolate.guarded``)."""

    def make(k: int) -> torch.utils.data.DataLoader:  # the batches from batch k on
        return torch.utils.data.DataLoader(
            Images(inputs, meta, k * a.batch_size),
            batch_size=a.batch_size,
            collate_fn=_batch,
            pin_memory=device.type == "cuda",
            **isolate.loader_options(a.workers),
        )

    def names_of(k: int) -> list[str]:  # the images of batch k
        return [inputs.name(i) for i in range(k * a.batch_size, min((k + 1) * a.batch_size, len(inputs)))]

    return isolate.guarded(make, names_of, inputs.decode)


def predict(a) -> tuple[int, int]:
    device = dist.resolve_device(a.device, 0)
    trained = inference.load(a.checkpoint, a.weights, device)
    meta, classes = trained.meta, trained.meta["classes"]
    inputs, unreadable = find_inputs(a.inputs, a.split)
    if not len(inputs):
        raise UserError(
            f"no image files in {', '.join(a.inputs)} ({', '.join(IMAGE_EXTENSIONS)}, or shard sets); check the paths"
        )
    k = min(a.top_k, len(classes))
    norm = inference.normalizer(meta, device, trained.config.channels_last)
    precision = Precision(a.amp or trained.config.amp, device)
    decode.configure(a.max_image_pixels)
    loader = _loader(a, inputs, meta, device)
    try:
        out = sys.stdout if a.output == "-" else open(a.output, "w", newline="")
    except OSError as e:
        raise UserError(f"cannot write --output {a.output} ({e.strerror}); choose a writable path") from None
    written = 0
    try:
        w = csv.writer(out)
        w.writerow(["file", *[c for j in range(1, k + 1) for c in (f"class{j}", f"prob{j}")]])
        with torch.inference_mode():
            for index, images, bad in loader:
                unreadable += [(inputs.name(i), err) for i, err in bad]
                if images is None:
                    continue
                x, _ = norm(images, torch.zeros(0, dtype=torch.int64))
                with precision.autocast():
                    logits = trained.model(x)
                probs = logits.float().softmax(dim=1)
                top = probs.topk(k, dim=1)
                for i, labels, ps in zip(index, top.indices.tolist(), top.values.tolist()):
                    w.writerow([inputs.name(i), *[v for c, p in zip(labels, ps) for v in (classes[c], f"{p:.4f}")]])
                written += len(index)
    finally:
        if out is not sys.stdout:
            out.close()
    for name, why in unreadable[:20]:
        console(f"distres.predict: unreadable: {name}: {why}")
    if written == 0:
        raise UserError(f"none of the {len(unreadable)} input(s) could be read (listed above); pass image files")
    where = "standard output" if a.output == "-" else a.output
    console(
        f"distres.predict: {written} image(s) classified ({trained.weights} weights of {a.checkpoint}) "
        f"into {where}; {len(unreadable)} unreadable{' (listed above)' if unreadable else ''}"
    )
    return written, len(unreadable)


def main(argv: list[str] | None = None) -> int:
    def body():
        predict(build_parser().parse_args(argv))

    return run_cli(body)


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
