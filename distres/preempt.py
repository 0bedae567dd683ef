"""Stop cleanly when the scheduler asks: SIGTERM or SIGUSR1 on any rank stops every rank.

Ctrl-C (SIGINT) is the same request from a person: the run stops after the next step with a
checkpoint and says where to resume. A second Ctrl-C aborts at once (in a single process; under
torchrun, which passes its own SIGINT on to the workers, torchrun ends them if they take long).

A signal reaches the ranks at different moments (or only one of them: ``kill -USR1 <pid>``), but
they must all stop after the *same* step, or the checkpoint would mix ranks at different steps
and a rank would hang in the next all-reduce. So each rank only records the signal in a flag,
and once per step the flags are combined with one all-reduce: all ranks see the same answer at
the same step.

That all-reduce runs on a separate gloo group on CPU tensors, so it never forces the host to
wait for the GPU, and it is started asynchronously after step s and waited for after step s+1:
its network latency hides behind one step of compute. The price is that a run stops one step
after the signal, which no scheduler notices (SLURM's --signal warns minutes ahead; torchrun
waits 30 s after its SIGTERM before it kills workers).
"""

from __future__ import annotations

import os
import signal
import threading

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
UNDER_TORCHRUN = "TORCHELASTIC_RUN_ID" in os.environ


class PreemptionFlag:
    def __init__(self, distributed: bool, announce: bool = True):
        self.signal_name: str | None = None
        self._announce = announce  # say on Ctrl-C what happens next (rank 0)
        self._previous = {}
        # Python only lets the main thread install handlers (tests may run training elsewhere).
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        # new_group is itself a collective: every rank creates it here, in the same order.
        self._group = dist.new_group(backend="gloo") if distributed else None
        self._local = torch.zeros(1)
        self._sent = torch.zeros(1)
        self._pending = None

    def _on_signal(self, signum, frame) -> None:
        # Only set a flag (and write a line with os.write, which needs no lock): the handler runs
        # between two bytecodes of the training loop, where nothing else is safe to do.
        interrupted = signum == signal.SIGINT
        if interrupted and self._local.item() > 0:
            if not UNDER_TORCHRUN:  # (torchrun's own copy of the same Ctrl-C is no second one)
                raise KeyboardInterrupt
            return
        if interrupted and self._announce:
            os.write(
                2, b"\ndistres: Ctrl-C: stopping after this step with a checkpoint (Ctrl-C again aborts at once)\n"
            )
        self.signal_name = signal.Signals(signum).name
        self._local.fill_(1.0)

    def stop_requested(self) -> bool:
        """Call once per step on every rank; True on all ranks at once (see the module doc)."""
        if self._group is None:
            return self.signal_name is not None
        agreed = False
        if self._pending is not None:
            self._pending.wait()
            agreed = bool(self._sent.item() > 0)
        self._sent.copy_(self._local)
        self._pending = dist.all_reduce(self._sent, group=self._group, async_op=True)
        return agreed

    def close(self, wait: bool = True) -> None:
        """Restore the handlers; with wait, first finish the outstanding all-reduce that every
        rank started. After an error on some rank there may be no matching all-reduce: pass
        wait=False then, or the other ranks would block until the collective timeout."""
        if wait and self._pending is not None:
            self._pending.wait()
        self._pending = None
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
