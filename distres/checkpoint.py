"""Checkpoints that a crash cannot corrupt.

Each save goes to a temporary file in the same folder, is fsynced, and is renamed into place
(rename is atomic on POSIX), so ``last.pt`` is always a whole checkpoint. Step checkpoints are
kept as a short history; ``last.pt`` is a hard link to the newest one (no second write).
Loads use ``weights_only=True``: a checkpoint cannot run code.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from distres.errors import UserError

LAST = "last.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")


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
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_dir(path.parent)


def _point_last_at(target: Path) -> None:
    last = target.with_name(LAST)
    tmp = target.with_name(f".{LAST}.link-{os.getpid()}")
    try:
        os.link(target, tmp)
    except OSError:  # filesystems without hard links: copy instead
        import shutil
        shutil.copyfile(target, tmp)
    os.replace(tmp, last)
    _fsync_dir(target.parent)


def step_checkpoints(folder: Path) -> list[Path]:
    """Step checkpoints, oldest first."""
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def save(state: dict, folder: Path, step: int, keep: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{step:08d}.pt"
    atomic_save(state, path)
    _point_last_at(path)
    for old in step_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} does not exist; check --resume")
    except Exception as e:
        raise UserError(f"checkpoint {path} is unreadable or corrupt ({type(e).__name__}); "
                        "resume from an earlier one with --resume PATH") from None
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


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        # This rank's GPU only (dist.init made it the current device): the job may resume on
        # nodes where each process sees a different number of GPUs.
        "cuda": [torch.cuda.get_rng_state()] if torch.cuda.is_available() else [],
    }


def rank_rng(state: dict, rank: int) -> dict:
    """This rank's saved RNG state. Format 1 held rank 0's only; a job resumed on more
    processes than it was saved from gives the extra ranks the last saved rank's state."""
    rng = state["rng"]
    if isinstance(rng, dict):
        return rng
    return rng[min(rank, len(rng) - 1)]


def set_rng_state(state: dict) -> None:
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"][0])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x
