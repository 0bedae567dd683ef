"""Checkpoint files in a folder: whole or absent, a short history, the newest readable one.

Each write goes to a temporary file in the same folder, is fsynced, and is renamed into place
(rename is atomic on POSIX), so a crash never leaves half a checkpoint under a checkpoint's
name. Step checkpoints are kept as a short history; ``last.pt`` is a hard link to the newest
(no second write). Loads use ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import re
import shutil
import warnings
from pathlib import Path

import torch

from distres.errors import UserError

LAST = "last.pt"
BEST = "best.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


def step_path(folder: Path, step: int) -> Path:
    return folder / f"step-{step:08d}.pt"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            try:
                torch.save(obj, f)
            except RuntimeError as e:
                # torch's zip writer turns the file's OSError (a full disk) into its own error.
                if isinstance(e.__context__, OSError):
                    raise e.__context__ from None
                raise
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def remove_partial(folder: Path) -> None:
    """Delete what a process killed mid-write left behind (call it before any write starts)."""
    if folder.is_dir():
        for stale in folder.glob(".*.tmp-*"):
            stale.unlink(missing_ok=True)


def _point_last_at(target: Path) -> None:
    last = target.with_name(LAST)
    tmp = target.with_name(f".{LAST}.link-{os.getpid()}")
    try:
        os.link(target, tmp)
    except OSError:  # filesystems without hard links: copy instead
        shutil.copyfile(target, tmp)
    os.replace(tmp, last)
    _fsync_dir(target.parent)


def step_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def holds_checkpoints(folder: Path) -> bool:
    return bool(step_checkpoints(folder)) or (folder / LAST).exists()


def save(state: dict, folder: Path, step: int, keep: int) -> Path:
    """Write step's checkpoint, point last.pt at it, and keep only the ``keep`` newest."""
    folder.mkdir(parents=True, exist_ok=True)
    path = step_path(folder, step)
    atomic_save(state, path)
    _point_last_at(path)
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def save_best(state: dict, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save(state, folder / BEST)


def load(path: Path) -> dict:
    """A training state as saved (any format); a one-line error for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check --resume") from None
    except Exception as e:
        raise UserError(
            f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}); "
            "resume from an earlier one with --resume PATH"
        ) from None
    if isinstance(state, dict) and "best" in state:
        raise UserError(
            f"{path} holds the best weights only, not a training state; resume from last.pt, "
            "or start a new run from it with --weights"
        )
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"{path} is not a distres checkpoint; pass one from OUTPUT_DIR/checkpoints")
    return state


def load_latest(folder: Path) -> tuple[dict, Path] | None:
    """The newest loadable checkpoint in folder, falling back past corrupt ones; None if empty."""
    candidates = [folder / LAST] if (folder / LAST).exists() else []
    candidates += reversed(step_checkpoints(folder))
    errors = []
    for path in candidates:
        try:
            return load(path), path
        except UserError as e:
            errors.append(str(e))
            warnings.warn(f"skipping checkpoint {path}: {e}", stacklevel=2)
    if errors:
        raise UserError(f"no loadable checkpoint in {folder}; {errors[-1]}")
    return None


def best_top1(folder: Path) -> float | None:
    """The top-1 recorded in folder's best.pt; None without one (or a torn or foreign one,
    which the next evaluation replaces)."""
    path = folder / BEST
    if not path.exists():
        return None
    try:
        return float(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["best"]["top1"])
    except Exception:
        return None
