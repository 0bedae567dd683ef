"""CPU training throughput: the README's `make train` path vs a plain PyTorch loop
(``benchmarks/seed_loop.py``, the "seed loop": what a CPU tutorial writes).

Both train torchvision ResNet-50 (ImageNet stem) on the same CIFAR-10 JPEG folder on this
machine, one after the other. distres runs through its real CLI with configs/cifar10-cpu.yaml;
its images/s is the median over logged windows after the first (warm-up) one.

    python benchmarks/cpu_train.py --data-dir .cache/data/cifar10 --out benchmarks/results
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


def run_distres(data_dir: str, steps: int, extra: list[str]) -> dict:
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
            "--max-steps",
            str(steps),
            "--eval-every",
            "0",
            "--checkpoint-every",
            "0",
            "--no-progress",
            *extra,
        ]
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True, text=True)
        recs = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_sec"] for r in recs if r["kind"] == "train"][1:]
    return {
        "images_per_sec": statistics.median(rates),
        "windows": [round(x, 1) for x in rates],
        "command": "python -m distres.train --config configs/cifar10-cpu.yaml " + " ".join(extra),
    }


def run_seed(data_dir: str, steps: int, workers: int) -> dict:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "seed_loop.py"),
            "--data-dir",
            data_dir,
            "--steps",
            str(steps),
            "--workers",
            str(workers),
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    res = json.loads(out.strip().splitlines()[-1])
    res["command"] = f"python benchmarks/seed_loop.py --workers {workers}"
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="CIFAR-10 JPEG folder with train/ (all but --render)")
    p.add_argument("--steps", type=int, default=60, help="distres steps of 256 images")
    p.add_argument("--seed-steps", type=int, default=120, help="seed-loop steps of 64 images")
    p.add_argument("--out", default=None, help="folder for NAME.json and NAME.md")
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

    seed = max((run_seed(a.data_dir, a.seed_steps, w) for w in (0, 2)), key=lambda r: r["images_per_sec"])
    ours = run_distres(a.data_dir, a.steps, [])
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
        ]
    )


if __name__ == "__main__":
    main()
