"""Damaged images through every decoding path: how many decode, how many are skipped, how many
crash their decoder, and whether each crash is caught and isolated (the run goes on without
the file) or costs the run.

    python benchmarks/fuzz_decode.py --count 3000 --seed 0 --out benchmarks/results/fuzz-decode-cpu.md

The files are seeded damaged copies (``tests/damaged.py``: bit flips, byte runs, truncations,
changed header fields and chunk lengths with their CRCs fixed, JPEG segment lengths, frame
sizes and Huffman tables, short PNG image data) of real photos (the first CIFAR-10 JPEGs of
``--real``, when that file exists) in JPEG, progressive JPEG, PNG (8-bit, 16-bit, gray, RGBA,
palette), WebP (lossy, lossless), GIF and BMP. Each path reads the whole folder once, on the CPU:
``probe`` (torchvision's decoder, each file in a forked process: the ground truth of which files
crash it), the torch backend's workers, the gpu backend's loading, DALI (CPU mode, when
installed) and ``distres.predict``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from distres.data import decode, isolate  # noqa: E402
from distres.data.bad import BadSamples  # noqa: E402
from distres.data.base import Normalize, Spec  # noqa: E402
from distres.data.loaders import loader_class  # noqa: E402
from distres.data.sources import FolderSource  # noqa: E402
from tests.damaged import base_images, fuzz  # noqa: E402


def real_bases(tar: Path, count: int) -> dict[str, bytes]:
    from PIL import Image

    bases: dict[str, bytes] = {}
    if not tar.exists():
        return base_images(size=32)
    with tarfile.open(tar) as t:
        for member in t:
            if member.isfile() and member.name.lower().endswith(".jpg"):
                im = Image.open(io.BytesIO(t.extractfile(member).read()))
                bases.update(base_images(size=48, image=im, prefix=f"r{len(bases) // 11}-"))
                if len(bases) >= 11 * count:
                    break
    return bases


def probe(paths: list[Path]) -> dict:
    t = time.perf_counter()
    found = isolate.probe([str(p) for p in paths], decode.decode_torchvision)
    crashes = sum(why.startswith(isolate.CRASHED) for why in found.values())
    misread = 0
    for p in paths:
        if str(p) not in found:
            img = decode.decode_torchvision(str(p))
            misread += tuple(img.shape[-2:]) != decode.header_size(p.read_bytes())
    return {
        "path": "torchvision, each file in a forked process",
        "decoded": len(paths) - len(found),
        "skipped": len(found) - crashes,
        "crashes": crashes,
        "isolated": crashes,
        "misread": misread,
        "seconds": time.perf_counter() - t,
    }


def backend(name: str, root: Path, total: int) -> dict:
    decode.configure()
    bad = BadSamples("skip")
    norm = Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), torch.contiguous_format)
    spec = Spec(FolderSource(root), False, 32, norm, bad, 64, 0, 1, 0, workers=2, cpus=2)
    t = time.perf_counter()
    try:
        loader = loader_class(name)(spec)
        seen = sum(len(labels) for _, labels in loader)
        ended = "yes"
    except Exception as e:  # noqa: BLE001 (the table records how the pass ended)
        seen, ended = 0, f"no: {type(e).__name__}: {str(e)[:80]}"
    crashes = sum(isolate.CRASHED in why for why in decode.excluded().values())
    return {
        "path": f"{name} backend" + (" (CPU mode)" if name == "dali" else ""),
        "decoded": seen,
        "skipped": bad.count - crashes,
        "crashes": crashes,
        "isolated": crashes if ended == "yes" else 0,
        "ended": ended,
        "accounted": seen + bad.count == total,
        "seconds": time.perf_counter() - t,
    }


def predict_row(root: Path, work: Path, total: int) -> dict:
    from distres.predict import main as predict_main
    from tests.helpers import make_imagefolder, run_here, train_here

    data = make_imagefolder(work / "tiny", {"train": {"a": 4, "b": 4}, "val": {"a": 2, "b": 2}})
    out = work / "run"
    args = ["--arch", "resnet18", "--data", "imagefolder", "--data-dir", str(data), "--image-size", "32"]
    args += ["--batch-size", "4", "--max-steps", "1", "--device", "cpu", "--no-progress", "--wandb", "disabled"]
    train_here(args + ["--amp", "none", "--output-dir", str(out)])
    t = time.perf_counter()
    ran = run_here(
        predict_main,
        ["--checkpoint", str(out / "checkpoints" / "last.pt"), str(root), "--output", str(work / "p.csv")]
        + ["--workers", "2", "--device", "cpu"],
    )
    rows = len((work / "p.csv").read_text().splitlines()) - 1 if ran.returncode == 0 else 0
    crashes = sum(f" {isolate.CRASHED} (" in ln and "left out from now on" in ln for ln in ran.stderr.splitlines())
    unreadable = total - rows
    return {
        "path": "distres.predict",
        "decoded": rows,
        "skipped": unreadable - crashes,
        "crashes": crashes,
        "isolated": crashes if ran.returncode == 0 else 0,
        "ended": "yes" if ran.returncode == 0 else f"no: exit {ran.returncode}",
        "accounted": ran.returncode == 0,
        "seconds": time.perf_counter() - t,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--real", default=str(Path(__file__).resolve().parents[2] / "shared/data/cifar10-jpeg.tar.gz"))
    p.add_argument("--out", default="benchmarks/results/fuzz-decode-cpu.md")
    p.add_argument("--only", choices=("predict",), help="rerun this row, the others read from --out's .json")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bases = real_bases(Path(a.real), 4)
        half = a.count // 2
        paths = fuzz(work / "data" / "a", half, a.seed, bases) + fuzz(
            work / "data" / "b", a.count - half, a.seed + 1, bases
        )
        if a.only:
            rows = [
                r
                for r in json.loads(Path(a.out).with_suffix(".json").read_text())["rows"]
                if r["path"] != "distres.predict"
            ]
            rows.append(predict_row(work / "data", work, len(paths)))
            write(a, rows, len(paths), len(bases))
            return
        rows = [probe(paths)]
        for name in ("torch", "gpu", "dali"):
            if name == "dali":
                try:
                    import nvidia.dali  # noqa: F401
                except ImportError:
                    continue
            rows.append(backend(name, work / "data", len(paths)))
            print(rows[-1], flush=True)
        rows.append(predict_row(work / "data", work, len(paths)))
    write(a, rows, len(paths), len(bases))


def write(a, rows: list[dict], total: int, bases: int) -> None:
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    lines = [
        f"# Damaged images through every decoding path ({total} files)",
        "",
        f"`python benchmarks/fuzz_decode.py --count {a.count} --seed {a.seed}`: {total} seeded damaged copies of "
        f"{bases} good files ({'real CIFAR-10 photos' if Path(a.real).exists() else 'generated images'} in 11 "
        f"formats and modes); {cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        "",
        "Seconds are wall time on a machine shared with other jobs (2 cores): a rough cost of isolation, "
        "not a speed figure; each crash costs a forked probe and new workers.",
        "",
        "Crashes: files that kill the process decoding them; isolated: found, left out, and the pass went on. "
        "Accounted: decoded + skipped + crashed = the files tried. Misread: decoded at another size than the header's.",
        "",
        "| path | tried | decoded | skipped | crashes | isolated | ended normally | accounted | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {total} | {r['decoded']} | {r['skipped']} | {r['crashes']} | {r['isolated']} | "
            f"{r.get('ended', 'yes')} | {r.get('accounted', True)} | {r['seconds']:.1f} |"
        )
    if "misread" in rows[0]:
        lines += ["", f"Decoded at a size other than the header's: {rows[0]['misread']}."]
    Path(a.out).write_text("\n".join(lines) + "\n")
    Path(a.out).with_suffix(".json").write_text(json.dumps({"count": total, "seed": a.seed, "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
