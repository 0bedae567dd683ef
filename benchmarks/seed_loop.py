"""A plain single-process PyTorch training loop, as a CPU tutorial writes it: the baseline that
distres's CPU path is measured against (``benchmarks/cpu_train.py``).

torchvision resnet50 (ImageNet stem), batch 64, Adam lr 1e-3, fp32, NCHW, ImageFolder +
DataLoader with ToTensor + Normalize. Prints a JSON line with the steady-state images/s.

    python benchmarks/seed_loop.py --data-dir CIFAR10_JPEG_DIR --steps 40 --workers 2
"""

import argparse
import json
import statistics
import time

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
    a = p.parse_args()

    tf = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
    ds = torchvision.datasets.ImageFolder(f"{a.data_dir}/train", transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch_size, shuffle=True, num_workers=a.workers)
    model = torchvision.models.resnet50(num_classes=10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    times = []
    it = iter(loader)
    for i in range(a.warmup + a.steps):
        t0 = time.perf_counter()
        x, y = next(it)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        if i >= a.warmup:
            times.append(time.perf_counter() - t0)
    total = sum(times)
    print(json.dumps({"loop": "seed", "images_per_sec": a.batch_size * len(times) / total,
                      "median_step_s": statistics.median(times), "steps": len(times),
                      "batch_size": a.batch_size, "workers": a.workers,
                      "threads": torch.get_num_threads(), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
