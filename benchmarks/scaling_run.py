"""Scaling benchmark, part 1: plan the runs (which units, how many processes) and launch each
one as a real ``torchrun ... -m distres.train``, returning its metrics records.

benchmarks/scaling.py is the command line; scaling_analyse.py turns the records into figures.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from distres.errors import UserError

REPO = Path(__file__).resolve().parents[1]
UNITS = ("cpu1", "cpuN", "gpu1", "gpuN", "nodes")


@dataclass
class Unit:
    name: str
    device: str  # cpu | cuda
    nproc: int  # processes per node
    nnodes: int = 1
    hardware: int = 1  # what efficiency is per: CPU cores for CPU runs, GPUs for GPU runs
    label: str = ""

    @property
    def world(self) -> int:
        return self.nproc * self.nnodes

    @property
    def ref(self) -> str:
        """The 1-unit run that this one's efficiency is measured against."""
        return "gpu1" if self.device == "cuda" else "cpu1"


@dataclass
class Slurm:
    nnodes: int
    job_id: str
    head: str
    cpus_per_node: int


def slurm_allocation() -> Slurm | None:
    # Deliberately read here rather than through distres.dist: this is the benchmark driver
    # on the batch host, planning a multi-node run over the allocation, not a training rank.
    env = os.environ
    if int(env.get("SLURM_NNODES", "1") or 1) < 2 or "SLURM_JOB_ID" not in env:
        return None
    hosts = subprocess.run(
        ["scontrol", "show", "hostnames", env["SLURM_JOB_NODELIST"]], capture_output=True, text=True, check=True
    ).stdout.split()
    # srun does not pass sbatch's --cpus-per-task on to its steps (SLURM >= 22.05): say it again.
    cpus = env.get("SLURM_CPUS_PER_TASK") or env.get("SLURM_CPUS_ON_NODE") or "0"
    return Slurm(int(env["SLURM_NNODES"]), env["SLURM_JOB_ID"], hosts[0], int(cpus))


def default_units(gpus: int, slurm: Slurm | None) -> list[str]:
    names = ["cpu1", "cpuN"]
    if gpus >= 1:
        names.append("gpu1")
    if gpus >= 2:
        names.append("gpuN")
    if slurm is not None:
        names.append("nodes")
    return names


def plan(names: list[str], cpu_procs: int, gpus: int, slurm: Slurm | None) -> list[Unit]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if cpu_procs > cores:
        raise UserError(f"--cpu-procs {cpu_procs} is more than the {cores} cores available; lower it")
    units = []
    for name in names:
        if name == "gpuN" and gpus == 1:
            print("scaling: gpuN skipped: one GPU visible (gpu1 is that run)", file=sys.stderr, flush=True)
        else:
            units.append(_unit(name, cpu_procs, gpus, slurm, cores))
    return units


def _unit(name: str, cpu_procs: int, gpus: int, slurm: Slurm | None, cores: int) -> Unit:
    # Both CPU runs use every core (cpu1 with one thread per core, cpuN with its share per
    # rank): on the same hardware, their ratio is what N gloo ranks cost or gain. Pinning
    # cpu1 to fewer cores instead would tie it to cores that other work may be using.
    if name == "cpu1":
        return Unit("cpu1", "cpu", 1, hardware=cores, label=f"CPU, 1 process, {cores} cores")
    if name == "cpuN":
        return Unit("cpuN", "cpu", cpu_procs, hardware=cores, label=f"CPU, {cpu_procs} processes (gloo), {cores} cores")
    if name in ("gpu1", "gpuN"):
        if gpus < 1:
            raise UserError(f"--units {name} needs a CUDA GPU and none is visible; drop {name} or run on a GPU node")
        n = 1 if name == "gpu1" else gpus
        return Unit(name, "cuda", n, hardware=n, label=f"{n} GPU{'s' * (n > 1)} (nccl)")
    if name == "nodes":
        if slurm is None:
            raise UserError(
                "--units nodes needs a SLURM allocation of 2 or more nodes (sbatch --nodes 2 ... slurm/scaling.sbatch)"
            )
        dev, per = ("cuda", gpus) if gpus else ("cpu", cpu_procs)
        label = f"{slurm.nnodes} nodes x {per} {'GPUs' if gpus else 'CPU processes'}"
        hardware = slurm.nnodes * (gpus or slurm.cpus_per_node or cores)
        return Unit("nodes", dev, per, nnodes=slurm.nnodes, hardware=hardware, label=label)
    raise UserError(f"unknown unit {name!r} in --units; choose from {', '.join(UNITS)} or auto")


def train_args(a, unit: Unit, out: Path) -> list[str]:
    """distres.train's flags for one run: warm-up windows, then the measured ones (twice as many
    for N > 1, where every other window skips the all-reduce: --bench-comm-probe)."""
    windows = a.warmup_windows + a.windows * (2 if unit.world > 1 else 1)
    steps = windows * a.window
    args = ["--arch", a.arch, "--batch-size", str(a.batch_size), "--amp", a.amp, "--data", a.data]
    args += ["--device", unit.device, "--max-steps", str(steps), "--log-every", str(a.window)]
    # Only the training loop is measured: no checkpoint, evaluation, progress bar or W&B per run.
    args += ["--checkpoint-every", "0", "--eval-every", "0", "--no-progress", "--wandb", "disabled"]
    args += ["--output-dir", str(out)]
    if a.image_size:
        args += ["--image-size", str(a.image_size)]
    if a.data_dir:
        args += ["--data-dir", a.data_dir]
    if a.data == "synthetic":
        # One epoch holds every step: no epoch end (checkpoint, verdict) inside the windows.
        classes = "10" if (a.image_size or 224) <= 64 else "1000"
        samples = str(steps * a.batch_size * unit.world)
        args += ["--epochs", "1", "--synthetic-samples", samples, "--synthetic-classes", classes]
    else:
        args += ["--epochs", "1000"]  # --max-steps stops it; windows at epoch ends are dropped
    if unit.world > 1:
        args.append("--bench-comm-probe")
    return args + list(a.train_args)


def command(a, unit: Unit, out: Path, slurm: Slurm | None) -> list[str]:
    run = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={unit.nproc}"]
    if unit.nnodes == 1:
        run.append("--standalone")
    else:
        run = [
            "srun",
            f"--nodes={unit.nnodes}",
            f"--ntasks={unit.nnodes}",
            "--ntasks-per-node=1",
            *([f"--cpus-per-task={slurm.cpus_per_node}"] if slurm.cpus_per_node else []),
            *run,
            f"--nnodes={unit.nnodes}",
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={slurm.head}:29511",
            f"--rdzv-id=distres-scaling-{slurm.job_id}",
        ]
    return run + ["-m", "distres.train", *train_args(a, unit, out)]


def kill_group(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    """SIGTERM to the process group (torchrun passes it on and waits), SIGKILL after grace_s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_unit(a, unit: Unit, work: Path, slurm: Slurm | None) -> tuple[list[dict], dict]:
    """One run, to its end: its metrics records and how long it took under what load."""
    out = work / unit.name
    if out.exists():
        raise UserError(f"{out} exists; choose a new --work-dir")
    out.mkdir(parents=True)
    cmd = command(a, unit, out, slurm)
    shown = " ".join(cmd[1:] if cmd[0] == sys.executable else cmd)
    print(f"scaling: {unit.name} ({unit.label}): {shown}", file=sys.stderr, flush=True)
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    log = out / "train.log"
    _run_logged(cmd, log, a.timeout, unit.name)
    secs = time.perf_counter() - t0
    print(f"scaling: {unit.name} done in {secs:.0f} s", file=sys.stderr, flush=True)
    # Other work on the machine skews CPU numbers: keep the load beside them.
    info = {"seconds": round(secs, 1), "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], info


def _run_logged(cmd: list[str], log: Path, timeout: int, name: str) -> None:
    """Run cmd with its output in log; a failure is a UserError naming its first distres error."""
    # The run starts in the caller's folder, so relative paths (--data-dir, --work-dir, --config
    # after --) mean the same to it as to this script. PYTHONPATH finds this checkout's distres
    # from there, installed or not; PYTHONSAFEPATH keeps `-m` from putting the folder first,
    # where another checkout's distres/ would shadow it.
    # (An empty PYTHONPATH entry would mean the current folder again: none is added.)
    path = os.pathsep.join(x for x in (str(REPO), os.environ.get("PYTHONPATH")) if x)
    env = dict(os.environ, PYTHONPATH=path, PYTHONSAFEPATH="1")
    with open(log, "w") as f:
        # Its own process session: on a timeout the whole group goes (torchrun and its workers),
        # or orphaned workers would hold the GPU through the next run.
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise UserError(f"the {name} run took longer than --timeout {timeout} s; log: {log}") from None
        except KeyboardInterrupt:  # (the run has its own session: Ctrl-C or timeout -s INT reach only us)
            kill_group(proc)
            raise
    if proc.returncode != 0:
        errors = [x for x in log.read_text().splitlines() if x.startswith("distres: error:")]
        why = errors[0].removeprefix("distres: error: ") if errors else f"exit status {proc.returncode}"
        raise UserError(f"the {name} run failed: {why}; log: {log}")
