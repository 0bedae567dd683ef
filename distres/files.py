"""Writing a file so that it is either whole or absent, and a file's checksum (no torch import:
``distres.prepare`` uses it and starts quickly)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from pathlib import Path


def atomic_write(dst: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temporary name in dst's folder, then rename it to dst: an interrupted
    write never leaves a half file under dst (that a later run would take as done). The file
    gets the usual permissions (some writers, such as safetensors', create theirs private)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256(path: Path) -> str:
    """The file's SHA-256 (hex), read in 4 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
