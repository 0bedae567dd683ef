"""CPU training throughput: the README's `make train` path vs a plain PyTorch loop
(``benchmarks/seed_loop.py``, the "seed loop": what a CPU tutorial writes).

Both train torchvision ResNet-50 (ImageNet stem) on the same CIFAR-10 JPEG folder on this
machine, one after the other. distres runs through its real CLI with configs/cifar10-cpu.yaml;
its images/s is the median over logged windows after the first (warm-up) one.

With --epochs, each loop then trains that many whole epochs and reports the seconds they took and
the test top-1: the seed article's own job is --epochs 10 (its A100 72 s vs CPU 2,200 s).

    python benchmarks/cpu_train.py --data-dir .cache/data/cifar10 --out benchmarks/results
    python benchmarks/cpu_train.py --data-dir .cache/data/cifar10 --epochs 10 --out benchmarks/results --name cpu-seed-job
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import machine_info  # noqa: E402


def run_distres(data_dir: str, budget: list[str]) -> dict:
    """distres's CLI for BUDGET (``--max-steps N --eval-every 0`` or ``--epochs N --eval-every N``):
    its windows' median images/s, the run clock at its last step and the test top-1 if it evaluated."""
    flags = ["--checkpoint-every", "0", "--no-progress", "--wandb", "disabled", *budget]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "distres.train",
            "--config",
            "configs/cifar10-cpu.yaml",
            "--data-dir",
            data_dir,
            "--output-dir",
            tmp,
            *flags,
        ]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in recs if r["kind"] == "train"]
    rates = [r["images_per_sec"] for r in train]
    rates = rates[1:] or rates  # the first window holds the warm-up
    evals = [r for r in recs if r["kind"] == "eval"]
    return {
        "images_per_sec": statistics.median(rates),
        "windows": [round(x, 1) for x in rates],
        "train_seconds": round(train[-1]["time"], 1),
        **({"top1": evals[-1]["top1"]} if evals else {}),
        "command": "python -m distres.train --config configs/cifar10-cpu.yaml " + " ".join(flags),
    }


def run_seed(data_dir: str, workers: int, budget: list[str]) -> dict:
    """The seed loop for BUDGET (``--steps N`` or ``--epochs N``), as its JSON line."""
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "seed_loop.py"),
            "--data-dir",
            data_dir,
            "--workers",
            str(workers),
            *budget,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["command"] = " ".join(["python benchmarks/seed_loop.py --workers", str(workers), *budget])
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 JPEG folder with train/ (all but --render)")
    p.add_argument("--steps", type=int, default=60, help="distres steps of 256 images")
    p.add_argument("--seed-steps", type=int, default=120, help="seed-loop steps of 64 images")
    p.add_argument("--out", default=None, help="folder for NAME.json and NAME.md")
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="then train this many whole epochs by each loop: seconds and test top-1 (the seed job: 10)",
    )
    p.add_argument("--name", default="cpu-train", help="result file name, e.g. cpu-train-fp32 for a CPU without bf16")
    p.add_argument("--render", metavar="JSON", help="only rewrite the Markdown of a saved result")
    a = p.parse_args()
    if a.render:
        path = Path(a.render)
        path.with_suffix(".md").write_text(render(json.loads(path.read_text())))
        return
    if not a.data_dir:
        p.error("--data-dir is required (a CIFAR-10 JPEG folder with train/, e.g. .cache/data/cifar10)")

    import torch

    from distres.engine import resolve_amp

    seed = max(
        (run_seed(a.data_dir, w, ["--steps", str(a.seed_steps)]) for w in (0, 2)), key=lambda r: r["images_per_sec"]
    )
    ours = run_distres(a.data_dir, ["--max-steps", str(a.steps), "--eval-every", "0"])
    result = {
        "device": f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "cpu_model": machine_info.cpu_model(),
        "torch": torch.__version__,
        "commit": machine_info.code_version(),
        "benchmark_command": "python benchmarks/cpu_train.py " + " ".join(sys.argv[1:]),
        "seed_loop": seed,
        "distres": ours,
        "speedup": ours["images_per_sec"] / seed["images_per_sec"],
        # configs/cifar10-cpu.yaml asks for --amp auto: bf16 only where the CPU has the instructions
        "distres_precision": {"bf16": "bf16 autocast", "none": "fp32"}[resolve_amp("auto", torch.device("cpu"))],
    }
    if a.epochs:  # the seed loop with the worker count that was faster above
        epochs = str(a.epochs)
        result["whole_job"] = {
            "epochs": a.epochs,
            "seed_loop": run_seed(a.data_dir, seed["workers"], ["--epochs", epochs]),
            "distres": run_distres(a.data_dir, ["--epochs", epochs, "--eval-every", epochs]),
        }
    print(json.dumps(result, indent=2))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{a.name}.md").write_text(render(result))


def render(r: dict) -> str:
    s, d = r["seed_loop"], r["distres"]
    return "\n".join(
        [
            "# CPU training throughput: distres vs the seed loop",
            "",
            f"Device: {r['cpu_model']} ({r['device']}), torch {r['torch']}, {r['commit']}.",
            f"Command: `{r['benchmark_command']}`",
            "",
            "ResNet-50 (torchvision, ImageNet stem) training on the CIFAR-10 JPEGs (32 px), same machine,",
            "run one after the other.",
            "",
            "| loop | settings | images/s |",
            "| --- | --- | --- |",
            f"| seed | batch {s['batch_size']}, Adam, fp32, NCHW, ToTensor+Normalize, {s['workers']} workers "
            f"(`{s['command']}`) | {s['images_per_sec']:.1f} |",
            f"| distres | batch 256, AdamW, {r.get('distres_precision', 'bf16 autocast')}, channels_last, uint8 loading "
            f"(`{d['command'].strip()}`) | {d['images_per_sec']:.1f} |",
            "",
            f"Speed-up: **{r['speedup']:.2f}x**. distres figure: median of logged 10-step windows after the first "
            f"({', '.join(map(str, d['windows']))}); seed figure: the faster of 0 and 2 DataLoader workers.",
            "",
            *render_whole_job(r.get("whole_job")),
        ]
    )


def render_whole_job(job: dict | None) -> list[str]:
    if not job:
        return []
    s, d = job["seed_loop"], job["distres"]
    return [
        f"## The whole job: {job['epochs']} epochs, then top-1 on the test split",
        "",
        "Training seconds: the seed loop times its epochs (as the seed article did); distres's are its run",
        "clock at the last step (model built, loader started, every step). Evaluation is not in either.",
        "",
        "| loop | command | training seconds | test top-1 |",
        "| --- | --- | --- | --- |",
        f"| seed | `{s['command']}` | {s['train_seconds']:.0f} | {s['top1']:.2f}% |",
        f"| distres | `{d['command']}` | {d['train_seconds']:.0f} | {d['top1']:.2f}% |",
        "",
        f"Speed-up in training time: **{s['train_seconds'] / d['train_seconds']:.2f}x**. The seed article's own figures "
        "for this job: 72 s on an A100, 2,200 s on a CPU (its CPU model not named).",
        "",
    ]


if __name__ == "__main__":
    main()
