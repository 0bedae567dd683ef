"""Scaling benchmark: CPU 1 process, CPU N processes (gloo), 1 GPU, N GPUs, several nodes.

Each configuration is a real training run, ``python -m torch.distributed.run ... -m
distres.train``, whose metrics.jsonl this script reads back. Per configuration: steady-state
images/s in total and per rank (the median over logged windows after the warm-up ones, so
start-up and torch.compile are excluded), the step-time breakdown (waiting for data, compute,
and for N > 1 the exposed communication), the scaling efficiency against the 1-unit run of
the same kind, and peak memory. Exposed communication is measured with ``--bench-comm-probe``:
every other window skips the gradient all-reduce (DDP ``no_sync``), and the exposed time is the
difference of the step time between synced and unsynced windows (on CUDA the probe also waits
for the GPU after every step, so that the host clock times the GPU's work).

Beside the measured rows it prints projected ones (benchmarks/allreduce_model.py) for NVLink,
PCIe and InfiniBand. Writes NAME.json, NAME.md and NAME.png into --out and logs them to W&B as
one run (offline unless an API key is configured).

    python benchmarks/scaling.py --quick                             # 2-3 min on a 2-core CPU
    python benchmarks/scaling.py --units cpu1,cpuN,gpu1,gpuN --arch resnet50 --batch-size 256 \\
        --data cifar10 --data-dir .cache/data/cifar10                # a GPU node
    sbatch --nodes 2 --gpus-per-node 8 slurm/scaling.sbatch          # adds the multi-node run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import allreduce_model, machine_info  # noqa: E402
from distres import config  # noqa: E402
from distres.errors import EXIT_USER_ERROR, ArgumentParser, UserError, format_error  # noqa: E402
from distres.host import available_cpus  # noqa: E402

UNITS = ("cpu1", "cpuN", "gpu1", "gpuN", "nodes")
QUICK = {
    "units": "cpu1,cpuN",
    "arch": "resnet18",
    "batch_size": 32,
    "data": "synthetic",
    "image_size": 32,
    "window": 5,
    "warmup_windows": 2,
    "windows": 6,
}


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


def plan(names: list[str], cpu_procs: int, gpus: int, slurm: Slurm | None) -> list[Unit]:
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if cpu_procs > len(cores):
        raise UserError(f"--cpu-procs {cpu_procs} is more than the {len(cores)} cores available; lower it")
    units = []
    for name in names:
        # Both CPU runs use every core (cpu1 with one thread per core, cpuN with its share per
        # rank): on the same hardware, their ratio is what N gloo ranks cost or gain. Pinning
        # cpu1 to fewer cores instead would tie it to cores that other work may be using.
        if name == "cpu1":
            units.append(Unit("cpu1", "cpu", 1, hardware=len(cores), label=f"CPU, 1 process, {len(cores)} cores"))
        elif name == "cpuN":
            units.append(
                Unit(
                    "cpuN",
                    "cpu",
                    cpu_procs,
                    hardware=len(cores),
                    label=f"CPU, {cpu_procs} processes (gloo), {len(cores)} cores",
                )
            )
        elif name == "gpuN" and gpus == 1:
            print("scaling: gpuN skipped: one GPU visible (gpu1 is that run)", file=sys.stderr, flush=True)
        elif name in ("gpu1", "gpuN"):
            if gpus < 1:
                raise UserError(
                    f"--units {name} needs a CUDA GPU and none is visible; drop {name} or run on a GPU node"
                )
            n = 1 if name == "gpu1" else gpus
            units.append(Unit(name, "cuda", n, hardware=n, label=f"{n} GPU{'s' * (n > 1)} (nccl)"))
        elif name == "nodes":
            if slurm is None:
                raise UserError(
                    "--units nodes needs a SLURM allocation of 2 or more nodes "
                    "(sbatch --nodes 2 ... slurm/scaling.sbatch)"
                )
            dev, per = ("cuda", gpus) if gpus else ("cpu", cpu_procs)
            units.append(
                Unit(
                    "nodes",
                    dev,
                    per,
                    nnodes=slurm.nnodes,
                    hardware=slurm.nnodes * (gpus or slurm.cpus_per_node or len(cores)),
                    label=f"{slurm.nnodes} nodes x {per} {'GPUs' if gpus else 'CPU processes'}",
                )
            )
        else:
            raise UserError(f"unknown unit {name!r} in --units; choose from {', '.join(UNITS)} or auto")
    return units


def default_units(gpus: int, slurm: Slurm | None) -> list[str]:
    names = ["cpu1", "cpuN"]
    if gpus >= 1:
        names.append("gpu1")
    if gpus >= 2:
        names.append("gpuN")
    if slurm is not None:
        names.append("nodes")
    return names


def train_args(a, unit: Unit, out: Path) -> list[str]:
    windows = a.warmup_windows + a.windows * (2 if unit.world > 1 else 1)
    steps = windows * a.window
    args = [
        "--arch",
        a.arch,
        "--batch-size",
        str(a.batch_size),
        "--amp",
        a.amp,
        "--data",
        a.data,
        "--device",
        unit.device,
        "--max-steps",
        str(steps),
        "--log-every",
        str(a.window),
        "--checkpoint-every",
        "0",
        "--eval-every",
        "0",
        "--no-progress",
        "--wandb",
        "disabled",
        "--output-dir",
        str(out),
    ]
    if a.image_size:
        args += ["--image-size", str(a.image_size)]
    if a.data_dir:
        args += ["--data-dir", a.data_dir]
    if a.data == "synthetic":
        # One epoch holds every step: no epoch end (checkpoint, verdict) inside the windows.
        size = a.image_size or 224
        args += [
            "--epochs",
            "1",
            "--synthetic-samples",
            str(steps * a.batch_size * unit.world),
            "--synthetic-classes",
            "10" if size <= 64 else "1000",
        ]
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
    out = work / unit.name
    if out.exists():
        raise UserError(f"{out} exists; choose a new --work-dir")
    out.mkdir(parents=True)
    cmd = command(a, unit, out, slurm)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = out / "train.log"
    print(
        f"scaling: {unit.name} ({unit.label}): {' '.join(cmd[1:] if cmd[0] == sys.executable else cmd)}",
        file=sys.stderr,
        flush=True,
    )
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    with open(log, "w") as f:
        # Its own process session: on a timeout the whole group goes (torchrun and its workers),
        # or orphaned workers would hold the GPU through the next run.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            proc.wait(timeout=a.timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise UserError(f"the {unit.name} run took longer than --timeout {a.timeout} s; log: {log}") from None
    if proc.returncode != 0:
        errors = [x for x in log.read_text().splitlines() if x.startswith("distres: error:")]
        why = errors[0].removeprefix("distres: error: ") if errors else f"exit status {proc.returncode}"
        raise UserError(f"the {unit.name} run failed: {why}; log: {log}")
    secs = time.perf_counter() - t0
    print(f"scaling: {unit.name} done in {secs:.0f} s", file=sys.stderr, flush=True)
    # Other work on the machine skews CPU numbers: keep the load beside them.
    info = {"seconds": round(secs, 1), "load_avg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]}
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], info


def analyse(records: list[dict], window: int, warmup: int) -> dict:
    """Steady-state figures from one run's metrics records (pure; see the module docstring)."""
    train = [r for r in records if r["kind"] == "train"]
    clean, prev = [], {"step": 0, "epoch": 0.0}
    for i, r in enumerate(train):
        after_epoch_end = prev["epoch"] > 0 and float(prev["epoch"]).is_integer()  # loader restart
        if i >= warmup and r["step"] - prev["step"] == window and not after_epoch_end:
            clean.append(r)
        prev = r
    synced = [r for r in clean if r.get("synced", True)]
    unsynced = [r for r in clean if r.get("synced") is False]
    if not synced:
        raise UserError(f"no steady-state window in {len(train)} logged windows; raise --windows")
    step_time = statistics.median(r["step_time"] for r in synced)
    wait = statistics.median(r["step_time"] * r["data_wait_frac"] for r in synced)
    comm_raw = None
    if unsynced:  # whole step times: on a GPU the host clock only sees a step as a whole
        comm_raw = step_time - statistics.median(r["step_time"] for r in unsynced)
    exposed = max(0.0, comm_raw or 0.0)
    return {
        "images_per_sec": statistics.median(r["images_per_sec"] for r in synced),
        "step_ms": 1e3 * step_time,
        "data_wait_ms": 1e3 * wait,
        "compute_ms": 1e3 * max(0.0, step_time - wait - exposed),
        "exposed_comm_ms": 1e3 * exposed,
        "comm_delta_ms": None if comm_raw is None else 1e3 * comm_raw,
        "nosync_images_per_sec": statistics.median(r["images_per_sec"] for r in unsynced) if unsynced else None,
        "peak_mem_mb": max(r.get("peak_mem_mb", 0.0) for r in train),
        "windows": len(synced),
        "nosync_windows": len(unsynced),
        "window_images_per_sec": [round(r["images_per_sec"], 1) for r in synced],
    }


def with_efficiency(rows: list[dict]) -> list[dict]:
    """Efficiency = throughput per unit of hardware (core or GPU) / the 1-process run's;
    x_cpu = total / the best CPU total."""
    by_name = {r["name"]: r for r in rows}
    best_cpu = max((r["images_per_sec"] for r in rows if r["device"] == "cpu"), default=None)
    for r in rows:
        ref = by_name.get(r["ref"])
        r["images_per_sec_per_rank"] = r["images_per_sec"] / r["world"]
        r["efficiency"] = (
            (r["images_per_sec"] / r["hardware"]) / (ref["images_per_sec"] / ref["hardware"]) if ref else None
        )
        r["x_cpu"] = r["images_per_sec"] / best_cpu if best_cpu else None
    return rows


def gradient_param_bytes(cfg) -> list[int]:
    """fp32 gradient bytes per parameter of the runs' model, in registration order (DDP
    all-reduces fp32 gradients whatever the autocast dtype)."""
    from distres import models

    if cfg.data.dataset == "synthetic":
        classes = cfg.synthetic_classes
    elif cfg.data.dataset == "cifar10":
        classes = 10
    else:
        classes = sum(d.is_dir() for d in (Path(cfg.data_dir) / "train").iterdir())
    net = models.build_model(cfg.arch, classes, models.use_cifar_stem(cfg.cifar_stem, cfg.data.train_image_size))
    return [p.numel() * 4 for p in net.parameters() if p.requires_grad]


def projections(rows: list[dict], a, cfg) -> tuple[dict, list[dict]]:
    """Projected rows from the runs' model and DDP bucket size (cfg: the runs' distres config)."""
    param_bytes = gradient_param_bytes(cfg)
    buckets = allreduce_model.bucket_sizes(param_bytes, cfg.bucket_cap_mb)
    by_name = {r["name"]: r for r in rows}
    base = by_name.get("gpu1") or by_name.get("cpu1")
    if a.project_compute_ms:
        compute_s, per_unit = a.project_compute_ms / 1e3, a.batch_size / (a.project_compute_ms / 1e3)
        basis = f"--project-compute-ms {a.project_compute_ms:g} (stated, not measured)"
    elif base is not None:
        compute_s, per_unit = base["compute_ms"] / 1e3, base["images_per_sec_per_rank"]
        basis = f"compute time of the measured {base['name']} run ({base['compute_ms']:.1f} ms/step)"
    else:
        return {}, []
    info = {
        "gradient_bytes": sum(param_bytes),
        "buckets": len(buckets),
        "bucket_cap_mb": cfg.bucket_cap_mb,
        "compute_ms": 1e3 * compute_s,
        "basis": basis,
        "links": [
            {"name": k.name, "bandwidth_gbs": k.bandwidth_gbs, "latency_us": k.latency_us, "basis": k.basis}
            for k in allreduce_model.LINKS
        ],
    }
    return info, allreduce_model.project(compute_s, per_unit, buckets)


def machine() -> dict:
    import torch

    return {
        "cpu": machine_info.cpu_model(),
        "cores": available_cpus(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        "code": machine_info.code_version(),
    }


# ---------------------------------------------------------------- outputs

COLUMNS = (
    "config",
    "kind",
    "processes",
    "images/s",
    "images/s per rank",
    "step ms",
    "data wait ms",
    "compute ms",
    "exposed comm ms",
    "efficiency",
    "x CPU",
    "peak mem MB",
    "compute ms for 90%",
)


def table_rows(result: dict) -> list[list]:
    def f(v, spec):
        return "" if v is None else format(v, spec)

    rows = [
        [
            r["label"],
            "measured",
            r["world"],
            f(r["images_per_sec"], ".1f"),
            f(r["images_per_sec_per_rank"], ".1f"),
            f(r["step_ms"], ".1f"),
            f(r["data_wait_ms"], ".1f"),
            f(r["compute_ms"], ".1f"),
            f(r["exposed_comm_ms"], ".1f") if r["world"] > 1 else "-",
            f(r["efficiency"], ".2f"),
            f(r["x_cpu"], ".2f"),
            f(r["peak_mem_mb"], ".0f"),
            "",
        ]
        for r in result["measured"]
    ]
    rows += [
        [
            p["name"],
            "projected",
            p["units"],
            f(p["images_per_sec"], ".1f"),
            f(p["images_per_sec"] / p["units"], ".1f"),
            f(p["compute_ms"] + p["exposed_comm_ms"], ".1f"),
            "",
            f(p["compute_ms"], ".1f"),
            f(p["exposed_comm_ms"], ".1f"),
            f(p["efficiency"], ".2f"),
            "",
            "",
            f(p["compute_ms_for_90pct"], ".1f"),
        ]
        for p in result["projected"]
    ]
    return rows


def render_markdown(result: dict) -> str:
    m, s = result["machine"], result["settings"]
    lines = [
        f"# Scaling benchmark: {s['arch']}, {s['data']} {s['image_size'] or ''}px, batch {s['batch_size']} "
        f"per process, amp {s['amp']}",
        "",
        f"Device: {m['cpu']} ({m['cores']} cores){', GPUs: ' + ', '.join(m['gpus']) if m['gpus'] else ', no GPU'}; "
        f"torch {m['torch']}, Python {m['python']}; {m['code']}.",
        f"Command: `{result['command']}`",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows(result)]
    lines += [
        "",
        f"Measured: median over {s['windows']} logged windows of {s['window']} steps after "
        f"{s['warmup_windows']} warm-up windows (start-up and compilation excluded). Images/s per rank "
        "= total / processes. Efficiency = throughput per unit of hardware / the 1-process run's: per "
        "core against cpu1 for CPU rows (both CPU runs use all cores, so it is cpuN / cpu1), per GPU "
        "against gpu1 for GPU rows. x CPU = total / the fastest CPU row. "
        "Compute = step time - data wait - exposed communication. Exposed communication = step time "
        "in windows with the gradient all-reduce minus that in interleaved windows "
        "without it (DDP no_sync, `--bench-comm-probe`); the raw differences were "
        + (
            ", ".join(
                f"{r['name']} {r['comm_delta_ms']:.1f} ms" for r in result["measured"] if r["comm_delta_ms"] is not None
            )
            or "not measured (no N > 1 run)"
        )
        + ". Peak memory: max GPU memory allocated on CUDA, peak resident set of rank 0 on CPU. "
        "1-minute load average before and after each run (other work on the machine slows CPU runs): "
        + ", ".join(
            f"{r['name']} {r['load_avg_1min'][0]:.1f} -> {r['load_avg_1min'][1]:.1f}" for r in result["measured"]
        )
        + ".",
    ]
    p = result.get("projection") or {}
    if p:
        lines += [
            "",
            f"Projected (not measured): ring all-reduce of {p['gradient_bytes'] / 1e6:.1f} MB of fp32 "
            f"gradients in {p['buckets']} buckets ({p['bucket_cap_mb']:g} MB), overlapped with backward "
            f"(2/3 of compute), from the {p['basis']}; benchmarks/allreduce_model.py. "
            "'compute ms for 90%': the shortest compute time per step that keeps 90% efficiency on that "
            "link and GPU count; a faster GPU is communication-bound there. Links:",
        ]
        lines += [
            f"- {k['name']}: {k['bandwidth_gbs']:g} GB/s, {k['latency_us']:g} us per ring step ({k['basis']})"
            for k in p["links"]
        ]
    return "\n".join(lines) + "\n"


def render_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meas = result["measured"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.5))
    names = [r["name"] for r in meas]
    ax1.bar(names, [r["images_per_sec"] for r in meas], color="tab:blue", label="total")
    ax1.bar(names, [r["images_per_sec_per_rank"] for r in meas], width=0.4, color="tab:orange", label="per rank")
    ax1.set_ylabel("images/s")
    ax1.set_title("Measured throughput")
    ax1.legend()
    bottom = [0.0] * len(meas)
    for key, label in (("data_wait_ms", "data wait"), ("compute_ms", "compute"), ("exposed_comm_ms", "exposed comm")):
        vals = [r[key] for r in meas]
        ax2.bar(names, vals, bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax2.set_ylabel("ms per step")
    ax2.set_title("Step time (measured)")
    ax2.legend()
    for link in dict.fromkeys(p["link"] for p in result["projected"]):
        pts = [p for p in result["projected"] if p["link"] == link]
        ax3.plot([p["units"] for p in pts], [p["efficiency"] for p in pts], "--o", label=f"{link} (projected)")
    for r in meas:
        if r["efficiency"] is not None:
            ax3.plot([r["world"]], [r["efficiency"]], "s", markersize=9, label=f"{r['name']} (measured)")
    ax3.set_xscale("log", base=2)
    effs = [r["efficiency"] for r in meas if r["efficiency"] is not None]
    ax3.set_ylim(0, max([1.05, *(1.05 * e for e in effs)]))  # N ranks may beat one on a CPU
    ax3.set_xlabel("processes / GPUs")
    ax3.set_ylabel("scaling efficiency")
    ax3.set_title("Efficiency vs the 1-unit run")
    ax3.legend(fontsize=7)
    s = result["settings"]
    fig.suptitle(
        f"{s['arch']}, {s['data']}, batch {s['batch_size']}/process, amp {s['amp']} ({result['machine']['cpu']})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_wandb(result: dict, paths: dict, a, work: Path) -> str | None:
    """One W&B run for the whole benchmark: config, a table, the plot. Returns its run dir."""
    from distres import tracking

    config = {
        "settings": result["settings"],
        "machine": result["machine"],
        "units": [r["name"] for r in result["measured"]],
    }
    run = tracking.open_wandb_run(a.wandb, work, config, a.name, resume=False, job_type="scaling")
    if run is None:
        return None
    try:
        import wandb

        run.log(
            {
                "scaling/table": wandb.Table(
                    columns=list(COLUMNS), data=[[str(c) for c in row] for row in table_rows(result)]
                ),
                "scaling/plot": wandb.Image(str(paths["png"])),
            }
        )
        for r in result["measured"]:
            run.summary[f"{r['name']}/images_per_sec"] = r["images_per_sec"]
            if r["efficiency"] is not None:
                run.summary[f"{r['name']}/efficiency"] = r["efficiency"]
        run.save(str(paths["json"]), base_path=str(paths["json"].parent), policy="now")
        return str(Path(run.dir).parent)
    except Exception as e:  # W&B trouble never loses the results already written
        print(f"scaling: W&B logging failed: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    finally:
        run.finish()


def write_outputs(result: dict, out: Path, name: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{name}.json", "md": out / f"{name}.md", "png": out / f"{name}.png"}
    paths["json"].write_text(json.dumps(result, indent=2) + "\n")
    paths["md"].write_text(render_markdown(result))
    render_plot(result, paths["png"])
    return paths


# ---------------------------------------------------------------- CLI


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    # distres's parser: a bad flag is one "distres: error: ..." line, as for distres.train.
    p = ArgumentParser(
        prog="python benchmarks/scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--units",
        default="auto",
        help=f"comma-separated, from {', '.join(UNITS)}; auto: cpu1,cpuN plus gpu1/gpuN when GPUs "
        "are visible plus nodes under a multi-node SLURM allocation",
    )
    p.add_argument("--cpu-procs", type=int, default=2, help="processes of the cpuN run (gloo)")
    p.add_argument("--gpus", type=int, default=-1, help="GPUs of the gpuN run and per node; -1: all visible")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=64, help="per process")
    p.add_argument("--amp", default="bf16", choices=("none", "bf16", "fp16"))
    p.add_argument("--data", default="synthetic", choices=("synthetic", "cifar10", "imagefolder"))
    p.add_argument("--data-dir", default=None)
    p.add_argument("--image-size", type=int, default=0, help="0: distres.train's default")
    p.add_argument("--window", type=int, default=10, help="steps per logged window")
    p.add_argument("--warmup-windows", type=int, default=2, help="windows dropped at the start")
    p.add_argument("--windows", type=int, default=6, help="measured windows (N > 1 runs add as many no_sync ones)")
    p.add_argument(
        "--project-compute-ms",
        type=float,
        default=0.0,
        help="project from this compute time per step instead of the measured 1-unit run's",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="cpu1 + cpuN, resnet18, synthetic 32 px, batch 32, 6 windows of 5 steps (~2 min on 2 cores); "
        "flags given beside it override these",
    )
    p.add_argument("--work-dir", default=None, help="the runs' outputs and the W&B run (default runs/scaling-TIME)")
    p.add_argument("--out", default=None, help="folder for NAME.json/.md/.png (default: --work-dir)")
    p.add_argument("--name", default="scaling", help="file stem of the outputs and W&B run name")
    p.add_argument("--wandb", default="auto", choices=("auto", "online", "offline", "disabled"))
    p.add_argument("--timeout", type=int, default=3600, help="seconds per run")
    p.add_argument("--dry-run", action="store_true", help="print the commands and stop")
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown and PNG of a saved result")
    p.add_argument(
        "train_args",
        nargs="*",
        help="after --: extra distres.train flags for every run "
        "(--bucket-cap-mb and --cifar-stem given there also shape the projection)",
    )
    a = p.parse_args(argv)
    if a.quick:  # new defaults: flags given on the command line still win
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    for name in ("window", "windows", "batch_size", "cpu_procs"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if a.warmup_windows < 0:
        raise UserError("--warmup-windows must be >= 0")
    # Keep synced/unsynced windows paired after the warm-up ones.
    a.warmup_windows += a.warmup_windows % 2
    return a


def main(argv: list[str] | None = None) -> int:
    try:
        a = parse_args(argv)
        if a.render:
            result = json.loads(Path(a.render).read_text())
            write_outputs(result, Path(a.render).parent, Path(a.render).stem)
            return 0
        import torch

        gpus = torch.cuda.device_count() if a.gpus < 0 else a.gpus
        slurm = slurm_allocation()
        names = (
            default_units(gpus, slurm) if a.units == "auto" else [u.strip() for u in a.units.split(",") if u.strip()]
        )
        units = plan(names, a.cpu_procs, gpus, slurm)
        work = Path(a.work_dir or REPO / "runs" / time.strftime("scaling-%Y%m%d-%H%M%S"))
        if a.dry_run:
            for u in units:
                print(f"{u.name}: " + " ".join(command(a, u, work / u.name, slurm)))
            return 0
        # The flags are checked once here, with distres's own messages, before any run starts.
        cfg = config.parse_args(train_args(a, units[-1], work / "check"))
        t0 = time.perf_counter()
        rows = []
        out = Path(a.out) if a.out else work
        out.mkdir(parents=True, exist_ok=True)
        for u in units:
            recs, info = run_unit(a, u, work, slurm)
            rows.append(
                {
                    "name": u.name,
                    "label": u.label,
                    "device": u.device,
                    "world": u.world,
                    "nnodes": u.nnodes,
                    "hardware": u.hardware,
                    "ref": u.ref,
                    **info,
                    **analyse(recs, a.window, a.warmup_windows),
                }
            )
            # Each finished run on disk at once: a later run that fails or times out loses nothing.
            (out / f"{a.name}.json").write_text(json.dumps({"partial": True, "measured": rows}, indent=2) + "\n")
        rows = with_efficiency(rows)
        proj_info, proj = projections(rows, a, cfg)
        result = {
            "command": "python benchmarks/scaling.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": machine(),
            "settings": {
                "arch": a.arch,
                "batch_size": a.batch_size,
                "amp": a.amp,
                "data": a.data,
                "image_size": cfg.data.train_image_size,
                "window": a.window,
                "warmup_windows": a.warmup_windows,
                "windows": a.windows,
                "train_args": a.train_args,
            },
            "measured": rows,
            "projection": proj_info,
            "projected": proj,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        paths = write_outputs(result, out, a.name)
        wandb_dir = log_wandb(result, paths, a, work)
        print(render_markdown(result))
        print(
            f"scaling: wrote {', '.join(str(p) for p in paths.values())}"
            + (f"; W&B run in {wandb_dir}" if wandb_dir else ""),
            file=sys.stderr,
        )
        return 0
    except UserError as e:
        print(format_error(e), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
