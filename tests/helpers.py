"""Helpers shared by the tests: run the real CLI (in this process, as a subprocess, or under
torchrun), read its outputs, and make small real data sets."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CIFAR10_TARBALL = Path(
    os.environ.get("DISTRES_CIFAR10_TARBALL", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz")
)

# Small, fast settings shared by the end-to-end tests: ResNet-18 on 32-px synthetic data, with
# the ImageNet stem (the CIFAR stem keeps 32x32 maps into the first stage: 16x the convolutions).
# No W&B: an offline run costs 1-3 s of CPU per training run (tests/test_wandb.py covers it).
# fp32 (--amp none): on CPUs without bf16 instructions (AVX2 only, as the 2-core test machines)
# bf16 autocast is emulated, several times slower per step (9x for this model and batch). The
# default bf16 path is tested end to end by the runs that keep it: conftest.folder_run (2 ranks),
# test_bad_data, the catalogue's run, test_checkpoint's amp mismatch, the real-data tests.
TINY = [
    "--arch",
    "resnet18",
    "--data",
    "synthetic",
    "--image-size",
    "32",
    "--cifar-stem",
    "off",
    "--synthetic-classes",
    "10",
    "--device",
    "cpu",
    "--no-progress",
    "--log-every",
    "1",
    "--wandb",
    "disabled",
    "--amp",
    "none",
]

# The shared 2-rank ImageFolder run (conftest.folder_run): its classes, images per class, and
# the --profile-steps window. 72 training images / (2 ranks x batch 4) = 9 steps per epoch, 2
# epochs; the 21 validation images split 11 + 10 over the ranks, batches 4+4+3 and 4+4+2.
FOLDER_RUN = {
    "classes": ("cat", "dog", "fox"),
    "train_per_class": 24,
    "val": {"cat": 7, "dog": 6, "fox": 8},
    "profile_steps": (3, 5),
    "steps": 18,
}

# What could point W&B elsewhere than the test's own folders (tests/test_wandb.py clears them).
WANDB_VARS = (
    "WANDB_API_KEY",
    "WANDB_MODE",
    "WANDB_DIR",
    "WANDB_CACHE_DIR",
    "WANDB_CONFIG_DIR",
    "WANDB_DATA_DIR",
    "WANDB_BASE_URL",
    "NETRC",
)


def cli_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.pop("WANDB_API_KEY", None)  # tests never reach a W&B server, whatever the machine has
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a rendezvous or a store)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_BUILT = []  # the data bundles the running test built (``closed_at_the_end``)


def closed_at_the_end(bundle):
    """``bundle`` (a ``data.DataBundle`` or a loader a test built), closed when the test ends, pass or fail
    (conftest): its loaders' worker processes end then, as a run's do, rather than whenever the
    garbage collector comes by, seconds later and in another test."""
    _BUILT.append(bundle)
    return bundle


def close_built() -> None:
    while _BUILT:
        _BUILT.pop().close()


def _update(environ, changes: dict) -> None:
    """Set each variable of ``changes`` in ``environ`` (as text); None unsets it."""
    for key, value in changes.items():
        if value is None:
            environ.pop(key, None)
        else:
            environ[key] = str(value)


def _train_cmd(args: list[str], nproc: int, extra_torchrun) -> list[str]:
    if nproc == 1 and not extra_torchrun:
        return [sys.executable, "-m", "distres.train", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *extra_torchrun,
        "-m",
        "distres.train",
        *args,
    ]


def run_train(
    args: list[str], nproc: int = 1, timeout: int = 300, extra_torchrun: list[str] = (), env: dict | None = None
):
    """Run distres.train as a user would; returns CompletedProcess (text). ``env``: variables
    to set on top of ``cli_env()`` (None as a value: unset)."""
    full = cli_env()
    _update(full, env or {})
    return subprocess.run(
        _train_cmd(args, nproc, extra_torchrun),
        cwd=REPO,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@dataclass
class Ran:
    """What a CLI run in this process gave: the fields of subprocess.CompletedProcess the tests read."""

    returncode: int
    stdout: str
    stderr: str


# The process-wide state a CLI's main may change: torch's thread count, deterministic algorithms
# and cuDNN/TF32 flags (engine.set_numerics), the RNGs, the environment (dist.init,
# profiling, tracking), the signal handlers (preempt.py), the process group and its store.
_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGINT")


@contextlib.contextmanager
def process_state():
    """Put back, on leaving, the process-wide state a CLI run in this process may have changed,
    so that a run here leaves the next test (and the test's own code) the process it found."""
    import random
    import signal

    import numpy as np
    import torch
    import torch.distributed as td

    from distres import dist

    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    threads = torch.get_num_threads()
    det = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    flags = (cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state())
    env, cwd = dict(os.environ), os.getcwd()
    handlers = {name: signal.getsignal(getattr(signal, name)) for name in _SIGNALS}
    store = dist._store
    dynamo_cache = _dynamo_cache_limit()
    try:
        yield
    finally:
        if td.is_available() and td.is_initialized():
            td.destroy_process_group()
        dist._store = store
        for name, handler in handlers.items():
            if handler is not None:
                signal.signal(getattr(signal, name), handler)
        os.chdir(cwd)
        for key in set(os.environ) - set(env):
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        torch.set_rng_state(rng[0])
        random.setstate(rng[1])
        np.random.set_state(rng[2])
        cudnn.benchmark, cudnn.deterministic, cudnn.allow_tf32, matmul.allow_tf32 = flags
        torch.use_deterministic_algorithms(det[0], warn_only=det[1])
        torch.set_num_threads(threads)
        if dynamo_cache is not None:
            torch._dynamo.config.cache_size_limit = dynamo_cache
        from distres.data import decode

        decode.configure()  # the pixel limit and the excluded files a run set


def _dynamo_cache_limit():
    """torch._dynamo's cache size limit if dynamo is loaded (models.py raises it for --compile)."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo.config.cache_size_limit if dynamo is not None else None


def run_here(main, argv: list[str]) -> Ran:
    """Run a CLI's ``main(argv)`` in this process, as its command line would (no launcher
    variables, the repository as the working directory, OMP_NUM_THREADS=1 unless set, no W&B
    key), with its stdout, stderr and warnings captured; the process-wide state it changes is put
    back afterwards (``process_state``). An exception that escapes ``main`` becomes status 1
    with its traceback in stderr, as for the command; a Ctrl-C stops the tests. Costs no
    interpreter and torch start-up: for runs where a separate process adds nothing (no signal,
    restart, launcher or rlimit)."""
    out, err = io.StringIO(), io.StringIO()
    with process_state(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        for name in _LAUNCHER_VARS:
            os.environ.pop(name, None)
        os.environ.pop("WANDB_API_KEY", None)
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        os.chdir(REPO)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = _status(main, argv)
    text = err.getvalue() + "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno) for w in caught)
    if code == 130:  # the CLI turned a Ctrl-C into its status: stop the test session, as the user asked
        raise KeyboardInterrupt
    return Ran(code, out.getvalue(), text)


def _status(main, argv: list[str]) -> int:
    """``main(argv)``'s exit status as its command's: an exception that escapes it is status 1,
    with its traceback in stderr."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except Exception:
        traceback.print_exc()
        return 1


def train_here(args: list[str]) -> Ran:
    """``python -m distres.train *args`` run in this process (``run_here``)."""
    from distres import train

    return run_here(train.main, list(args))


def train_ranks(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None) -> Ran:
    """``python -m distres.train *args`` as ``nproc`` ranks of one job (``run_ranks``)."""
    from distres import train

    return run_ranks(train.main, args, nproc, timeout, env)


def run_ranks(
    main,
    args: list[str],
    nproc: int = 2,
    timeout: int = 300,
    env: dict | None = None,
    cwd: Path = REPO,
    console: bool = False,
) -> Ran:
    """A CLI's ``main(args)`` as ``nproc`` ranks of one job (gloo, rendezvous at
    MASTER_ADDR:MASTER_PORT, as under torchrun --standalone), each a process forked from this
    one: real processes and collectives, without an interpreter and torch start-up per rank (5 s
    of CPU on the 2-core test machines). Their stdout and stderr, rank after rank, as torchrun
    passes them on; the first failing rank's status, the others stopped as torchrun stops them.
    Each rank computes on one thread (``_rank_main``). For runs where torchrun itself (restarts,
    signals, its own environment) is not under test. They run in ``cwd``. ``console``: the ranks
    write to one stdout and one stderr, interleaved as they write, as torchrun's workers share
    the console it was started from."""
    return start_ranks(main, args, nproc, env, cwd, console).wait(timeout)


def start_ranks(
    main, args: list[str], nproc: int = 2, env: dict | None = None, cwd: Path = REPO, console: bool = False
) -> Ranks:
    """``run_ranks``'s ranks, started and left running."""
    port = free_port()  # for rank 0's store
    launches = []
    for rank in range(nproc):
        launch = {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": nproc, "LOCAL_WORLD_SIZE": nproc}
        launches.append({**launch, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, **(env or {})})
    return _fork(main, args, launches, cwd, console=console)


def start_one(main, args: list[str], setup=None) -> Ranks:
    """``main(args)`` as one process forked from this one, as its plain command would run (no
    launcher variables), left running: for a run that takes a signal, or a resource limit
    (``setup()`` runs in the process first). Like a forked rank it computes on one thread, so
    training commands need ``--threads 1`` (``_rank_main``)."""
    return _fork(main, args, [dict.fromkeys(_LAUNCHER_VARS)], REPO, setup)


_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _fork(main, args: list[str], launches: list[dict], cwd: Path, setup=None, console: bool = False) -> Ranks:
    import gc
    import multiprocessing
    import tempfile

    # Garbage an earlier test left can hold a process group (a DDP model's reducer): collected
    # in a forked child, its destructor would wait forever for gloo threads only this process has.
    gc.collect()
    ranks = Ranks([], Path(tempfile.mkdtemp(prefix="ranks-")), console)
    ctx = multiprocessing.get_context("fork")
    for rank, launch in enumerate(launches):
        proc = ctx.Process(target=_rank_main, args=(main, list(args), launch, ranks.log(rank), cwd, setup))
        proc.start()
        ranks.procs.append(proc)
    return ranks


@dataclass
class Ranks:
    """Forked ranks of one job (``start_ranks``): their processes and the folder of their logs."""

    procs: list
    logs: Path
    console: bool = False  # one stdout and one stderr for all

    def log(self, rank: int) -> Path:
        """Where this rank's output goes: LOG.out and LOG.err."""
        return self.logs / ("console" if self.console else str(rank))

    def stderr(self, rank: int) -> str:
        return Path(f"{self.log(rank)}.err").read_text()

    def wait(self, timeout: float) -> Ran:
        """Their end (as torchrun ends them: the others within 5 s of a failure, all at the
        timeout) and what they printed; the logs are removed."""
        import time

        deadline = time.monotonic() + timeout
        while any(p.is_alive() for p in self.procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for p in self.procs):
                deadline = min(deadline, time.monotonic() + 5)
            time.sleep(0.05)
        for p in self.procs:
            if p.is_alive():
                p.kill()
            p.join()
        failures = [p.exitcode for p in self.procs if p.exitcode not in (0, -signal.SIGKILL)]
        code = failures[0] if failures else (124 if any(p.exitcode for p in self.procs) else 0)  # 124: as timeout(1)
        logs = dict.fromkeys(self.log(r) for r in range(len(self.procs)))
        out = "".join(Path(f"{log}.out").read_text() for log in logs)
        err = "".join(Path(f"{log}.err").read_text() for log in logs)
        shutil.rmtree(self.logs, ignore_errors=True)
        return Ran(code, out, err)


def _rank_main(main, argv: list[str], launch: dict, log: Path, cwd: Path, setup=None) -> None:
    """In a forked rank: the launcher's environment, stdout and stderr to files, the CLI's
    status as the process's, and none of this (pytest's) process's exit handlers."""
    code = 1
    try:
        # The environment of the tests' commands (``cli_env``) and the launcher's. One thread,
        # as torchrun's default OMP_NUM_THREADS=1 gives its workers, set here since this process
        # started with pytest. More would hang: a forked child cannot use the OpenMP thread pool
        # it inherits (its first parallel region waits for threads it lacks).
        env = cli_env()
        _update(env, {**launch, "OMP_NUM_THREADS": 1})
        os.environ.clear()
        os.environ.update(env)
        import torch

        torch.set_num_threads(1)
        os.chdir(cwd)
        for fd, suffix in ((1, ".out"), (2, ".err")):
            # appended to, as a console is: ranks sharing the file interleave their writes
            os.dup2(os.open(f"{log}{suffix}", os.O_WRONLY | os.O_CREAT | os.O_APPEND), fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)
        sys.stderr = open(2, "w", buffering=1, closefd=False)
        warnings.showwarning = warnings._showwarning_orig  # not pytest's recorder
        if setup is not None:
            setup()
        code = _status(main, argv)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code or 0)


def start_train(args: list[str], nproc: int = 1, extra_torchrun: list[str] = (), log: Path | None = None):
    """Start distres.train in the background (stdout+stderr to log); returns the Popen."""
    out = open(log, "w") if log else subprocess.DEVNULL
    return subprocess.Popen(
        _train_cmd(args, nproc, extra_torchrun),
        cwd=REPO,
        env=cli_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
        text=True,
    )


def one_error_line(stderr: str) -> str:
    """The one 'distres: error: ...' line of a failed command's stderr (no traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [ln for ln in stderr.splitlines() if ln.startswith("distres: error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def wait_for(condition, timeout: float, what: str, poll: float = 0.05):
    """Poll condition() until it returns something truthy; fail the test after timeout."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(out_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(out_dir) if r["kind"] == "train"]


def make_imagefolder(
    root: Path, counts: dict[str, dict[str, int]], size: int = 32, seed: int = 0, chroma_444: bool = False
) -> Path:
    """Write a tiny ImageFolder of real JPEG files: counts[split][class] = number of images.
    ``chroma_444``: without chroma subsampling (PIL, quality 90) instead of torchvision's 4:2:0,
    where decoders that upsample chroma differently (nvJPEG, libjpeg-turbo) give other pixels."""
    import torch
    from PIL import Image
    from torchvision.io import encode_jpeg

    g = torch.Generator().manual_seed(seed)
    for split, classes in counts.items():
        for cls, n in classes.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 256, (3, size, size), generator=g, dtype=torch.uint8)
                if chroma_444:
                    Image.fromarray(img.permute(1, 2, 0).numpy()).save(
                        folder / f"{i:04d}.jpg", quality=90, subsampling=0
                    )
                else:
                    (folder / f"{i:04d}.jpg").write_bytes(encode_jpeg(img).numpy().tobytes())
    return root


def break_jpeg(path: Path, how: str) -> Path:
    """Damage a JPEG file in place as real data sets get damaged: 'truncated' (a cut-off
    download) keeps the first 300 bytes; 'corrupt' keeps the length and a valid-looking frame
    header but points the scan at a component that does not exist, so every decoder fails."""
    data = bytearray(path.read_bytes())
    if how == "truncated":
        data = data[:300]
    else:
        sos = data.index(b"\xff\xda")
        data[sos + 5] = 0x77  # the first scan component's id
    path.write_bytes(bytes(data))
    return path


def count_allreduces(ddp) -> list:
    """Give a DDP module (in a process group of one) a comm hook that counts its gradient
    all-reduces and passes the bucket through; the list grows by one per all-reduce."""
    import torch

    calls = []

    def count(state, bucket):
        calls.append(1)
        fut = torch.futures.Future()
        fut.set_result(bucket.buffer())
        return fut

    ddp.register_comm_hook(None, count)
    return calls
