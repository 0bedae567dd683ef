"""What the pieces of the modern training recipes do on a short CPU budget: ResNet-18 on the
real CIFAR-10 JPEGs (32 px), the same run with and without each augmentation.

Every row is the same run (model, seed, schedule, epochs, subset) but for its augmentation
flags, run one after the other through the real CLI; top-1/top-5 are the final evaluation's.
The training and test sets are the first N images per class (file-name order) of the CIFAR-10
JPEG folders, hard-linked into a temporary folder, so that a row fits in minutes on a CPU.

    python benchmarks/recipe_pieces.py --data-dir /path/to/cifar10-jpeg --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import machine_info  # noqa: E402

ROWS = {
    "baseline (pad-crop + flip)": [],
    "+ TrivialAugmentWide": ["--auto-augment", "ta_wide"],
    "+ random erasing 0.25": ["--random-erase", "0.25"],
    "+ mixup 0.2 / cutmix 1.0": ["--mixup-alpha", "0.2", "--cutmix-alpha", "1.0"],
    "+ all of the above": [
        "--auto-augment",
        "ta_wide",
        "--random-erase",
        "0.25",
        "--mixup-alpha",
        "0.2",
        "--cutmix-alpha",
        "1.0",
    ],
}
NAME = "recipe-pieces-cifar10-cpu"


def subset(src: Path, dst: Path, per_class: dict[str, int]) -> None:
    for split, n in per_class.items():
        for cls_dir in sorted((src / split).iterdir()):
            (dst / split / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:n]:
                os.link(f, dst / split / cls_dir.name / f.name)


def run_row(common: list[str], extra: list[str], data_dir: Path) -> dict:
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "distres.train", *common, *extra, "--data-dir", str(data_dir), "--output-dir", out],
            cwd=REPO,
            check=True,
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        recs = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in recs if r["kind"] == "eval"][-1]
    losses = [r["loss"] for r in recs if r["kind"] == "train"]
    return {
        "top1": last["top1"],
        "top5": last["top5"],
        "val_loss": last["val_loss"],
        "final_train_loss": losses[-1],
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="CIFAR-10 JPEGs: train/<class>/*.jpg and test/<class>/*.jpg")
    p.add_argument("--train-per-class", type=int, default=200)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--rows", default="all", help="comma-separated row numbers (0-based) or all")
    p.add_argument("--seeds", default="0,1", help="comma-separated --seed values; every row runs with each")
    p.add_argument("--out", default="benchmarks/results")
    a = p.parse_args()
    common = [
        "--arch",
        "resnet18",
        "--cifar-stem",
        "off",
        "--amp",
        "none",
        "--device",
        "cpu",
        "--data",
        "cifar10",
        "--image-size",
        "32",
        "--epochs",
        str(a.epochs),
        "--batch-size",
        "64",
        "--lr",
        "0.05",
        "--eval-every",
        "0",
        "--checkpoint-every",
        "0",
        "--log-every",
        "10",
        "--no-progress",
        "--wandb",
        "disabled",
    ]
    names = list(ROWS) if a.rows == "all" else [list(ROWS)[int(k)] for k in a.rows.split(",")]
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{NAME}.json"
    result = json.loads(path.read_text()) if path.exists() else {"rows": {}}
    result.update(
        {
            "cpu": machine_info.cpu_model(),
            "torch": torch.__version__,
            "code": machine_info.code_version(),
            "common": "python -m distres.train " + " ".join(common) + " --data-dir SUBSET",
            "subset": {"train_per_class": a.train_per_class, "test_per_class": a.test_per_class},
        }
    )
    with tempfile.TemporaryDirectory() as tmp:
        subset(Path(a.data_dir), Path(tmp), {"train": a.train_per_class, "test": a.test_per_class})
        for seed in a.seeds.split(","):
            for name in names:
                row = result["rows"].setdefault(name, {"flags": " ".join(ROWS[name]), "seeds": {}})
                row["seeds"][seed] = run_row(common + ["--seed", seed], ROWS[name], Path(tmp))
                row["seeds"][seed]["code"] = result["code"]
                path.write_text(json.dumps(result, indent=1))  # each run as soon as it is done
                print(name, seed, row["seeds"][seed], flush=True)
    (out / f"{NAME}.md").write_text(render(result))


def render(r: dict) -> str:
    s = r["subset"]
    seeds = sorted({k for x in r["rows"].values() for k in x["seeds"]})
    lines = [
        "# Recipe pieces on CIFAR-10 (CPU, short budget)",
        "",
        f"CPU: {r['cpu']}; torch {r['torch']}; code: "
        + "; ".join(sorted({run["code"] for x in r["rows"].values() for run in x["seeds"].values()}))
        + ".",
        "",
        f"Data: the real CIFAR-10 JPEGs, first {s['train_per_class']} training and {s['test_per_class']} test "
        f"images per class (file-name order): {10 * s['train_per_class']} to train on, "
        f"{10 * s['test_per_class']} to score.",
        "",
        f"Every row: `{r['common']}` plus its flags, once per `--seed` ({', '.join(seeds)}), one run after another; "
        "`python benchmarks/recipe_pieces.py` runs them all. Top-1/top-5 of the final evaluation, "
        "mean over the seeds and each seed's.",
        "",
        "| row | flags | top-1 % (mean) | top-1 % per seed | top-5 % (mean) | val loss (mean) | seconds per run |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, x in r["rows"].items():
        runs = [x["seeds"][k] for k in seeds if k in x["seeds"]]

        def mean(key, runs=runs):
            return sum(run[key] for run in runs) / len(runs)

        per_seed = " / ".join(f"{run['top1']:.1f}" for run in runs)
        lines.append(
            f"| {name} | `{x['flags'] or '-'}` | {mean('top1'):.2f} | {per_seed} | {mean('top5'):.2f} | "
            f"{mean('val_loss'):.3f} | {mean('seconds'):.0f} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
