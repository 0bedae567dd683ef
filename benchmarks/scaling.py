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
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The three parts: scaling_run (plan and launch the runs), scaling_analyse (their figures and
# the projection), scaling_report (JSON, Markdown, PNG, W&B). This file is the command line.
from benchmarks import scaling_analyse, scaling_report, scaling_run  # noqa: E402
from distres import config  # noqa: E402
from distres.errors import EXIT_USER_ERROR, ArgumentParser, UserError, format_error  # noqa: E402

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


def build_parser() -> argparse.ArgumentParser:
    # distres's parser: a bad flag is one "distres: error: ..." line, as for distres.train.
    p = ArgumentParser(
        prog="python benchmarks/scaling.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--units",
        default="auto",
        help=f"comma-separated, from {', '.join(scaling_run.UNITS)}; auto: cpu1,cpuN plus gpu1/gpuN when GPUs "
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
    p.add_argument(
        "--work-dir",
        default=None,
        help="the runs' outputs and the W&B run (default: runs/scaling-TIME in the current folder)",
    )
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
    return p


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:  # new defaults: flags given on the command line still win
        p.set_defaults(**QUICK)
        a = p.parse_args(argv)
    for name in ("window", "windows", "batch_size", "cpu_procs"):
        if getattr(a, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    # Any warm-up count keeps an N > 1 run's measurement balanced: its windows alternate
    # synced/no_sync, and 2 x --windows of them follow the warm-up, so an odd count only
    # starts the measured ones on a no_sync window.
    if a.warmup_windows < 0:
        raise UserError("--warmup-windows must be >= 0")
    return a


def measure(a, units: list, work: Path, out: Path, slurm) -> list[dict]:
    """Run the units one after the other; each row is on disk as soon as its run ends."""
    rows = []
    out.mkdir(parents=True, exist_ok=True)
    for u in units:
        records, info = scaling_run.run_unit(a, u, work, slurm)
        rows.append(scaling_analyse.unit_row(u, info, records, a.window, a.warmup_windows))
        scaling_report.write_partial(rows, out, a.name)
    return scaling_analyse.with_efficiency(rows)


def benchmark(a, argv: list[str]) -> int:
    import torch

    gpus = torch.cuda.device_count() if a.gpus < 0 else a.gpus
    slurm = scaling_run.slurm_allocation()
    if a.units == "auto":
        names = scaling_run.default_units(gpus, slurm)
    else:
        names = [u.strip() for u in a.units.split(",") if u.strip()]
    units = scaling_run.plan(names, a.cpu_procs, gpus, slurm)
    if not units:
        raise UserError(f"--units {a.units} leaves no run to measure (gpuN alone is skipped with one GPU)")
    # Relative to the caller's folder, like every other path given on the command line.
    work = Path(a.work_dir or Path("runs") / time.strftime("scaling-%Y%m%d-%H%M%S"))
    if a.dry_run:
        for u in units:
            print(f"{u.name}: " + " ".join(scaling_run.command(a, u, work / u.name, slurm)))
        return 0
    # The flags are checked once here, with distres's own messages, before any run starts.
    cfg = config.parse_args(scaling_run.train_args(a, units[-1], work / "check"))
    t0 = time.perf_counter()
    out = Path(a.out) if a.out else work
    rows = measure(a, units, work, out, slurm)
    projection = scaling_analyse.projections(rows, a, cfg)
    result = scaling_report.build_result(a, cfg, argv, rows, projection, time.perf_counter() - t0)
    paths = scaling_report.write_outputs(result, out, a.name)
    wandb_dir = scaling_report.log_wandb(result, paths, a, work)
    print(scaling_report.render_markdown(result))
    print(
        f"scaling: wrote {', '.join(str(p) for p in paths.values())}"
        + (f"; W&B run in {wandb_dir}" if wandb_dir else ""),
        file=sys.stderr,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        a = parse_args(argv)
        if a.render:
            result = json.loads(Path(a.render).read_text())
            scaling_report.write_outputs(result, Path(a.render).parent, Path(a.render).stem)
            return 0
        return benchmark(a, argv)
    except UserError as e:
        print(format_error(e), file=sys.stderr, flush=True)
        return EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
