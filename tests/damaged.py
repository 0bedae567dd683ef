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


# --- seeded damage --------------------------------------------------------------------------


def base_images(size: int = 24, seed: int = 0, image=None, prefix: str = "") -> dict[str, bytes]:
    """Small good images in every format and mode the decoders meet: baseline and progressive
    JPEG, 8-bit RGB, 16-bit, gray, RGBA and palette PNG, lossy and lossless WebP, GIF, BMP; of
    ``image`` (a PIL image, e.g. a real photo) when given, else of a gradient with noise."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    rgb = np.stack([x * 255 // size, y * 255 // size, rng.integers(0, 255, (size, size))], -1).astype(np.uint8)
    im = Image.fromarray(rgb) if image is None else image.convert("RGB").resize((size, size))
    forms = {
        "baseline.jpg": (im, "JPEG", {"quality": 90}),
        "progressive.jpg": (im, "JPEG", {"progressive": True}),
        "rgb.png": (im, "PNG", {}),
        "16bit.png": (Image.fromarray((x * 2000 + y).astype(np.uint16)), "PNG", {}),
        "gray.png": (im.convert("L"), "PNG", {}),
        "rgba.png": (im.convert("RGBA"), "PNG", {}),
        "palette.png": (im.convert("P"), "PNG", {}),
        "lossy.webp": (im, "WEBP", {"quality": 80}),
        "lossless.webp": (im, "WEBP", {"lossless": True}),
        "palette.gif": (im.convert("P"), "GIF", {}),
        "rgb.bmp": (im, "BMP", {}),
    }
    out = {}
    for name, (img, fmt, kw) in forms.items():
        buf = io.BytesIO()
        img.save(buf, fmt, **kw)
        out[prefix + name] = buf.getvalue()
    return out


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a PNG, as far as its lengths lead."""
    chunks, i = [], 8
    while i + 8 <= len(data):
        length = struct.unpack(">I", data[i : i + 4])[0]
        chunks.append((i, data[i + 4 : i + 8], length))
        i += 12 + length
    return chunks


def _refit_crc(data: bytearray, offset: int) -> None:
    """The CRC of the chunk at ``offset`` made right again for its (possibly changed) length."""
    length = struct.unpack(">I", data[offset : offset + 4])[0]
    end = offset + 8 + length
    if end + 4 <= len(data):
        data[end : end + 4] = struct.pack(">I", zlib.crc32(bytes(data[offset + 4 : end])) & 0xFFFFFFFF)


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each JPEG marker segment up to the start of scan."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        out.append((i, marker))
        if marker == 0xDA:
            break
        i += 2 + struct.unpack(">H", data[i + 2 : i + 4])[0]
    return out


def damage(data: bytes, rng) -> tuple[bytes, str]:
    """One seeded damage of an image file: (the damaged bytes, what was done)."""
    b = bytearray(data)
    kinds = ["bitflip", "byterun", "truncate"]
    if b[:8] == PNG_SIGNATURE:
        kinds += ["png_ihdr", "png_chunk_length", "png_short_idat"]
    elif b[:2] == b"\xff\xd8":
        kinds += ["jpeg_sof", "jpeg_segment_length", "jpeg_huffman"]
    else:
        kinds += ["header_size"]
    kind = rng.choice(kinds)
    if kind == "bitflip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "byterun":
        i, n = rng.randrange(len(b)), rng.randint(1, 64)
        b[i : i + n] = bytes([rng.choice((0, 0xFF, rng.randrange(256)))]) * len(b[i : i + n])
    elif kind == "truncate":
        b = b[: rng.randrange(1, len(b))]
    elif kind == "png_ihdr":  # width, height, bit depth or colour type, the CRC fixed
        field = rng.choice([(16, ">I"), (20, ">I"), (24, ">B"), (25, ">B")])
        value = rng.choice([0, 1, 3, 7, 16, 255, 65535, 2**31 - 1]) if field[1] == ">I" else rng.randrange(256)
        b[field[0] : field[0] + struct.calcsize(field[1])] = struct.pack(
            field[1], value % (2**32 if field[1] == ">I" else 256)
        )
        _refit_crc(b, 8)
    elif kind == "png_chunk_length":
        offset, _, length = rng.choice(_png_chunks(bytes(b)))
        b[offset : offset + 4] = struct.pack(">I", max(0, length + rng.randint(-64, 64)))
        _refit_crc(b, offset)
    elif kind == "png_short_idat":
        b = bytearray(short_png(rng.randint(2, 400), rng.randint(11, 400), rng.randint(0, 10)))
    elif kind in ("jpeg_sof", "jpeg_segment_length", "jpeg_huffman"):
        segs = _jpeg_segments(bytes(b))
        want = {"jpeg_sof": (0xC0, 0xC2), "jpeg_huffman": (0xC4,)}.get(kind)
        segs = [s for s in segs if want is None or s[1] in want] or _jpeg_segments(bytes(b))
        i, _ = rng.choice(segs)
        if kind == "jpeg_sof":  # precision, height, width or component count
            j = i + rng.choice([4, 5, 7, 9])
            b[j] = rng.randrange(256)
        elif kind == "jpeg_segment_length":
            b[i + 2 : i + 4] = struct.pack(">H", rng.randrange(65536))
        else:
            n = struct.unpack(">H", b[i + 2 : i + 4])[0]
            for _ in range(rng.randint(1, 4)):
                b[i + 4 + rng.randrange(max(1, n - 2))] = rng.randrange(256)
    else:  # GIF, BMP, WebP: a declared size
        offset = {b"GI": 6, b"BM": 18, b"RI": 26}.get(bytes(b[:2]), 6)
        b[offset : offset + 2] = struct.pack("<H", rng.choice([0, 1, 30000, 65535]))
    return bytes(b), kind


def fuzz(folder: Path, count: int, seed: int = 0, bases: dict[str, bytes] | None = None) -> list[Path]:
    """``count`` damaged images in folder (seeded: the same files for the same arguments), each
    named after its base and its damage."""
    import random

    rng = random.Random(seed)
    bases = bases or base_images(seed=seed)
    names = sorted(bases)
    paths = []
    for k in range(count):
        name = names[k % len(names)]
        data, kind = damage(bases[name], rng)
        stem, ext = name.rsplit(".", 1)
        paths.append(write(folder / f"{k:05d}-{kind}-{stem.replace('.', '-')}.{ext}", data))
    return paths
