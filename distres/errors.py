"""User-facing errors and the console.

Every mistake a user can make (bad flag, missing data, impossible batch split) raises
``UserError``; each CLI's ``main`` turns it into one line on stderr (``distres: error: ...``)
and exit status 2, without a traceback. ``ArgumentParser`` does the same for argparse's own
errors, and ``console`` is how every module prints a line for the user.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input; the message names the problem and the fix."""


class RankError(UserError):
    """A UserError that only some ranks may meet (a bad file in their shard, a missing GPU).
    Errors every rank meets are printed by rank 0 alone; these by the rank that raises them,
    or the user would see only the launcher's "child failed"."""


EXIT_USER_ERROR = 2
# EX_TEMPFAIL from sysexits.h: "try again later". A SIGTERM/SIGUSR1 stopped the run after a
# checkpoint; slurm/train.sbatch turns this status into `scontrol requeue`.
EXIT_PREEMPTED = 75
EXIT_INTERRUPTED = 130  # Ctrl-C, as a shell reports it (128 + SIGINT)


class Preempted(Exception):
    """Raised on every rank once all ranks agreed to stop on a signal and the checkpoint is saved."""

    def __init__(self, signal_name: str, message: str):
        super().__init__(message)
        self.signal_name = signal_name


def format_error(err: BaseException) -> str:
    # One line, always: a multi-line message would be cut by log scrapers and SLURM mails.
    return "distres: error: " + " ".join(str(err).split())


def print_error(err: BaseException, rank: int = 0) -> None:
    """``format_error``'s line on stderr, in one write (lines of several ranks never mix).

    It starts a line of its own: rank 0's progress bar is a line without its newline (tqdm ends
    it only when the bar closes), and another rank's error comes while it is on the console the
    ranks share (torchrun's, srun's), which would glue it to the bar's end. Rank 0's own bar has
    closed by the time its error is printed; a bar still open in this process (any rank) counts
    too. The cost, where no bar was there: one empty line before the error."""
    line = format_error(err) + "\n"
    if rank != 0 or _open_bar():
        line = "\n" + line
    sys.stderr.write(line)
    sys.stderr.flush()


def _open_bar() -> bool:
    """Whether a tqdm bar of this process is drawn on the console (enabled and not closed)."""
    tqdm = sys.modules.get("tqdm")
    return tqdm is not None and any(not getattr(bar, "disable", True) for bar in list(tqdm.tqdm._instances))


def console(msg: str) -> None:
    """A line for the user, on stderr (stdout stays free for what a command outputs)."""
    print(msg, file=sys.stderr, flush=True)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each option's default, unless its help already says what the default is
    (or the option is required: it has none)."""

    def _get_help_string(self, action):
        text = action.help or ""
        return text if action.required or "default" in text else super()._get_help_string(action)


BOUNDS = {"at_least": ">=", "above": ">", "at_most": "<=", "below": "<"}


def out_of_range(name: str, value, rules) -> str | None:
    """The one-line error for a number outside its declared range (None: inside, or no range).
    ``rules``: ``at_least``/``above`` (the lower bound, inclusive/exclusive), ``at_most``/
    ``below`` (the upper), ``error`` (the message, with {value}, where a bound needs more words)."""
    bounds = {op: rules[k] for k, op in BOUNDS.items() if k in rules}
    if not bounds or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    tests = {">=": lambda b: value >= b, ">": lambda b: value > b, "<=": lambda b: value <= b, "<": lambda b: value < b}
    if math.isfinite(value) and all(tests[op](b) for op, b in bounds.items()):
        return None
    if "error" in rules:
        return rules["error"].format(value=f"{value:g}" if isinstance(value, float) else value)
    return f"{name} must be {' and '.join(f'{op} {b}' for op, b in bounds.items())} (got {value})"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the one-line error instead of a usage dump (the CLI's main prints it), the
    defaults in --help, and numbers checked against their ranges (``add_number``)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.ranges: dict[str, tuple[str, dict]] = {}  # dest -> (flag, rules)

    def add_number(self, name: str, type, default, help: str, **rules):
        """An int or float option and its range (``out_of_range``'s rules)."""
        action = self.add_argument(name, type=type, default=default, help=help)
        self.ranges[action.dest] = (name, rules)
        return action

    def parse_args(self, args=None, namespace=None):
        parsed = super().parse_args(args, namespace)
        for dest, (name, rules) in self.ranges.items():
            value = getattr(parsed, dest)
            error = out_of_range(name, value, rules) if value is not None else None
            if error:
                raise UserError(error)
        return parsed

    def error(self, message: str):
        raise UserError(f"{message}; see {self.prog} --help")


# How gloo says that the process at the other end of a connection is gone.
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe")


def _worker_death(err: BaseException | None) -> str | None:
    """torch's words for a dead DataLoader worker (None: not that). When the worker's SIGCHLD
    arrives while the main thread waits on the data queue, the handler's error ("... is killed by
    signal: Killed") is caught there and becomes the cause of a vaguer one ("... exited
    unexpectedly"): the innermost of the chain names the signal."""
    words = None
    while isinstance(err, RuntimeError):
        text = " ".join(str(err).split())
        if not text.startswith("DataLoader worker"):
            break
        words, err = text.rstrip(". "), err.__cause__
    return words


def process_death(err: BaseException, rank: int) -> RankError | None:
    """A process this one depended on died, as this rank's one-line error (None: not that):
    a DataLoader worker (torch raises it from a SIGCHLD handler, in whatever the main thread
    was running, so only the CLI's outermost handler catches it everywhere), or another rank of
    the job (its collective fails here)."""
    worker = _worker_death(err)
    if worker is not None:
        return RankError(
            f"rank {rank}: a data loading worker died ({worker}); if it ran out of memory "
            "(dmesg names the OOM killer), lower --workers or --batch-size, or give the job more memory"
        )
    if not isinstance(err, RuntimeError):
        return None
    text = " ".join(str(err).split())
    lost = next((what for what in LOST_PEER if what in text), None)
    if lost is not None:
        return RankError(
            f"rank {rank}: another process of the job went away during a collective ({lost}); its "
            "own log says why (the launcher restarts the job with --max-restarts)"
        )
    return None


def run_cli(
    body: Callable[[], int | None], rank: Callable[[], int] = lambda: 0, cleanup: Callable[[], None] | None = None
) -> int:
    """A CLI's exit status: ``body``'s (0 for None); a user mistake is one line on stderr (from
    rank 0 only, unless only some ranks meet it) and status 2, a preemption status 75."""
    try:
        try:
            return body() or 0
        except RuntimeError as e:
            died = process_death(e, rank())
            if died is None:
                raise
            raise died from None
    except UserError as e:
        if rank() == 0 or isinstance(e, RankError):
            print_error(e, rank())
        return EXIT_USER_ERROR
    except Preempted as e:
        if rank() == 0:
            print(e, file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED if e.signal_name == "SIGINT" else EXIT_PREEMPTED
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    finally:
        if cleanup is not None:
            cleanup()
