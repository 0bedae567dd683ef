"""Score a trained model on a labelled data set, with the report a person reads.

    python -m distres.evaluate --checkpoint runs/x/checkpoints/best.pt
    python -m distres.evaluate --checkpoint last.pt --data imagefolder --data-dir /data/pets
    torchrun --nproc_per_node 8 -m distres.evaluate --checkpoint last.pt     # on 8 GPUs

Top-1/top-5/loss come from the same code and the same exact distributed sums as training's
evaluation (``engine.evaluate``), over the data set the checkpoint was trained on unless
another is named, so on a run's own validation set they equal the run's last evaluation.
Written to ``--output-dir``: summary.json, per_class.csv, confusion.csv and confusion.png
(rows: true class, columns: predicted), misclassified.csv (each wrong image with its top
predictions).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import torch

from distres import data, dist, engine, inference, models
from distres.config import AMP, BACKENDS, DATASETS
from distres.errors import ArgumentParser, UserError, run_cli


def build_parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m distres.evaluate",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        help="a distres checkpoint (step-*.pt, last.pt, best.pt) or a distres .safetensors export",
    )
    p.add_argument("--weights", choices=inference.WEIGHT_CHOICES, default="auto", help=inference.WEIGHTS_HELP)
    p.add_argument("--data", choices=DATASETS, default=None, help="data set (default: the checkpoint's)")
    p.add_argument(
        "--data-dir",
        default=None,
        help="its folder: val/ or test/ is scored, or the folder itself "
        "when it holds the class folders (default: the checkpoint's)",
    )
    p.add_argument("--data-backend", choices=BACKENDS, default=None, help="input pipeline (default: the checkpoint's)")
    p.add_number("--batch-size", int, None, "per process (default: the checkpoint's)", at_least=1)
    p.add_number(
        "--workers",
        int,
        None,
        "DataLoader workers per process (default: the checkpoint's; -1: by the CPUs)",
        at_least=-1,
    )
    p.add_argument("--amp", choices=AMP, default=None, help="autocast precision (default: the checkpoint's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: cuda when available")
    p.add_number("--top-k", int, 5, "predictions listed per misclassified image", at_least=1)
    p.add_argument(
        "--output-dir", default=None, help="default: eval-<checkpoint name> beside the run's checkpoints folder"
    )
    return p


class Collector:
    """Every batch's labels and top-k predictions, in the sampler's order, with the samples'
    names (``engine.evaluate``'s ``each``)."""

    def __init__(self, loader, k: int):
        self.k, self.loader = k, loader
        self._index = loader.sampler.index_batches(0)
        self.rows: list[tuple] = []  # (name, label, [top-k labels], [top-k probabilities])

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        top = logits.topk(min(self.k, logits.shape[1]), dim=1)
        probs = logits.softmax(dim=1).gather(1, top.indices)
        index = next(self._index, None)
        names = (
            [self.loader.source.name(int(i)) for i in index]
            if index is not None and len(index) == len(labels)
            else [""] * len(labels)
        )  # (a skipped unreadable image shifted the batch)
        for row in zip(names, labels.tolist(), top.indices.tolist(), probs.tolist()):
            self.rows.append(row)


def default_output_dir(checkpoint: Path) -> Path:
    parent = checkpoint.resolve().parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    return run_dir / f"eval-{checkpoint.stem}"


def _config(a, trained):
    """The checkpoint's run configuration with this command's data and evaluation flags."""
    cfg = inference.with_overrides(
        trained.config,
        data=a.data,
        data_dir=a.data_dir,
        data_backend=a.data_backend,
        batch_size=a.batch_size,
        workers=a.workers,
        amp=a.amp,
        eval_image_size=trained.meta["image_size"],
        eval_resize=trained.meta.get("resize", 0),
    )
    if a.data is not None and a.data != trained.config.dataset and a.data_dir is None and a.data != "synthetic":
        raise UserError(f"--data {a.data} needs --data-dir (the checkpoint's folder is for {trained.config.dataset})")
    if cfg.data.dataset == "imagefolder" and not cfg.data.data_dir:
        raise UserError("--data imagefolder needs --data-dir PATH")
    cfg.validate()
    return cfg


def run(a, ctx) -> dict:
    checkpoint = Path(a.checkpoint)
    trained = inference.load(checkpoint, a.weights, ctx.device)
    meta = trained.meta
    cfg = _config(a, trained)
    engine.set_numerics(cfg.run.deterministic, training=False)
    bundle = data.build(
        cfg,
        ctx,
        models.memory_format(cfg.model.channels_last),
        stats=(meta["mean"], meta["std"]),
        train=False,
        classes=meta["classes"],
    )
    collect = Collector(bundle.val, a.top_k)
    try:
        result = engine.evaluate(
            trained.model, bundle.val, engine.Precision(cfg.optim.amp, ctx.device), ctx.device, collect
        )
    finally:
        bundle.close()
    rows = [row for part in dist.gather_objects(collect.rows) for row in part]
    if ctx.is_main:
        # Absolute, named or not (the default is found from the checkpoint's real location): the
        # line must lead to the report from wherever it is read, and under a launcher (torchrun,
        # srun) the job's working folder need not be the shell's.
        out = Path(a.output_dir).absolute() if a.output_dir else default_output_dir(checkpoint)
        try:
            summary = report(
                rows,
                meta["classes"],
                result,
                out,
                {
                    "checkpoint": str(checkpoint),
                    "weights": trained.weights,
                    "data": cfg.data.dataset,
                    "data_dir": cfg.data.data_dir,
                },
            )
        except OSError as e:
            raise UserError(
                f"cannot write the report to {out} ({e.strerror or e}); pass a writable --output-dir"
            ) from None
        print_table(summary, out)
    return result


def report(rows: list[tuple], classes: list[str], result: dict, out: Path, about: dict) -> dict:
    """Write the report files into out; the summary (also summary.json)."""
    out.mkdir(parents=True, exist_ok=True)
    n = len(classes)
    labels = torch.tensor([r[1] for r in rows], dtype=torch.int64)
    preds = torch.tensor([r[2][0] for r in rows], dtype=torch.int64)
    confusion = torch.bincount(labels * n + preds, minlength=n * n).view(n, n)
    per_class = confusion.sum(1)
    correct = confusion.diagonal()
    with open(out / "per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "samples", "correct", "accuracy"])
        for c, name in enumerate(classes):
            w.writerow(
                [
                    name,
                    int(per_class[c]),
                    int(correct[c]),
                    f"{100.0 * int(correct[c]) / int(per_class[c]):.2f}" if per_class[c] else "",
                ]
            )
    with open(out / "confusion.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["true \\ predicted", *classes])
        for c, name in enumerate(classes):
            w.writerow([name, *confusion[c].tolist()])
    _plot_confusion(confusion, classes, out / "confusion.png")
    with open(out / "misclassified.csv", "w", newline="") as f:
        w = csv.writer(f)
        k = len(rows[0][2]) if rows else 0
        w.writerow(["file", "true", *[c for j in range(1, k + 1) for c in (f"pred{j}", f"prob{j}")]])
        for name, label, top, probs in rows:
            if top[0] != label:
                w.writerow([name, classes[label], *[v for t, p in zip(top, probs) for v in (classes[t], f"{p:.4f}")]])
    off = confusion.clone()
    off.fill_diagonal_(0)
    pairs = [
        (int(v), classes[i // n], classes[i % n]) for v, i in zip(*off.flatten().topk(min(5, n * n))) if int(v) > 0
    ]
    worst = sorted((100.0 * int(correct[c]) / int(per_class[c]), classes[c]) for c in range(n) if per_class[c])[:5]
    summary = {
        **about,
        **result,
        "classes": n,
        "most_confused": [{"true": t, "predicted": p, "count": v} for v, t, p in pairs],
        "worst_classes": [{"class": c, "accuracy": acc} for acc, c in worst],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _plot_confusion(confusion: torch.Tensor, classes: list[str], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:  # (an environment without it, e.g. a bare GPU image: confusion.csv holds the numbers)
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(classes)
    rates = confusion.double() / confusion.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.45 * n, 40)
    fig, ax = plt.subplots(figsize=(size, size * 0.9))
    im = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 40:  # labels and counts stay readable up to about this many classes
        ax.set_xticks(range(n), classes, rotation=90)
        ax.set_yticks(range(n), classes)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if confusion[i, j]:
                    ax.text(
                        j,
                        i,
                        int(confusion[i, j]),
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 0.5 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion ({int(confusion.sum())} images; colour: share of the true class)")
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def print_table(s: dict, out: Path) -> None:
    lines = [
        f"distres.evaluate: {s['checkpoint']} ({s['weights']} weights) on {s['data']}"
        f"{' ' + s['data_dir'] if s['data_dir'] else ''}: {s['eval_samples']} images, {s['classes']} classes",
        f"  top1 {s['top1']:.2f}%   top5 {s['top5']:.2f}%   loss {s['val_loss']:.4f}",
    ]
    if s["worst_classes"]:
        lines.append(
            "  lowest accuracy: " + ", ".join(f"{w['class']} {w['accuracy']:.1f}%" for w in s["worst_classes"])
        )
    if s["most_confused"]:
        lines.append(
            "  most confused (true -> predicted): "
            + ", ".join(f"{m['true']} -> {m['predicted']} {m['count']}" for m in s["most_confused"])
        )
    lines.append(f"  report: {out}/ (summary.json, per_class.csv, confusion.csv, confusion.png, misclassified.csv)")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> int:
    def body():
        a = build_parser().parse_args(argv)
        ctx = dist.init(a.device, "auto")
        ctx.say(f"distres.evaluate: scoring {a.checkpoint} on {ctx.world_size} x {ctx.device.type}")
        run(a, ctx)

    return run_cli(body, rank=dist.rank_from_env, cleanup=dist.teardown)


def main_cli() -> None:
    sys.exit(main())


if __name__ == "__main__":
    main_cli()
