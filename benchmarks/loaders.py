"""Input-pipeline throughput: images/s of each --data-backend, without a model.

What is timed is what the trainer waits for: decode + training augmentation + transfer to the
device + normalisation, batch after batch (after warm-up batches; CUDA synchronised). Every
backend runs with the same worker count (DataLoader processes or DALI threads).

    # an ImageNet-like JPEG set (crops and blends of real photos, 500x375, quality 90)
    python benchmarks/loaders.py generate .cache/data/imagenet-like --num 1000
    # any ImageFolder, chosen backends
    python benchmarks/loaders.py run --data-dir .cache/data/imagenet-like --backends torch,dali
    # everything the committed results hold, on this machine (CPU or GPU), one command:
    python benchmarks/loaders.py all --cifar10 .cache/data/cifar10 --out benchmarks/results

``all`` generates the ImageNet-like set if missing, measures torch and dali at 224 px on it
(for reference also DALI's own ``fn.readers.file`` pipeline, the stock torchvision DataLoader
recipe, and the decoders PIL and torchvision.io alone) and torch, gpu and dali on the CIFAR-10
training JPEGs at 32 px, then writes
``loaders-<cpu|gpu>.json`` and ``.md`` with the device, torch version, commit and command.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks import machine_info  # noqa: E402
from distres.host import available_cpus  # noqa: E402

# --- the ImageNet-like set ---------------------------------------------------------------------


def _photos(extra: Path | None) -> list[np.ndarray]:
    """Real photographs: matplotlib's sample photo (installed with the project) and any
    images under ``extra``."""
    from matplotlib import cbook
    from PIL import Image

    paths = [Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))]
    if extra:
        paths += sorted(p for p in extra.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))[:2000]
    return [np.asarray(Image.open(p).convert("RGB")) for p in paths]


def _crop(rng, photo: np.ndarray, w: int, h: int, zoom: tuple[float, float]) -> np.ndarray:
    """A random window of a photo scaled to w x h, maybe mirrored, with a colour cast."""
    from PIL import Image

    ph, pw, _ = photo.shape
    z = rng.uniform(*zoom) * max(w / pw, h / ph, 0.5)  # small photos are enlarged to fit
    cw, ch = min(pw, int(w / z)), min(ph, int(h / z))
    x, y = rng.integers(0, pw - cw + 1), rng.integers(0, ph - ch + 1)
    img = np.asarray(
        Image.fromarray(photo[y : y + ch, x : x + cw]).resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32
    )
    if rng.random() < 0.5:
        img = img[:, ::-1]
    return img * rng.uniform(0.8, 1.2, 3) + rng.uniform(-20, 20)


def make_image(seed: int, photos: list[np.ndarray], noise: float = 7.0) -> np.ndarray:
    """One ImageNet-like picture: a crop of a photo blended through a soft round mask with a
    crop of another, plus sensor-like noise, so that JPEG sizes (and so decode costs) are
    those of camera pictures rather than of flat synthetic ones."""
    rng = np.random.default_rng(seed)
    w, h = (500, 375) if rng.random() < 0.8 else (375, 500)  # ImageNet: mostly landscape
    base = _crop(rng, photos[0], w, h, (0.5, 1.2))
    over = _crop(rng, photos[rng.integers(len(photos))], w, h, (1.0, 1.2))
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), rng.uniform(0.2, 0.6) * w
    mask = np.clip(1.5 - np.hypot(xx - cx, yy - cy) / r, 0, 1)[..., None] * rng.uniform(0.3, 0.7)
    img = base * (1 - mask) + over * mask + rng.normal(0, noise, (h, w, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def generate(dst: Path, num: int, classes: int, photos_dir: Path | None, seed: int, quality: int, workers: int) -> dict:
    """dst/train/<class>/ and dst/val/<class>/ (a tenth as many); existing files are kept."""
    from PIL import Image

    photos = _photos(photos_dir)
    jobs = [("train" if i < num else "val", i) for i in range(num + max(classes, num // 10))]

    def one(job):
        split, i = job
        path = dst / split / f"class{i % classes:03d}" / f"{i:06d}.jpg"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name("." + path.name)
            Image.fromarray(make_image(seed * 1_000_003 + i, photos)).save(tmp, "JPEG", quality=quality)
            os.replace(tmp, path)
        return path.stat().st_size

    with ThreadPoolExecutor(workers) as pool:
        sizes = list(pool.map(one, jobs))
    shown = os.path.relpath(dst, REPO) if dst.resolve().is_relative_to(REPO) else str(dst)
    return {
        "path": shown,
        "train_images": num,
        "classes": classes,
        "quality": quality,
        "mean_kb": round(sum(sizes) / len(sizes) / 1024, 1),
        "photos": len(photos),
    }


# --- measuring ---------------------------------------------------------------------------------


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_loader(
    backend: str, data_dir: Path, size: int, batch: int, workers: int, device, decoder: str = "torchvision"
):
    """A training loader of one backend for this process alone, as distres.data.build makes it
    (``torch-device-decode``: the torch backend with --decode-on device)."""
    import torch

    from distres.data.bad import BadSamples
    from distres.data.base import Normalize, Spec
    from distres.data.loaders import loader_class
    from distres.data.sources import FolderSource
    from distres.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    src = FolderSource(data_dir / "train", decoder=decoder)
    spec = Spec(
        src,
        True,
        size,
        Normalize(IMAGENET_MEAN, IMAGENET_STD, device, torch.channels_last),
        BadSamples("fail"),
        batch,
        0,
        1,
        0,
        workers,
        available_cpus(),
        decode_on_device=backend == "torch-device-decode",
    )
    return loader_class(backend.removesuffix("-device-decode"))(spec)


def _dali_native(data_dir: Path, size: int, batch: int, workers: int, device):
    """DALI's own reader and random ops (fn.readers.file with shuffling, fn.random_resized_crop,
    coin-flip mirror): what the dali backend's exact external source is compared against."""
    from distres.data.dali import import_dali, to_torch
    from distres.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    Pipeline, fn, types = import_dali()
    gpu = device.type == "cuda"
    pipe = Pipeline(
        batch_size=batch, num_threads=workers, device_id=device.index if gpu else None, prefetch_queue_depth=2
    )
    with pipe:
        jpegs, labels = fn.readers.file(
            file_root=str(data_dir / "train"), random_shuffle=True, shard_id=0, num_shards=1, name="reader"
        )
        images = fn.decoders.image(jpegs, device="mixed" if gpu else "cpu", output_type=types.RGB)
        images = fn.random_resized_crop(images, size=[size, size], antialias=True)
        images = fn.crop_mirror_normalize(
            images,
            mirror=fn.random.coin_flip(),
            mean=[255 * m for m in IMAGENET_MEAN],
            std=[255 * s for s in IMAGENET_STD],
            dtype=types.FLOAT,
            output_layout="HWC",
        )
        pipe.set_outputs(images, labels)
    pipe.build()

    class Native:
        def set_epoch(self, epoch, start_sample=0):
            pass

        def __iter__(self):
            while True:
                yield to_torch(*pipe.run(), device, hwc=True)

    return Native()


def _torchvision_stock(data_dir: Path, size: int, batch: int, workers: int, device):
    """The stock recipe, for reference: torchvision ImageFolder (PIL decode), RandomResizedCrop,
    flip, ToTensor, Normalize in the workers, float32 batches through the DataLoader."""
    import torch
    import torchvision
    import torchvision.transforms as T

    from distres.data.transforms import IMAGENET_MEAN, IMAGENET_STD

    tf = T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    loader = torch.utils.data.DataLoader(
        torchvision.datasets.ImageFolder(str(data_dir / "train"), transform=tf),
        batch_size=batch,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
    )

    class Stock:
        def set_epoch(self, epoch, start_sample=0):
            pass

        def __iter__(self):
            for x, y in loader:
                yield x.to(device, non_blocking=True).contiguous(memory_format=torch.channels_last), y.to(device)

    return Stock()


def measure(loader, device, batches: int, warmup: int) -> float:
    """images/s over ``batches`` batches after ``warmup`` ones, across epoch boundaries."""
    n, seen, t0, epoch = 0, 0, None, 0
    while seen < warmup + batches:
        loader.set_epoch(epoch)
        for _images, labels in loader:
            if seen == warmup:
                _sync(device)
                t0, n = time.perf_counter(), 0
            seen += 1
            n += len(labels)
            if seen == warmup + batches:
                break
        epoch += 1
    _sync(device)
    return n / (time.perf_counter() - t0)


def decoder_rate(data_dir: Path, decoder: str, count: int) -> float:
    """Decode-only images/s, one thread, files already in the page cache."""
    import torch

    from distres.data.decode import DECODERS
    from distres.data.sources import FolderSource

    torch.set_num_threads(1)
    paths = FolderSource(data_dir / "train").paths[:count]
    fn = DECODERS[decoder]
    for p in paths[:20]:
        fn(p)
    t0 = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - t0)


def run_case(
    backend: str,
    data_dir: Path,
    size: int,
    batch: int,
    workers: int,
    device,
    batches: int,
    warmup: int,
    decoder: str = "torchvision",
    timeout: float = 600.0,
) -> dict:
    """One measurement, in a fresh process: no worker pool, DALI thread pool or page-cache
    warm-up of one backend is left for the next (forked DataLoader workers must not inherit
    DALI's threads either). A case over ``timeout`` seconds is ended and reported, and the
    others go on."""
    cmd = [
        sys.executable,
        __file__,
        "case",
        backend,
        str(data_dir),
        str(size),
        str(batch),
        str(workers),
        str(device),
        str(batches),
        str(warmup),
        decoder,
    ]
    # Its own session, so that a timeout also ends the case's DataLoader workers.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        stderr += f"\ntimed out after {timeout:g} s (--case-timeout)"
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    proc = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    if (
        proc.returncode != 0 or "timed out after" in stderr
    ):  # e.g. DALI not installed: say so and go on with the other cases
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        print(f"  {backend:28s} {data_dir.name:16s} {size:4d}px: skipped: {why}", file=sys.stderr, flush=True)
        return {
            "backend": backend,
            "data": data_dir.name,
            "image_size": size,
            "batch_size": batch,
            "workers": workers,
            "batches": batches,
            "error": why,
        }
    res = json.loads(proc.stdout.splitlines()[-1])
    print(
        f"  {res['backend']:28s} {data_dir.name:16s} {size:4d}px: {res['images_per_sec']:9.1f} img/s",
        file=sys.stderr,
        flush=True,
    )
    return res


def _case(
    backend: str,
    data_dir: str,
    size: str,
    batch: str,
    workers: str,
    device: str,
    batches: str,
    warmup: str,
    decoder: str,
) -> dict:
    import torch

    data, device = Path(data_dir), torch.device(device)
    size, batch, workers = int(size), int(batch), int(workers)
    t0 = time.perf_counter()
    if backend == "dali-native":
        loader = _dali_native(data, size, batch, workers, device)
    elif backend == "torchvision-stock":
        loader = _torchvision_stock(data, size, batch, workers, device)
    else:
        loader = make_loader(backend, data, size, batch, workers, device, decoder)
    setup_s = time.perf_counter() - t0
    rate = measure(loader, device, int(batches), int(warmup))
    return {
        "backend": backend + ("" if decoder == "torchvision" else f" ({decoder} decode)"),
        "data": data.name,
        "image_size": size,
        "batch_size": batch,
        "workers": workers,
        "images_per_sec": rate,
        "batches": int(batches),
        "warmup": int(warmup),
        "setup_s": round(setup_s, 2),
        "load_average": round(os.getloadavg()[0], 2),
    }


def interleaved(cases: list[tuple], rounds: int, timeout: float = 600.0) -> list[dict]:
    """Every case once per round, the cases taking turns: on a shared machine, load from other
    work then falls on all of them alike. The figure is the median over the rounds."""
    runs = [[] for _ in cases]
    for _ in range(rounds):
        for k, case in enumerate(cases):
            if not (runs[k] and "error" in runs[k][0]):  # a case that failed once is not retried
                runs[k].append(run_case(*case, timeout=timeout))
    merged = []
    for rs in runs:
        m = dict(rs[0])
        if "error" in m:
            merged.append(m)
            continue
        m["images_per_sec"] = statistics.median(r["images_per_sec"] for r in rs)
        m["repeats"] = [round(r["images_per_sec"], 1) for r in rs]
        m["load_average"] = [r["load_average"] for r in rs]
        m["setup_s"] = max(r["setup_s"] for r in rs)
        merged.append(m)
    return merged


def _check_sizes(runs: list[dict], data_dir: Path, batch: int, workers: int, per_repeat: int) -> None:
    """Say when the set is too small for the measurement to be the loader's steady state: fewer
    batches an epoch than workers (some never decode) or than a repeat takes (it restarts the
    epoch, its worker start-up timed). Written into each row, and to stderr."""
    from distres.data.sources import FolderSource

    per_epoch = len(FolderSource(data_dir / "train").paths) // batch
    notes = []
    if per_epoch < workers:
        notes.append(f"{per_epoch} batches an epoch for {workers} workers: only {per_epoch} ever decode")
    if per_epoch < per_repeat:
        notes.append(f"{per_epoch} batches an epoch, {per_repeat} per repeat: epoch restarts are timed")
    for note in notes:
        print(f"loaders: note: {note}; use more images or a smaller --batch-size", file=sys.stderr)
    for r in runs:
        r["size_notes"] = notes


# --- the machine and the report ----------------------------------------------------------------


def machine(device) -> dict:
    import torch

    cpu = machine_info.cpu_model()
    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "cpu_model": cpu,
        "cpus": available_cpus(),
        "torch": torch.__version__,
        "dali": dali_version,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _rate(result: dict, backend: str, data: str) -> float | None:
    return next(
        (r.get("images_per_sec") for r in result["runs"] if r["backend"] == backend and r["data"] == data), None
    )


def targets(result: dict, big: str, small: str) -> list[dict]:
    """The project's goals for the input pipelines (DALI at least 1.2x the torch backend on a CPU
    machine, 2x and 5,000 img/s with a GPU; the gpu backend 100,000 img/s on CIFAR-10),
    checked against what this machine measured."""
    gpu = result["machine"]["gpu"] is not None
    torch_big, dali_big = _rate(result, "torch", big), _rate(result, "dali", big)
    rows = []
    if torch_big and dali_big:
        need = 2.0 if gpu else 1.2
        rows.append(
            {
                "target": f"dali >= {need}x torch, 224 px training ({'GPU' if gpu else 'CPU'} machine)",
                "measured": f"{dali_big / torch_big:.2f}x",
                "met": dali_big / torch_big >= need,
            }
        )
    if gpu and dali_big:
        rows.append(
            {
                "target": "dali mixed decode >= 5,000 img/s at 224 px",
                "measured": f"{dali_big:,.0f}",
                "met": dali_big >= 5000,
            }
        )
    gpu_small = _rate(result, "gpu", small)
    if gpu and gpu_small:
        rows.append(
            {
                "target": "gpu backend >= 100,000 img/s on CIFAR-10",
                "measured": f"{gpu_small:,.0f}",
                "met": gpu_small >= 100_000,
            }
        )
    for ref in ("torchvision-stock", "dali-native"):  # context, not targets
        base = _rate(result, ref, big)
        for backend in ("torch", "dali"):
            mine = _rate(result, backend, big)
            if base and mine:
                rows.append(
                    {"target": f"(reference) {backend} / {ref}, 224 px", "measured": f"{mine / base:.2f}x", "met": None}
                )
    return rows


def render(r: dict) -> str:
    m = r["machine"]
    dev = f"{m['gpu']} + " if m["gpu"] else ""
    lines = [
        f"# Input pipelines: images/s per backend ({'GPU' if m['gpu'] else 'CPU'})",
        "",
        f"Device: {dev}{m['cpu_model']}, {m['cpus']} CPUs available; torch {m['torch']}, DALI {m['dali']}; "
        f"load average at the start {m['load_average']}.",
        f"Code: {r['commit']}.",
        f"Command: `{r['command']}`",
        "",
        "Decode + training augmentation + transfer + normalisation, no model. Each figure is the median "
        f"of {r['repeats']} rounds (all rounds in the last column); in a round every case runs once, in a "
        "fresh process, the cases taking turns, so that load from other work on a shared machine falls on "
        f"all alike. Timed: the given batches after {r['warmup']} warm-up batches. Every backend had the "
        "same workers (DataLoader processes or DALI threads).",
        "",
        "| backend | data | px | batch | workers | timed batches | images/s | rounds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in r["runs"]:
        if "error" in x:
            lines.append(
                f"| {x['backend']} | {x['data']} | {x['image_size']} | {x['batch_size']} | {x['workers']} | "
                f"{x['batches']} | not run: {x['error'][:120]} | |"
            )
            continue
        lines.append(
            f"| {x['backend']} | {x['data']} | {x['image_size']} | {x['batch_size']} | {x['workers']} | "
            f"{x['batches']} | **{x['images_per_sec']:,.0f}** | "
            f"{', '.join(f'{v:,.0f}' for v in x['repeats'])} |"
        )
    if r.get("decoders"):
        lines += [
            "",
            "Decoders alone (one thread, files in the page cache; the torch backend uses the faster):",
            "",
            "| data | decoder | images/s |",
            "| --- | --- | --- |",
        ]
        lines += [f"| {d['data']} | {d['decoder']} | {d['images_per_sec']:,.0f} |" for d in r["decoders"]]
    if r.get("datasets"):
        lines += ["", "Data:", ""]
        lines += [f"- {name}: {json.dumps(info)}" for name, info in r["datasets"].items()]
    if r.get("targets"):
        lines += ["", "| target | measured | met |", "| --- | --- | --- |"]
        lines += [
            f"| {t['target']} | {t['measured']} | {'-' if t['met'] is None else 'yes' if t['met'] else 'NO'} |"
            for t in r["targets"]
        ]
    return "\n".join(lines) + "\n"


def write(result: dict, out: Path | None, name: str) -> None:
    print(json.dumps(result, indent=2))
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / f"{name}.md").write_text(render(result))


# --- command line ------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    cpus = available_cpus()
    g = sub.add_parser("generate", help="write an ImageNet-like JPEG ImageFolder")
    g.add_argument("dst", type=Path)
    g.add_argument("--num", type=int, default=1000, help="training images (validation: a tenth)")
    g.add_argument("--classes", type=int, default=10)
    g.add_argument("--photos", type=Path, default=None, help="more real photos to crop and blend (any image folder)")
    g.add_argument("--quality", type=int, default=90)
    g.add_argument("--seed", type=int, default=0)
    sub.add_parser("case", help="(internal) one measurement, printed as JSON").add_argument("args", nargs=9)
    sub.add_parser("render", help="rewrite the Markdown of a saved JSON result").add_argument("json", type=Path)
    for name in ("run", "all"):
        s = sub.add_parser(name)
        s.add_argument("--batch-size", type=int, default=64)
        s.add_argument("--batches", type=int, default=20, help="timed batches per repeat")
        s.add_argument("--warmup", type=int, default=3)
        s.add_argument("--repeats", type=int, default=3, help="rounds; each case runs once per round")
        s.add_argument("--workers", type=int, default=cpus, help="DataLoader processes / DALI threads")
        s.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
        s.add_argument("--out", type=Path, default=None, help="folder for the JSON and Markdown results")
        s.add_argument("--case-timeout", type=float, default=600.0, help="seconds per case and round")
    run = sub.choices["run"]
    run.add_argument("--data-dir", type=Path, required=True, help="an ImageFolder with train/")
    run.add_argument(
        "--backends",
        default="torch,dali",
        help="comma-separated: torch, torch-device-decode (--decode-on device), gpu, dali, and for "
        "reference dali-native, torchvision-stock",
    )
    run.add_argument("--image-size", type=int, default=224)
    run.add_argument("--name", default="loaders", help="result file name (without extension)")
    al = sub.choices["all"]
    al.add_argument(
        "--imagenet-like",
        type=Path,
        default=REPO / ".cache" / "data" / "imagenet-like",
        help="generated here when missing",
    )
    al.add_argument("--num", type=int, default=1000, help="images to generate")
    al.add_argument("--cifar10", type=Path, default=None, help="CIFAR-10 JPEG folder with train/ (gpu backend)")
    a = p.parse_args()

    if a.command == "case":  # one measurement, run by run_case in its own process
        print(json.dumps(_case(*a.args)))
        return
    if a.command == "render":  # rewrite the Markdown of a saved result (and its checked targets)
        result = json.loads(a.json.read_text())
        names = [x["data"] for x in result["runs"]]
        result["targets"] = targets(result, names[0], "cifar10" if "cifar10" in names else "")
        write(result, a.json.parent, a.json.stem)
        return
    if a.command == "generate":
        print(json.dumps(generate(a.dst, a.num, a.classes, a.photos, a.seed, a.quality, cpus)))
        return
    import torch

    device = (
        torch.device("cuda", 0)
        if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
        else torch.device("cpu")
    )
    result = {
        "machine": machine(device),
        "commit": machine_info.code_version(),
        "command": "python benchmarks/loaders.py " + " ".join(sys.argv[1:]),
        "batches": a.batches,
        "warmup": a.warmup,
        "repeats": a.repeats,
        "runs": [],
        "datasets": {},
    }
    if a.command == "run":
        result["runs"] = interleaved(
            [
                (b, a.data_dir, a.image_size, a.batch_size, a.workers, device, a.batches, a.warmup)
                for b in a.backends.split(",")
            ],
            a.repeats,
            a.case_timeout,
        )
        _check_sizes(result["runs"], a.data_dir, a.batch_size, a.workers, a.warmup + a.batches)
        write(result, a.out, a.name)
        return

    big = a.imagenet_like
    result["datasets"]["imagenet-like"] = generate(big, a.num, 10, None, 0, 90, cpus)
    gpu = device.type == "cuda"
    batch = a.batch_size * (4 if gpu else 1)  # larger batches on a GPU machine, as training there uses
    common = (big, 224, batch, a.workers, device, a.batches, a.warmup)
    result["runs"] = interleaved(
        [
            ("torch", *common),
            ("dali", *common),
            ("dali-native", *common),
            ("torch", *common, "pil"),
            ("torchvision-stock", *common),
        ],
        a.repeats,
        a.case_timeout,
    )
    result["decoders"] = [
        {"data": big.name, "decoder": d, "images_per_sec": round(decoder_rate(big, d, 300), 1)}
        for d in ("torchvision", "pil")
    ]
    if a.cifar10:
        result["datasets"]["cifar10"] = {"path": str(a.cifar10)}
        small = (a.cifar10, 32, 512 if gpu else 256, a.workers, device)
        result["runs"] += interleaved(
            [
                ("gpu", *small, a.batches * 10, a.warmup),  # ~100x faster: time more
                ("torch", *small, a.batches, a.warmup),
                ("dali", *small, a.batches, a.warmup),
            ],
            a.repeats,
            a.case_timeout,
        )
        result["decoders"] += [
            {"data": a.cifar10.name, "decoder": d, "images_per_sec": round(decoder_rate(a.cifar10, d, 3000), 1)}
            for d in ("torchvision", "pil")
        ]
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["targets"] = targets(result, big.name, a.cifar10.name if a.cifar10 else "")
    write(result, a.out, "loaders-gpu" if gpu else "loaders-cpu")


if __name__ == "__main__":
    main()
