"""``--data shards``: a shard set written by ``python -m distres.prepare shards`` as a source.

``ShardSource`` hands out the same samples as the source the shards were made from (an
ImageFolder split, CIFAR, MNIST): the same count, order and labels, each image's bytes read
with one byte-range read through the split's table (``data.shardformat``) and decoded by the
training decoder. Everything above a source (the sampler's global order, the ranks' shares,
exact resume on any number of processes, the augmentation draws, every backend) is therefore
the same as for the folder: an epoch over the shards is, bit for bit, the epoch over the
folder they were made from without re-encoding.

Start-up reads the manifest and one table per split (NumPy arrays: forked DataLoader workers
share their pages, where a list of Python objects would be copied page by page as its
reference counts change); nothing is listed. Each read also takes the member's tar header
and checks it against the table, so a shard that is cut short or disagrees with its index
stops the run with one line; a member whose bytes do not decode is a bad image like any other.
"""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import torch

from distres.data import shardformat as fmt
from distres.data.decode import any_excluded, check_excluded, check_pixels, decode_bytes
from distres.data.remote import FIX_SHARDS, ShardError, is_url, open_store
from distres.errors import UserError


def read_manifest(store) -> dict:
    where = store.url(fmt.MANIFEST)
    try:
        present = store.exists(fmt.MANIFEST)
        why = None if present else store.missing()
    except ShardError as e:  # every rank meets it: rank 0 says it
        raise UserError(str(e)) from None
    if not present:
        raise UserError(
            f"{where} does not exist ({why}): --data-dir is not a shard set, or an unfinished one; write it with "
            "python -m distres.prepare shards SRC OUT (run again, it continues where it stopped)"
        )
    try:
        manifest = json.loads(store.read(fmt.MANIFEST))
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{where} is not valid JSON ({e}); {FIX_SHARDS}") from None
    if manifest.get("format") != fmt.MANIFEST_FORMAT or manifest.get("version") != fmt.VERSION:
        raise UserError(
            f"{where} is not a distres shard set of version {fmt.VERSION} (it says format "
            f"{manifest.get('format')!r}, version {manifest.get('version')!r}); write the shards again with "
            "this distres: python -m distres.prepare shards SRC OUT"
        )
    return manifest


class ShardSource:
    """One split of a shard set; ``store``: ``remote.LocalStore`` or ``remote.FsspecStore``."""

    def __init__(self, store, manifest: dict, split: str, classes: list[str] | None = None):
        self.store, self.notes, self.dataset = store, [], manifest["dataset"]
        self.classes = list(manifest["classes"])
        if classes is not None and list(classes) != self.classes:
            raise UserError(
                f"the model's classes are not those of the shard set {store.url(fmt.MANIFEST)}; "
                "pass the --data-dir it was trained on"
            )
        info = manifest["splits"][split]
        data = store.read(info["table"])
        if hashlib.sha256(data).hexdigest() != info["table_sha256"]:
            raise UserError(f"{store.url(info['table'])} does not match its manifest's checksum; {FIX_SHARDS}")
        table = np.load(io.BytesIO(data))
        self.shard, self.offset, self.size = table["shard"], table["offset"], table["size"]
        self.keys = table["key"]
        self.labels = torch.from_numpy(table["label"])
        self.tars = [s["tar"] for s in info["shards"]]
        self.urls = [store.url(tar) for tar in self.tars]
        self.expected = [(s["bytes"], s["sha256"]) for s in info["shards"]]
        self.digits = manifest["key_digits"]
        self._checked: set[int] = set()  # shards whose size this process has compared with the manifest

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"{self.urls[self.shard[i]]}:{fmt.key_text(int(self.keys[i]), self.digits)}"

    def read(self, i: int) -> bytes:
        """Sample i's image bytes: its header and data in one read, the header checked; an
        excluded sample or one over the pixel limit raises ``Skipped``, as a file would."""
        if any_excluded():
            check_excluded(self.name(i))
        k, offset, size = int(self.shard[i]), int(self.offset[i]), int(self.size[i])
        if k not in self._checked:
            self._check_size(k)
        start = offset - fmt.BLOCK
        if hasattr(self.store, "cache"):
            blob = self.store.read_range(self.tars[k], start, size + fmt.BLOCK, self.expected[k])
        else:
            blob = self.store.read_range(self.tars[k], start, size + fmt.BLOCK)
        fields = fmt.header_fields(blob[: fmt.BLOCK]) if len(blob) == size + fmt.BLOCK else None
        key = fmt.key_text(int(self.keys[i]), self.digits)
        if fields is None or not fields[0].startswith(key + ".") or fields[1] != size:
            raise ShardError(
                f"{self.urls[k]} does not hold sample {key} where its table says "
                f"(offset {offset}, {size} bytes): the shard is damaged or its index disagrees with it; {FIX_SHARDS}"
            )
        data = blob[fmt.BLOCK :]
        check_pixels(data)
        return data

    def _check_size(self, k: int) -> None:
        actual, expected = self.store.size(self.tars[k]), self.expected[k][0]
        if actual != expected:
            raise ShardError(
                f"{self.urls[k]} is {actual} bytes, its manifest says {expected} (cut short or replaced); {FIX_SHARDS}"
            )
        self._checked.add(k)

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return decode_bytes(self.read(i)), int(self.labels[i])

    def decoder(self, name: str) -> torch.Tensor:
        """The sample called ``name`` (``name(i)``), decoded: how the samples of a batch whose
        worker died are decoded again one at a time, to find the one that crashes the decoder
        (``data.isolate``)."""
        url, _, key = name.rpartition(":")
        k = self.urls.index(url)
        return decode_bytes(self.read(int(np.flatnonzero((self.shard == k) & (self.keys == int(key)))[0])))


def shard_splits(where: str, cache_dir: str | None, cache_size: int, classes: list[str] | None = None):
    """(train source or None, validation source) of the shard set at ``where`` (a folder or a
    URL); with ``classes`` (a trained model's) only the validation split, as for folders."""
    if cache_dir and not is_url(where):
        raise UserError(f"--cache-dir caches a remote shard set; {where} is local: drop --cache-dir")
    store = open_store(where, cache_dir, cache_size)
    manifest = read_manifest(store)
    if getattr(store, "cache", None) is not None:
        store.cache.check_room(sum(s["bytes"] for split in manifest["splits"].values() for s in split["shards"]))
    val = ShardSource(store, manifest, "val", classes)
    return (None if classes is not None else ShardSource(store, manifest, "train")), val
