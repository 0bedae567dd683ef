"""Where a CPU training step of ResNet-50 on 32-px images goes, and what MatmulConv2d changes.

Forward + backward of each convolution shape of ResNet-50 (ImageNet stem) at 32 px, batch 256,
channels_last, through oneDNN's convolution and through ``distres.models.MatmulConv2d``, in
bf16 autocast and fp32, the two taking turns; then the whole training step (model, AdamW) in
each, with and without ``matmul_convs``. Medians of ``--repeats``; one process, this process's
CPUs. Without bf16 instructions (AVX512-BF16, AMX), bf16 is emulated: ``--dtypes fp32``.

    python benchmarks/cpu_convs.py --out benchmarks/results               # cpu-convs.{json,md}
    python benchmarks/cpu_convs.py --dtypes fp32 --out benchmarks/results  # cpu-convs-fp32.*
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import machine_info  # noqa: E402

# (in channels, out channels, map size, kernel, stride): the layers of ResNet-50 at 32 px
SHAPES = [
    (64, 256, 8, 1, 1),
    (256, 64, 8, 1, 1),
    (64, 64, 8, 3, 1),
    (256, 128, 8, 1, 1),
    (128, 128, 4, 3, 1),
    (512, 128, 4, 1, 1),
    (512, 256, 4, 1, 1),
    (256, 256, 2, 3, 1),
    (256, 1024, 2, 1, 1),
    (1024, 256, 2, 1, 1),
    (1024, 512, 2, 1, 1),
    (512, 512, 2, 3, 2),
    (512, 512, 1, 3, 1),
    (512, 2048, 1, 1, 1),
    (2048, 512, 1, 1, 1),
]


def _ms(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - t0)


def _alternate(fns: dict, repeats: int) -> dict:
    """Each function once to warm up, then one timed call of each per round, taking turns:
    load from other work on a shared machine falls on all alike. Milliseconds per call."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_ms(fn))
    return times


def conv_rows(batch: int, repeats: int, dtypes: list[str]) -> list[dict]:
    import torch
    import torch.nn as nn

    from distres.models import matmul_convs

    rows = []
    for cin, cout, hw, k, stride in SHAPES:
        for amp in [dtype == "bf16" for dtype in dtypes]:
            ref = nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)
            fast = matmul_convs(nn.Sequential(nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False)))[0]
            x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=torch.channels_last).requires_grad_()

            def step(m, x=x, amp=amp):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    y = m(x)
                y.float().sum().backward()

            t = _alternate({"conv": lambda ref=ref: step(ref), "distres": lambda fast=fast: step(fast)}, repeats)
            rows.append(
                {
                    "shape": f"{cin}->{cout} {hw}x{hw} k{k} s{stride}",
                    "dtype": "bf16" if amp else "fp32",
                    "conv_ms": round(statistics.median(t["conv"]), 2),
                    "distres_ms": round(statistics.median(t["distres"]), 2),
                }
            )
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def step_rows(batch: int, repeats: int, dtype: str) -> list[dict]:
    import torch
    import torch.nn as nn

    from distres.models import build_model, matmul_convs

    def make(mm: bool):
        torch.manual_seed(0)
        m = build_model("resnet50", 10)
        if mm:
            matmul_convs(m)
        m = m.to(memory_format=torch.channels_last)
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True)
        x = torch.randn(batch, 3, 32, 32).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (batch,))

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
                loss = nn.functional.cross_entropy(m(x), y, label_smoothing=0.1)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return step

    times = _alternate({"oneDNN convolutions": make(False), "MatmulConv2d (distres)": make(True)}, repeats)
    return [
        {
            "step": name,
            "dtype": dtype,
            "images_per_sec": round(batch / (statistics.median(t) / 1e3), 1),
            "step_ms": [round(x) for x in t],
        }
        for name, t in times.items()
    ]


def render(r: dict) -> str:
    lines = [
        "# CPU convolutions: oneDNN vs MatmulConv2d, ResNet-50 at 32 px",
        "",
        f"Device: {r['cpu_model']}, {r['threads']} threads, torch {r['torch']}, {r['commit']}.",
        f"Command: `{r['command']}`",
        "",
        f"Forward + backward of one layer, batch {r['batch']}, channels_last, median of {r['repeats']} "
        "(the two taking turns):",
        "",
        "| layer (in->out, map, kernel, stride) | dtype | oneDNN conv ms | distres ms | ratio |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {x['shape']} | {x['dtype']} | {x['conv_ms']} | {x['distres_ms']} | {x['conv_ms'] / x['distres_ms']:.2f}x |"
        for x in r["layers"]
    ]
    lines += [
        "",
        "The whole training step (fused AdamW; bf16: under bf16 autocast):",
        "",
        "| convolutions | dtype | images/s | step ms (each repeat) |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {x['step']} | {x.get('dtype', 'bf16')} | {x['images_per_sec']} | {', '.join(map(str, x['step_ms']))} |"
        for x in r["steps"]
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtypes", default="bf16,fp32", help="comma-separated, of bf16 and fp32")
    p.add_argument("--out", default=None, help="folder for cpu-convs[-DTYPE].json and .md")
    a = p.parse_args()
    dtypes = a.dtypes.split(",")
    if not dtypes or set(dtypes) - {"bf16", "fp32"}:
        p.error(f"--dtypes {a.dtypes!r}: name bf16, fp32 or both")
    import torch

    result = {
        "cpu_model": machine_info.cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "commit": machine_info.code_version(),
        "command": "python benchmarks/cpu_convs.py " + " ".join(sys.argv[1:]),
        "batch": a.batch,
        "repeats": a.repeats,
        "layers": conv_rows(a.batch, a.repeats, dtypes),
        "steps": [row for dtype in dtypes for row in step_rows(a.batch, a.repeats, dtype)],
    }
    print(render(result))
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = "cpu-convs" if len(dtypes) > 1 else f"cpu-convs-{dtypes[0]}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{stem}.md").write_text(render(result))


if __name__ == "__main__":
    main()
