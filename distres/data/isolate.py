"""A file that crashes its decoder costs one sample, not the run.

Image decoders are C libraries, and some malformed files kill the process that decodes them
instead of raising (libpng under torchvision on a PNG whose data is shorter than its header says
dies with SIGSEGV). A DataLoader's worker that dies so ends the run. ``guarded`` iterates a
DataLoader and, when one of its workers dies by a signal, finds the file that did it by decoding
the files of the batches that were in flight one at a time in a throw-away forked process
(``probe``), excludes it (``decode.exclude``: from then on it is left out as any unreadable file,
named and counted), rebuilds the loader and goes on at the batch it stopped at. A run that met
the file so is the run told to exclude it from the start (--exclude-files), batch for batch.

torch's own check for dead workers is a SIGCHLD handler that raises in the main thread wherever
it happens to be (in the middle of a training step, even); ``_unwatch`` leaves the check to the
loader's next(), so that the death surfaces here. That next() looks at its workers only each time
its wait for a batch times out: every 5 s unless the DataLoader has a timeout of its own, so the
loaders are made with ``loader_options`` (a timeout of ``POLL_S``) and ``guarded`` waits again
after each timeout that found every worker alive.
"""

from __future__ import annotations

import faulthandler
import multiprocessing
import os
import signal
import time

from distres import dist
from distres.data import decode
from distres.data.sources import listed
from distres.errors import RankError, console

PREFETCH = 4  # batches each worker has in flight (the DataLoaders' prefetch_factor)
POLL_S = 0.1  # how often the main process, waiting for a batch, looks whether a worker died
CRASHED = "crashed the image decoder"
_TIMED_OUT = "DataLoader timed out"


def loader_options(workers: int) -> dict:
    """The DataLoader arguments that ``guarded`` relies on, for a loader with ``workers``."""
    if workers == 0:
        return {"num_workers": 0}
    return {"num_workers": workers, "prefetch_factor": PREFETCH, "timeout": POLL_S}


def worker_died(err: BaseException, it) -> bool:
    """Whether ``err``, raised by the DataLoader iterator ``it``, means one of its workers died:
    torch's message, or (when the worker died handing a batch over) the broken connection to it."""
    text = str(err)
    if isinstance(err, RuntimeError):
        return "DataLoader worker" in text and ("unexpectedly" in text or "signal" in text)
    workers = getattr(it, "_workers", ())
    deadline = time.monotonic() + 2.0  # (the connection can break a moment before the worker is gone)
    while workers and time.monotonic() < deadline:
        if any(not w.is_alive() for w in workers):
            return True
        time.sleep(0.02)
    return False


def _unwatch(it) -> None:
    from torch.utils.data._utils import signal_handling

    if getattr(it, "_worker_pids_set", False):
        signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False


def end_workers(it) -> None:
    """End the worker processes of the DataLoader iterator ``it`` (if any) now. Left to the
    garbage collector, which may tear down its queues first, each worker would end only at its
    next 5 s look at whether it is still wanted."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def guarded(make, files_of, decode_file, bad=None):
    """The batches of ``make(k)`` (a DataLoader over the batches from batch k on), the first
    one at ``make(0)``; ``files_of(k)``: the files of batch k (an empty list past the end);
    ``decode_file(path)``: how the workers decode a file. A worker killed by a signal: the
    culprit among the batches in flight is excluded, and ``make(k)`` continues the pass.
    ``bad``: the loader's ``BadSamples``, told of each culprit found."""
    k, loader = 0, make(0)
    it = iter(loader)
    _unwatch(it)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (RuntimeError, OSError, EOFError) as err:
            if _still_waiting(err, it):
                continue
            if not worker_died(err, it):
                raise
            death = _death(err, it)
            end_workers(it)
            _isolate(k, max(1, loader.num_workers) * PREFETCH, files_of, decode_file, bad, death)
            loader = make(k)
            it = iter(loader)
            _unwatch(it)
            continue
        k += 1
        yield batch


def _still_waiting(err: BaseException, it) -> bool:
    """Whether ``err`` is the loader's timeout (``POLL_S``) passing with no batch yet and every
    worker alive (torch looked at them before raising it): then the wait goes on."""
    if not (isinstance(err, RuntimeError) and str(err).startswith(_TIMED_OUT)):
        return False
    pinning = getattr(it, "_pin_memory_thread", None)
    if pinning is not None and not pinning.is_alive():  # (torch's own wait checks this, a timed one does not)
        raise RuntimeError("Pin memory thread exited unexpectedly") from err
    return True


def _death(err: BaseException, it) -> str:
    """torch's words for the worker's death, naming the signal where torch's words do not."""
    for worker in getattr(it, "_workers", ()):
        if worker.exitcode is not None and worker.exitcode < 0:
            return f"DataLoader worker (pid {worker.pid}) is killed by signal: {signal.strsignal(-worker.exitcode)}"
    return " ".join(str(err).split()).rstrip(". ")


def _isolate(k: int, ahead: int, files_of, decode_file, bad, death: str) -> None:
    """Exclude the file(s) of the first of batches k .. k + ahead - 1 that crash a decoder."""
    tried: list[str] = []
    for j in range(k, k + ahead):
        files = [f for f in files_of(j) if not decode.is_excluded(f)]
        if not files:
            break
        tried += files
        crashed = [(f, why) for f, why in probe(files, decode_file).items() if why.startswith(CRASHED)]
        for path, why in crashed:
            if bad is not None:
                bad.crashed(path, why)
            decode.exclude(path, f"{decode.EXCLUDED}: {why}")
            console(f"distres: {path} {why}; it is left out from now on, as an unreadable file")
        if crashed:
            return
    raise RankError(
        f"rank {dist.rank_from_env()}: a data loading worker died ({death}), and none of the {len(tried)} files it had in flight "
        f"({listed(tried)}) crashes a decoder alone; if it ran out of memory (dmesg names the OOM killer), lower "
        "--workers or --batch-size, or give the job more memory; if one of these files is to blame, list it in a "
        "file and pass --exclude-files FILE"
    )


def probe(paths: list[str], decode_file) -> dict[str, str]:
    """path -> why, for each of ``paths`` that ``decode_file`` rejects (its error) or that kills
    the process decoding it (``CRASHED``: by which signal), each decoded in a forked process
    that a crash costs nothing. The good files are left out of the answer."""
    ctx = multiprocessing.get_context("fork")
    found: dict[str, str] = {}
    rest = list(paths)
    while rest:
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_decode_each, args=(rest, decode_file, writer), daemon=True)
        child.start()
        writer.close()
        started = -1
        while True:
            try:
                msg = reader.recv()
            except EOFError:
                break
            if isinstance(msg, int):
                started = msg
            else:
                found[rest[started]] = msg
        child.join()
        reader.close()
        if child.exitcode == 0 or started < 0:
            break
        code = -child.exitcode if child.exitcode < 0 else None
        found[rest[started]] = f"{CRASHED} ({signal.Signals(code).name if code else 'exit ' + str(child.exitcode)})"
        rest = rest[started + 1 :]
    return found


def _decode_each(paths: list[str], decode_file, out) -> None:
    """In the forked child: announce each file, then decode it; its error, if any, follows."""
    faulthandler.disable()  # a crash here is the answer, not a report to print
    for i, path in enumerate(paths):
        out.send(i)
        try:
            decode_file(path)
        except Exception as e:  # noqa: BLE001 (any error is the file's answer, not the child's end)
            out.send(decode.describe(e))
    out.close()
    os._exit(0)  # no atexit work of the parent's, copied into this child


class Excluded:
    """The files that crashed a decoder, as a checkpoint part, so that a resumed run leaves them
    out too. Saving is a collective (``per_rank``: every rank's part is asked): the union of
    every rank's finds is saved, and from then on every rank excludes all of them."""

    per_rank = True

    def state_dict(self) -> dict[str, str]:
        mine = {path: why for path, why in decode.excluded().items() if CRASHED in why}
        union: dict[str, str] = {}
        for theirs in dist.gather_objects(mine):
            union.update(theirs)
        for path, why in union.items():
            decode.exclude(path, why)
        return union

    def load_state_dict(self, state: dict[str, str] | None) -> None:
        for path, why in (state or {}).items():
            decode.exclude(path, why)
