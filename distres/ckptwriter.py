"""Rank 0 writes checkpoints in a background thread, so training goes on during the write.

``submit`` copies the state to host memory first (on CUDA: queued copies into pinned memory,
no wait), because the next optimizer step changes the live tensors in place; the thread waits
for those copies, then writes. One write is in flight at a time.

A failed write must stop every rank, not rank 0 alone (the others would wait for it in the next
collective until the timeout). So the failure is handed over at a collective: ``gather``, which
every rank calls, waits for the write in flight and raises its failure on all of them. ``wait``
is that collective with nothing to gather; ``close`` ends the run's writing without raising (it
runs on the way out, perhaps over another error).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import torch

from distres import dist
from distres.errors import UserError, console


class BackgroundWriter:
    def __init__(self, ctx, folder: Path):
        self.ctx, self.folder = ctx, folder  # (the folder names where a failed write went)
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def submit(self, obj, write: Callable[[object], None]) -> bool:
        """Start ``write(copy of obj in host memory)`` in the background, after the write in
        flight. False, and nothing started, when an earlier write failed: the next ``gather``
        or ``wait`` raises that failure on every rank."""
        if not self._join():
            return False
        obj = _host_copy(obj)
        copied = torch.cuda.Event() if self.ctx.device.type == "cuda" else None
        if copied is not None:
            copied.record()
        self._thread = threading.Thread(
            target=self._run, args=(write, obj, copied), name="distres-checkpoint", daemon=False
        )
        self._thread.start()
        return True

    def gather(self, mine) -> list:
        """Every rank's ``mine``, once rank 0's write in flight has ended. A collective: if that
        write failed, every rank raises the same error."""
        error = self._failure() if self.ctx.is_main else None
        gathered = dist.gather_objects((mine, error))
        if gathered[0][1] is not None:
            raise UserError(gathered[0][1])
        return [m for m, _ in gathered]

    def wait(self) -> None:
        """Block until the last write is on disk. A collective: no rank goes on (or exits, which
        would make the launcher kill the rest, rank 0 mid-write) before it is."""
        self.gather(None)

    def close(self) -> None:
        """Let a write in flight finish; a failure is reported, not raised (the run is ending,
        maybe on another error that it must not hide)."""
        try:
            error = self._failure()
        except Exception as e:
            error = str(e)
        if error is not None:
            console(f"distres: warning: {error}")

    def _run(self, write, obj, copied) -> None:
        try:
            if copied is not None:
                copied.synchronize()  # the device-to-host copies have landed
            write(obj)
        except BaseException as e:  # handed to the training thread by _failure()
            self._error = e

    def _join(self) -> bool:
        """Wait for the write in flight, if any; whether every write so far succeeded."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self._error is None

    def _failure(self) -> str | None:
        """This process's failed write as the line every rank reports (None: none failed). A
        failure other than the file system's is a bug: raised here, with its traceback."""
        if self._join():
            return None
        error, self._error = self._error, None
        if isinstance(error, OSError):
            return (
                f"cannot write a checkpoint to {self.folder} ({error.strerror or error}); "
                "free space or fix permissions there, then resume with --resume"
            )
        raise error


def _host_copy(obj):
    """obj with every tensor copied to host memory, detached from the live training state.
    CUDA tensors go to pinned memory with non_blocking copies: ``submit`` records an event and
    the writer waits on it."""
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "cuda":
            host = torch.empty(obj.shape, dtype=obj.dtype, pin_memory=True)
            return host.copy_(obj.detach(), non_blocking=True)
        return obj.detach().clone()
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj
