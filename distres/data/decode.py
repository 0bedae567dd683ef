"""Reading and decoding image files, and telling a broken file from a good one.

Decoder choice, by measurement (``benchmarks/loaders.py``, results in
``benchmarks/results/loaders-cpu.md``): torchvision.io (libjpeg-turbo, straight into a uint8
tensor) decodes faster than PIL with identical pixels, so it is the default; PIL stays as the
fallback for formats torchvision cannot read and as the benchmark's comparison.

Every image becomes 8-bit RGB, the same in every backend (the dali backend's decoder gives
the same pixels; ``tests/test_datasets.py`` checks each mode): grayscale (L) is replicated to
three channels, LA and RGBA lose their alpha channel (no blending onto a background, as PIL's
``convert("RGB")``), palette images (P, with or without transparency) are looked up in their
palette, CMYK JPEGs are converted to RGB, and 16-bit images (I;16 PNGs, 48-bit RGB PNGs) are
scaled to 8 bits by round(v / 257), the rounding DALI's decoder uses (PIL, only a fallback
here, reads 48-bit RGB as 8 bits itself, truncating: within 1 of it).

Every decoding path (the torch workers, --decode-on device, the gpu and dali backends, prepare,
predict, evaluate, export) reads a file through ``read_checked`` first: a file listed as excluded
(--exclude-files, or one that crashed a decoder, ``isolate``) and a file whose header declares more
than --max-image-pixels pixels (a few bytes can declare 30000 x 30000; PIL refuses such files by
default, torchvision, nvJPEG and DALI do not) raise ``Skipped`` there, a ``DECODE_ERRORS`` member,
so that every path leaves them out as it leaves out any unreadable file. The limit and the list
are process-wide, as PIL's own ``Image.MAX_IMAGE_PIXELS`` is: worker processes inherit them.
"""

from __future__ import annotations

import io
import os
import re
import struct

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_image

# What a broken file raises: torchvision (RuntimeError), PIL (OSError, its
# UnidentifiedImageError, ValueError, SyntaxError for some bad headers, DecompressionBombError
# with no --max-image-pixels), the file system (OSError).
DECODE_ERRORS = (RuntimeError, OSError, ValueError, SyntaxError, struct.error, Image.DecompressionBombError)

DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's: about 89.5 M (a 0.25 GB RGB image)
EXCLUDED = "excluded"  # how the log's reason for an excluded file starts


class Skipped(ValueError):
    """A file left out before decoding: excluded, or too many pixels."""


class _Limits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    excluded: dict[str, str] = {}  # path -> why


def _key(path: str) -> str:
    return os.path.abspath(path)  # a listed path and a data folder's may be relative and absolute


def configure(max_pixels: int = DEFAULT_MAX_PIXELS, excluded: dict[str, str] | None = None) -> None:
    """This process's pixel limit (0: none) and excluded files, before anything is decoded."""
    _Limits.max_pixels, _Limits.excluded = max_pixels, {_key(p): why for p, why in (excluded or {}).items()}
    # PIL's own check (a warning above its limit, an error above twice it) follows ours.
    Image.MAX_IMAGE_PIXELS = max_pixels or None


def exclude(path: str, why: str) -> None:
    _Limits.excluded[_key(path)] = why


def excluded() -> dict[str, str]:
    """The excluded files (absolute paths) and why."""
    return dict(_Limits.excluded)


def any_excluded() -> bool:
    return bool(_Limits.excluded)


def is_excluded(path: str) -> bool:
    return _key(path) in _Limits.excluded


def max_pixels() -> int:
    return _Limits.max_pixels


def excluded_by_flag(path: str | None) -> dict[str, str]:
    """--exclude-files: its paths, and why they are left out."""
    return {p: f"{EXCLUDED} by --exclude-files" for p in (read_excluded(path) if path else [])}


def read_excluded(path: str) -> list[str]:
    """The paths listed in an --exclude-files file: one per line; blank lines and # comments ignored."""
    from distres.errors import UserError

    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f]
    except OSError as e:
        raise UserError(
            f"cannot read --exclude-files {path} ({e.strerror}); give a file of image paths, one per line"
        ) from None
    return [ln for ln in lines if ln and not ln.startswith("#")]


def read_checked(path: str) -> bytes:
    """The file's bytes, unless it is excluded or its header declares too many pixels (``Skipped``)."""
    check_excluded(path)
    data = read_bytes(path)
    check_pixels(data)
    return data


def check_excluded(name: str) -> None:
    why = _Limits.excluded.get(_key(name))
    if why is not None:
        raise Skipped(why)


def check_pixels(data: bytes) -> None:
    limit = _Limits.max_pixels
    hw = header_size(data) if limit else None
    if hw is not None and hw[0] * hw[1] > limit:
        raise Skipped(f"{hw[1]}x{hw[0]} pixels, over --max-image-pixels {limit}")


def header_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) as the header declares it, read without decoding (None: no size found;
    decoding then fails or finds the size itself). BMP, GIF and PNG by their fixed fields, JPEG
    by its start-of-frame, anything else by PIL's lazy open, which reads only the header."""
    try:
        if data[:8] == b"\x89PNG\r\n\x1a\n":
            w, h = struct.unpack(">II", data[16:24])
            return h, w
        if data[:6] in (b"GIF87a", b"GIF89a"):
            return _gif_size(data)
        if data[:2] == b"BM":
            w, h = struct.unpack("<ii", data[18:26])
            return abs(h), abs(w)
        if data[:2] == JPEG_MAGIC:
            return jpeg_size(data, whole=False)
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return _webp_size(data)
        with Image.open(io.BytesIO(data)) as im:
            return im.size[1], im.size[0]
    except (*DECODE_ERRORS, Image.DecompressionBombWarning):
        return None


def describe(err: BaseException) -> str:
    """A decode error in a few words for the log (torchvision prefixes its messages with the
    C++ function and source line, which says nothing to a user)."""
    text = re.sub(r"^\w+, \S+:\d+, ", "", " ".join(str(err).split()))
    return text[:160] or type(err).__name__


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def to_uint8(img: torch.Tensor) -> torch.Tensor:
    """A decoded image in 8 bits: 16-bit values scaled by round(v / 257)."""
    if img.dtype == torch.uint8:
        return img
    return ((img.to(torch.int32) * 255 + 32767) // 65535).to(torch.uint8)


def _gif_size(data: bytes) -> tuple[int, int]:
    """The logical screen, or the first frame's extent where it reaches beyond it (decoders
    allocate for the frame)."""
    w, h = struct.unpack("<HH", data[6:10])
    i = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    while i < len(data) and data[i] == 0x21:  # extension blocks: label, then sub-blocks
        i += 2
        while i < len(data) and data[i]:
            i += data[i] + 1
        i += 1
    if i + 9 <= len(data) and data[i] == 0x2C:
        left, top, fw, fh = struct.unpack("<HHHH", data[i + 1 : i + 9])
        w, h = max(w, left + fw), max(h, top + fh)
    return h, w


def _webp_size(data: bytes) -> tuple[int, int] | None:
    kind = data[12:16]
    if kind == b"VP8X":  # the canvas: 24-bit width - 1, height - 1
        return int.from_bytes(data[27:30], "little") + 1, int.from_bytes(data[24:27], "little") + 1
    if kind == b"VP8L":  # 14-bit width - 1, height - 1 after the signature byte
        bits = int.from_bytes(data[21:25], "little")
        return ((bits >> 14) & 0x3FFF) + 1, (bits & 0x3FFF) + 1
    if kind == b"VP8 ":  # a key frame's 14-bit sizes after its start code
        w, h = struct.unpack("<HH", data[26:30])
        return h & 0x3FFF, w & 0x3FFF
    return None


def decode_pil(path: str, data: bytes | None = None) -> torch.Tensor:
    data = read_checked(path) if data is None else data
    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: convert("RGB") would clip it
            arr = torch.from_numpy(np.array(im).astype(np.int32)).clamp(0, 65535)
            return to_uint8(arr).expand(3, *arr.shape).contiguous()
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)


def decode_torchvision(path: str) -> torch.Tensor:
    """An image file -> uint8 RGB tensor, CHW. torchvision reads JPEG, PNG, WebP and GIF; BMP
    and TIFF go to PIL. A file neither can read raises torchvision's error."""
    return decode_bytes(read_checked(path))


def decode_bytes(data: bytes) -> torch.Tensor:
    """``decode_torchvision`` for an image already read (a shard member, say)."""
    try:
        return to_uint8(decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB))
    except RuntimeError as err:
        try:
            return decode_pil("", data)
        except DECODE_ERRORS:
            raise err from None


DECODERS = {"torchvision": decode_torchvision, "pil": decode_pil}

JPEG_MAGIC = b"\xff\xd8"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes, whole: bool = True) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None if the bytes are not a whole JPEG
    (``whole=False``: the frame header alone, whatever follows it).

    Walks the marker segments to the start-of-frame (a few microseconds, against ~40 for
    PIL's header parse) and checks the end-of-image marker, which a truncated file lacks;
    DALI's decoder would otherwise fail the whole batch on it."""
    if data[:2] != JPEG_MAGIC or (whole and b"\xff\xd9" not in data[-64:]):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        length = struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in _SOF:
            if i + 9 > n:
                return None
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return (h, w) if h and w else None
        i += 2 + length
    return None


def image_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) of any image file from its header; None when it cannot be read."""
    if data[:2] == JPEG_MAGIC:
        return jpeg_size(data)
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # checks the whole file (e.g. PNG CRCs), not only the header
            return im.size[1], im.size[0]
    except DECODE_ERRORS:
        return None
