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
"""

from __future__ import annotations

import io
import re
import struct

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_image, read_file

# What a broken file raises: torchvision (RuntimeError), PIL (OSError, its
# UnidentifiedImageError, ValueError, SyntaxError for some bad headers), the file system (OSError).
DECODE_ERRORS = (RuntimeError, OSError, ValueError, SyntaxError, struct.error)


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


def decode_pil(path: str) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode.startswith("I"):  # 16-bit (or 32-bit integer) grayscale: convert("RGB") would clip it
            arr = torch.from_numpy(np.array(im).astype(np.int32)).clamp(0, 65535)
            return to_uint8(arr).expand(3, *arr.shape).contiguous()
        arr = np.array(im.convert("RGB"))
    return torch.from_numpy(arr).permute(2, 0, 1)


def decode_torchvision(path: str) -> torch.Tensor:
    """An image file -> uint8 RGB tensor, CHW. torchvision reads JPEG, PNG, WebP and GIF; BMP
    and TIFF go to PIL. A file neither can read raises torchvision's error."""
    try:
        return to_uint8(decode_image(read_file(path), mode=ImageReadMode.RGB))
    except RuntimeError as err:
        try:
            return decode_pil(path)
        except DECODE_ERRORS:
            raise err from None


DECODERS = {"torchvision": decode_torchvision, "pil": decode_pil}

JPEG_MAGIC = b"\xff\xd8"
_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a JPEG's frame header, or None if the bytes are not a whole JPEG.

    Walks the marker segments to the start-of-frame (a few microseconds, against ~40 for
    PIL's header parse) and checks the end-of-image marker, which a truncated file lacks;
    DALI's decoder would otherwise fail the whole batch on it."""
    if data[:2] != JPEG_MAGIC or b"\xff\xd9" not in data[-64:]:
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
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # checks the whole file (e.g. PNG CRCs), not only the header
            return im.size[1], im.size[0]
    except DECODE_ERRORS:
        return None
