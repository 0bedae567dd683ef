"""A plain single-process PyTorch training loop, as a tutorial writes it: the baseline that
distres is measured against (``benchmarks/cpu_train.py`` on the CPU, ``benchmarks/gpu.sh seed``
on a GPU, where the tutorial's loop moves the model and each batch to the device).

torchvision resnet50 (ImageNet stem), batch 64, Adam lr 1e-3, fp32, NCHW, ImageFolder +
DataLoader with ToTensor + Normalize. Prints a JSON line: the steady-state images/s of --steps
steps, or with --epochs the wall-clock seconds of that many whole epochs and the test top-1.

    python benchmarks/seed_loop.py --data-dir CIFAR10_JPEG_DIR --steps 40 --workers 2
    python benchmarks/seed_loop.py --data-dir CIFAR10_JPEG_DIR --device cuda --epochs 10 --workers 8
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision
import torchvision.transforms as T


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True, help="ImageFolder root with train/")
    p.add_argument("--steps", type=int, default=40, help="timed steps (after --warmup)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument(
        "--epochs",
        type=int,
        default=0,
        help="train this many whole epochs and time them (0: --steps steps), then test top-1",
    )
    a = p.parse_args()
    device = torch.device(a.device)

    tf = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = torchvision.datasets.ImageFolder(f"{a.data_dir}/train", transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers)
    model = torchvision.models.resnet50(num_classes=10).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    if a.epochs:
        return whole_epochs(a, model, opt, loss_fn, loader, tf, device)
    times = []
    it = iter(loader)
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        step(model, opt, loss_fn, *next(it), device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    total = sum(times)
    report(
        a,
        device,
        images_per_sec=a.batch_size * len(times) / total,
        median_step_s=statistics.median(times),
        steps=len(times),
    )


def step(model, opt, loss_fn, x, y, device) -> None:
    """The tutorial's training step."""
    x, y = x.to(device), y.to(device)
    opt.zero_grad()
    loss = loss_fn(model(x), y)
    loss.backward()
    opt.step()


def report(a, device, **figures) -> None:
    print(
        json.dumps(
            {
                "loop": "seed",
                **figures,
                "batch_size": a.batch_size,
                "workers": a.workers,
                "device": str(device),
                "threads": torch.get_num_threads(),
                "torch": torch.__version__,
            }
        )
    )


def whole_epochs(a, model, opt, loss_fn, loader, tf, device) -> None:
    """The tutorial's full run: E epochs (timed, as the seed article timed its 10), then the test
    split's top-1 (not timed)."""
    t0 = time.perf_counter()
    for _ in range(a.epochs):
        for x, y in loader:
            step(model, opt, loss_fn, x, y, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    split = next(s for s in ("test", "val") if Path(a.data_dir, s).is_dir())
    test = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(f"{a.data_dir}/{split}", transform=tf), batch_size=256, num_workers=a.workers
    )
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in test:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    report(
        a,
        device,
        epochs=a.epochs,
        train_seconds=round(seconds, 1),
        images_per_sec=a.epochs * len(loader.dataset) / seconds,
        top1=100 * correct / total,
    )


if __name__ == "__main__":
    main()
