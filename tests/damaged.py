"""Damaged image files, made on purpose: the PNG that crashes torchvision's decoder, images that
declare enormous sizes, and a seeded generator of damaged copies of real images (``fuzz``)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def short_png(width: int = 300, height: int = 300, rows: int = 10) -> bytes:
    """A valid header (8-bit RGB), an IDAT holding only ``rows`` rows, IEND, every CRC correct:
    libpng under torchvision 0.29 dies with SIGSEGV on it ("Not enough image data")."""
    raw = b"".join(b"\x00" + b"\x80" * (3 * width) for _ in range(rows))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(raw)) + png_chunk(b"IEND", b"")


def huge_png(width: int = 30000, height: int = 30000) -> bytes:
    """A few hundred bytes that declare width x height pixels (8-bit gray, one zero row)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1))
    return PNG_SIGNATURE + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat) + png_chunk(b"IEND", b"")


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path
