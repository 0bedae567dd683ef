"""The hang guard: a rank that stops taking part (a frozen or dead process, a stuck data worker,
a full disk under a checkpoint write) must not leave the others waiting, silent, in a collective.

Each rank names what it is doing, in a plain attribute the training loop sets (no sync, no
message): loading data, the training step (whose backward all-reduces the gradients), a
checkpoint, evaluation. A thread watches it. When one phase has lasted --dist-timeout, the
rank writes its phase into the job's key-value store (the launcher's rendezvous store, which
outlives any one worker), waits a few seconds for the other ranks' entries, prints one line
naming the phase, the step, the ranks that never arrived in it and what each of those was
doing (or that it did not answer: dead or frozen), and exits with status 124, so the launcher
stops the job (or restarts it, with --max-restarts) instead of waiting out a collective
timeout. The process group's own timeout is set later than this one, as a backstop.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time

EXIT_HUNG = 124  # as timeout(1)


class Watchdog:
    def __init__(self, ctx, timeout_s: float, store):
        self.ctx, self.timeout_s, self.store = ctx, timeout_s, store
        self._phase: tuple[str, int, float] | None = None  # (what, step, since)
        self._stop = threading.Event()
        self._thread = None
        if ctx.distributed and ctx.world_size > 1 and store is not None:
            self._thread = threading.Thread(target=self._watch, name="distres-watchdog", daemon=True)
            self._thread.start()

    def enter(self, what: str, step: int) -> None:
        """From now on this rank is in ``what`` of optimizer step ``step`` (counted from 1)."""
        self._phase = (what, step, time.monotonic())

    def leave(self) -> None:
        self._phase = None

    @contextlib.contextmanager
    def phase(self, what: str, step: int, timed: bool = True):
        """``what`` of step ``step`` for the block's length; ``timed=False``: a block no timeout
        applies to (a first step that may compile for minutes)."""
        if timed:
            self.enter(what, step)
        else:
            self.leave()
        try:
            yield
        finally:
            self.leave()

    def close(self) -> None:
        self._stop.set()
        self._phase = None

    def _watch(self) -> None:
        poll = min(5.0, max(0.2, self.timeout_s / 20))
        while not self._stop.wait(poll):
            phase = self._phase
            if phase is not None and time.monotonic() - phase[2] > self.timeout_s:
                self._report(*phase)

    def _key(self, rank: int) -> str:
        return f"distres/hung/{self.ctx.restart}/{rank}"

    def _report(self, what: str, step: int, since: float) -> None:
        ctx = self.ctx
        others: dict[int, str] = {}
        try:
            self.store.set(self._key(ctx.rank), f"{what} at step {step}")
            time.sleep(min(15.0, max(2.0, self.timeout_s / 4)))  # the other ranks' watchdogs fire too
            for r in range(ctx.world_size):
                if r != ctx.rank and self.store.check([self._key(r)]):
                    others[r] = self.store.get(self._key(r)).decode()
        except Exception as e:  # the store's host is gone too: say what this rank knows
            others = {}
            reach = f" (the job's store could not be reached: {type(e).__name__})"
        else:
            reach = ""
        absent = [
            r
            for r in range(ctx.world_size)
            if r != ctx.rank
            and (r not in others or not others[r].startswith(what) or not others[r].endswith(f" {step}"))
        ]
        detail = "; ".join(f"rank {r}: {others[r] if r in others else 'no answer (dead or frozen)'}" for r in absent)
        waited = (time.monotonic() - since) / 60
        line = (
            f"distres: error: rank {ctx.rank} waited {waited:.1f} min (--dist-timeout {self.timeout_s / 60:g}) in "
            f"{what} at step {step}"
        )
        if absent:
            line += f"; rank(s) {', '.join(map(str, absent))} did not arrive ({detail}){reach}"
        else:
            line += f"; every rank is in it: a collective that never completed (network, NCCL){reach}"
        line += "; check those processes' logs and nodes, or raise --dist-timeout for slow steps"
        print(line, file=sys.stderr, flush=True)
        os._exit(EXIT_HUNG)
