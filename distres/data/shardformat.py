"""The on-disk layout of a shard set, shared by ``distres.prepare shards`` (which writes it) and
``data.shards`` (which reads it); no torch import here.

A shard set is a folder (or an object-store prefix) holding, per split (``train``, ``val``):

- ``SPLIT-NNNNNN.tar``: POSIX tar files in the WebDataset layout: for each sample ``KEY.EXT``
  (the image's bytes: jpg, png, ...) then ``KEY.cls`` (its label as decimal text). KEY is the
  sample's position in the source's sorted order, zero-padded, so the keys sort as the samples
  do across all shards of the split. ``webdataset``, ``wids`` and DALI read them as they are.
- ``SPLIT-NNNNNN.idx``: DALI's index of the tar (the format of its ``wds2idx``): a first line
  ``v1.2 <samples>``, then one line per sample, ``<ext> <offset> <size> <member name>`` for each
  of its members, offsets pointing at the member's data.
- ``SPLIT.samples.npz``: the table training reads at start-up instead of listing or parsing
  anything: each sample's shard number, data offset, size, label and key (NumPy arrays).
- ``manifest.json``: what ``MANIFEST_FORMAT`` and ``VERSION`` say it is, the classes, each
  split's samples per shard with each file's SHA-256, the source and the options.
"""

from __future__ import annotations

import re
import tarfile

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "distres-shards"
VERSION = 1
BLOCK = 512  # tar's block: every header and every member's data starts on one
SPLITS = ("train", "val")

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'256MB', '256M', '1.5G', '4096' -> bytes (K/M/G/T are powers of 1024)."""
    m = _SIZE.match(str(text))
    if not m:
        raise ValueError(f"{text!r} is not a size; write e.g. 256MB, 2G or 4096")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def shard_name(split: str, k: int) -> str:
    return f"{split}-{k:06d}.tar"


def index_name(tar: str) -> str:
    return tar[: -len(".tar")] + ".idx"


def table_name(split: str) -> str:
    return f"{split}.samples.npz"


def key_text(key: int, digits: int) -> str:
    return f"{key:0{digits}d}"


def padded(n: int) -> int:
    return -n % BLOCK


def member_header(name: str, size: int) -> bytes:
    """A member's 512-byte ustar header, the same for the same name and size (no dates, owners)."""
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o444, 0
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def header_fields(header: bytes) -> tuple[str, int] | None:
    """(member name, size) from a ustar header, or None if the bytes are not one (checked by the
    header's checksum). Read field by field rather than by tarfile's general parser: it runs on
    every sample read."""
    if len(header) != BLOCK or header[257:262] != b"ustar":
        return None
    try:
        size, checksum = int(header[124:136].strip(b"\0 ") or b"0", 8), int(header[148:156].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header[:148]) + 8 * ord(" ") + sum(header[156:]):  # the checksum field counts as spaces
        return None
    name, prefix = (
        field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape") for field in (header[:100], header[345:500])
    )
    return (f"{prefix}/{name}" if prefix else name), size


def index_line(members: list[tuple[str, int, int]]) -> str:
    """One sample's line of DALI's index: (member name, data offset, size) of each member."""
    return " ".join(f"{name.rsplit('.', 1)[1]} {offset} {size} {name}" for name, offset, size in members)
