"""A shard set against the ImageFolder it was made from: the torch loader's img/s without a
model, start-up time, files opened and bytes read per epoch, from a local folder and from a
local S3 server (moto, through s3fs, with a cache folder); and, at ImageNet's size (a
generated 1,281,167-sample manifest over the same shards), start-up time and the resident
memory each worker gains over 2,000 batches. Results: benchmarks/results/shards-cpu.md.

    tar xzf ../shared/data/cifar10-jpeg.tar.gz -C /tmp/cifar10        # train/ and test/ JPEGs
    python -m distres.prepare shards /tmp/cifar10 /tmp/cifar10-shards --shard-size 64MB
    python benchmarks/shards.py all /tmp/cifar10 /tmp/cifar10-shards --out benchmarks/results

Each case runs in a process of its own (``case``), so start-up includes building the loaders
and the first batch from a cold Python, as a training run pays them. Files opened are counted
with strace (openat calls on paths under the data), bytes read from /proc/PID/io (``rchar`` of
the process and its workers, over the second epoch).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IMAGENET = 1_281_167
NOTES = (
    "Not in the table: S3 without a cache (one range request per sample). moto's server copies the "
    "whole object for each range request, so a sample would cost a copy of its whole shard: a measure of "
    "moto, not of S3. Shards read 512 bytes more per sample than the image (its tar "
    "header, checked against the table). In the ImageNet-size table, `folder` is a folder of "
    "1,281,167 hard links to the CIFAR-10 training JPEGs in 1,000 class folders (ImageNet's layout) on the local "
    "disk, listed with its directory entries in the page cache (a shared file system lists slower); `folder-list` "
    "holds the 50,000 CIFAR-10 paths repeated to 1,281,167 in a Python list (distinct string objects, as a listing "
    "makes them), where the folder source keeps them in `data.strings`' NumPy arrays."
)


def _loaders(data: str, where: str, workers: int, batch: int, extra=()):
    import torch

    from distres.config import parse_args
    from distres.data import build
    from distres.dist import DistContext

    cfg = parse_args(
        ["--data", data, "--data-dir", where, "--image-size", "32", "--batch-size", str(batch)]
        + ["--data-backend", "torch", "--workers", str(workers), "--device", "cpu", *extra]
    )
    return build(cfg, DistContext(0, 0, 1, 1, torch.device("cpu"), None), torch.contiguous_format)


def _imports() -> None:
    """What every case imports, loaded before its clock starts (start-up is distres's work:
    listing or reading the manifest, building the loaders, forking workers, the first batch)."""
    import torch  # noqa: F401

    import distres.data.loaders  # noqa: F401
    import distres.data.shards  # noqa: F401
    import distres.data.torchloader  # noqa: F401


def _rchar(pids) -> int:
    total = 0
    for pid in pids:
        text = Path(f"/proc/{pid}/io").read_text()
        total += int(re.search(r"rchar: (\d+)", text).group(1))
    return total


def _worker_pids(loader) -> list[int]:
    it = loader.loader._iterator
    return [w.pid for w in it._workers] if it is not None else []


def case(data: str, where: str, workers: int, batch: int, epochs: int, extra: list[str]) -> dict:
    """One loader: start-up to the first batch, then img/s and bytes read per epoch."""
    _imports()
    t0 = time.perf_counter()
    train = _loaders(data, where, workers, batch, extra).train
    out = {"epochs": []}
    for epoch in range(epochs):
        train.set_epoch(epoch)
        pids = [os.getpid(), *_worker_pids(train)]
        before, start, n = _rchar(pids), time.perf_counter(), 0
        for k, (_, labels) in enumerate(train):
            if epoch == 0 and k == 0:
                out["startup_s"] = time.perf_counter() - t0
                start = time.perf_counter()
                continue
            n += len(labels)
        seconds = time.perf_counter() - start
        pids = [os.getpid(), *_worker_pids(train)]
        out["epochs"].append({"img_s": n / seconds, "rchar": _rchar(pids) - before, "samples": n})
    return out


def _run_case(args: list[str], strace_root: str | None = None, env=None) -> dict:
    cmd = [sys.executable, __file__, "case", *args]
    log = Path("/tmp/distres-bench-strace.log")
    if strace_root:
        cmd = ["strace", "-f", "-qq", "-e", "trace=openat", "-e", "signal=none", "-o", str(log), *cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if strace_root:
        opened = [ln for ln in log.read_text().splitlines() if strace_root in ln and "= -1" not in ln]
        result["files_opened"] = len(opened)
    return result


def _s3_server(shards: Path):
    """moto's server on 127.0.0.1 holding the shard set; (server, URL, environment, GET counter)."""
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = dict(os.environ, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    env.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_EC2_METADATA_DISABLED="true")
    os.environ.update(env)
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="bench")
    for path in shards.iterdir():
        if path.is_file():
            s3.upload_file(str(path), "bench", f"cifar10/{path.name}")

    class Count(logging.Handler):
        gets = 0

        def emit(self, record):
            Count.gets += '"GET /bench/cifar10/' in record.getMessage() and ".tar" in record.getMessage()

    logging.getLogger("werkzeug").addHandler(Count())
    logging.getLogger("werkzeug").setLevel(logging.INFO)
    logging.getLogger("werkzeug").propagate = False
    return server, "s3://bench/cifar10", env, Count


def throughput(folder: Path, shards: Path, workers: int, batch: int) -> list[dict]:
    common = [str(workers), str(batch)]
    rows = []
    for name, data, where in (("folder", "imagefolder", folder), ("shards", "shards", shards)):
        timed = _run_case([data, str(where), *common, "2"])
        counted = _run_case([data, str(where), *common, "1"], strace_root=str(where))
        rows.append({"case": name, **timed, "files_opened": counted["files_opened"]})
    server, url, env, count = _s3_server(shards)
    try:
        cache = Path("/tmp/distres-bench-cache")
        shutil.rmtree(cache, ignore_errors=True)
        extra = ["--cache-dir", str(cache), "--cache-size", "4G"]
        timed = _run_case(["shards", url, *common, "2", *extra], env=env)
        gets = count.gets
        shutil.rmtree(cache, ignore_errors=True)
        counted = _run_case(["shards", url, *common, "1", *extra], strace_root=str(cache), env=env)
        rows.append(
            {"case": "shards, S3 (moto) + cache", **timed, "files_opened": counted["files_opened"], "s3_gets": gets}
        )
    finally:
        server.stop()
    return rows


def imagenet_size(shards: Path, out: Path) -> Path:
    """A shard set of IMAGENET samples: the real shards, and a train table that cycles through
    their samples (each table row points at a real member)."""
    import hashlib

    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((shards / "manifest.json").read_text())
    for path in shards.iterdir():
        if path.suffix in (".tar", ".idx", ".npz") and not (out / path.name).exists():
            (out / path.name).symlink_to(path)
    real = np.load(shards / manifest["splits"]["train"]["table"])
    rows = np.arange(IMAGENET) % len(real["label"])
    table = {k: real[k][rows] for k in real.files}
    buf = io.BytesIO()
    np.savez(buf, **table)
    name = "train-imagenet.samples.npz"
    (out / name).write_bytes(buf.getvalue())
    manifest["splits"]["train"].update(
        samples=IMAGENET, table=name, table_sha256=hashlib.sha256(buf.getvalue()).hexdigest()
    )
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def imagenet_folder(folder: Path, out: Path) -> Path:
    """An ImageFolder of IMAGENET files in 1,000 class folders, as ImageNet's train split is laid
    out: hard links to the folder's training JPEGs, taken in turn (and one per class in val/)."""
    done = out / "complete"
    if done.is_file():
        return out
    real = sorted(str(p) for p in (folder / "train").rglob("*.jpg"))
    per_class, extra = divmod(IMAGENET, 1000)
    n = 0
    for c in range(1000):
        for split, count in (("train", per_class + (c < extra)), ("val", 1)):
            d = out / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for j in range(count):
                target = d / f"n{c:08d}_{j}.JPEG"
                if not target.exists():
                    os.link(real[n % len(real)], target)
                n += 1
    done.write_text("")
    return out


def _private_kb(pid: int) -> tuple[int, int]:
    """(resident KB, private KB: pages this process has its own copy of) from smaps_rollup."""
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    get = lambda key: int(re.search(rf"^{key}:\s+(\d+) kB", text, re.M).group(1))  # noqa: E731
    return get("Rss"), get("Private_Clean") + get("Private_Dirty")


def memory_case(kind: str, where: str, batches: int, batch: int) -> dict:
    """One worker's memory after 10 batches and after ``batches``; ``kind``: shards, folder (a
    folder of IMAGENET files, its paths in ``data.strings``' arrays) or folder-list (a smaller
    folder's paths repeated to IMAGENET in a Python list, as before)."""
    import numpy as np
    import torch

    _imports()
    t0 = time.perf_counter()
    data = "shards" if kind == "shards" else "imagefolder"
    bundle = _loaders(data, where, 1, batch)
    train = bundle.train
    if kind == "folder-list":  # the folder's files, IMAGENET of them (cycled), as a 1.28 M-file folder would list them
        src = train.source
        real = list(src.paths)
        order = np.arange(IMAGENET) % len(real)
        paths = [(real[i] + "/")[:-1] for i in order.tolist()]  # distinct objects, as a listing makes them
        src.paths = paths
        del paths
        src.labels = src.labels[torch.from_numpy(order)]
        train = type(train)(dataclasses.replace(train.spec, source=src))
    train.set_epoch(0)
    out = {}
    for k, _ in enumerate(train):
        if k == 0:
            out["startup_s"] = time.perf_counter() - t0
        if k == 10:
            out["at_10"] = _private_kb(_worker_pids(train)[0])
        if k == batches:
            out["at_end"] = _private_kb(_worker_pids(train)[0])
            break
    out["rss_growth_mb"] = (out["at_end"][0] - out["at_10"][0]) / 1024
    out["private_growth_mb"] = (out["at_end"][1] - out["at_10"][1]) / 1024
    return out


def scale(folder: Path, shards: Path, batches: int, batch: int) -> list[dict]:
    big = imagenet_size(shards, Path("/tmp/distres-bench-imagenet"))
    many = imagenet_folder(folder, Path("/tmp/distres-bench-imagenet-folder"))
    rows = []
    for kind, where in (("folder-list", folder), ("folder", many), ("shards", big)):
        r = subprocess.run(
            [sys.executable, __file__, "memory", kind, str(where), str(batches), str(batch)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
        rows.append({"case": kind, **json.loads(r.stdout.strip().splitlines()[-1])})
    return rows


def render(result: dict) -> str:
    lines = [
        "# Shard sets against the folder they were made from (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {result['workers']} DataLoader workers, batch {result['batch']}, "
        "32-px crops, no model (the loader alone).",
        "",
        "| source | start-up to 1st batch (s) | epoch 1 img/s | epoch 2 img/s | files opened (epoch 1) | bytes read (epoch 2) |",
        "|---|---|---|---|---|---|",
    ]
    for row in result["throughput"]:
        e = row["epochs"]
        second = f"{e[1]['img_s']:.0f}" if len(e) > 1 else "-"
        rchar = f"{e[1]['rchar'] / 2**20:.0f} MiB" if len(e) > 1 else "-"
        if row["case"] == "folder":
            rchar = "not seen by rchar (torchvision's read_file)"
        opened = "-" if row["files_opened"] is None else str(row["files_opened"])
        lines.append(
            f"| {row['case']} | {row['startup_s']:.2f} | {e[0]['img_s']:.0f} | {second} | {opened} | {rchar} |"
        )
    s3 = next((r for r in result["throughput"] if "s3_gets" in r), None)
    if s3:
        lines += [
            "",
            f"S3 with the cache: {s3['s3_gets']} GET requests for shards over both epochs (the second epoch reads the cache).",
        ]
    lines += [
        "",
        f"## At ImageNet's size ({IMAGENET:,} samples; {result['mem_batches']} batches of {result['batch_mem']}, one worker)",
        "",
        "| source | start-up to 1st batch (s) | worker RSS growth (MB) | worker private-memory growth (MB) |",
        "|---|---|---|---|",
    ]
    for row in result["scale"]:
        startup = f"{row['startup_s']:.2f}" if row["case"] != "folder-list" else "-"
        lines.append(f"| {row['case']} | {startup} | {row['rss_growth_mb']:.1f} | {row['private_growth_mb']:.1f} |")
    if "load_avg" in result:
        first, last = result["load_avg"]
        load = f"Load average (1 min) {first:.1f} at the start, {last:.1f} at the end: other work on the cores slows every row. "
    else:
        load = "Load average not recorded. "
    lines += ["", load + NOTES, ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("all")
    a.add_argument("folder", type=Path)
    a.add_argument("shards", type=Path)
    a.add_argument("--workers", type=int, default=2)
    a.add_argument("--batch-size", type=int, default=256)
    a.add_argument("--mem-batches", type=int, default=2000)
    a.add_argument("--mem-batch-size", type=int, default=32)
    a.add_argument("--out", type=Path, default=None)
    a.add_argument(
        "--only", choices=("throughput", "scale"), default=None, help="measure one part; the other from --out's JSON"
    )
    sub.add_parser("case").add_argument("args", nargs=argparse.REMAINDER)
    sub.add_parser("memory").add_argument("args", nargs=4)
    args = p.parse_args()
    sys.path.insert(0, str(REPO))
    if args.command == "case":
        data, where, workers, batch, epochs, *extra = args.args
        print(json.dumps(case(data, where, int(workers), int(batch), int(epochs), extra)))
        return
    if args.command == "memory":
        kind, where, batches, batch = args.args
        print(json.dumps(memory_case(kind, where, int(batches), int(batch))))
        return
    sys.path.insert(0, str(REPO / "benchmarks"))
    from machine_info import code_version, cpu_model

    saved = args.out / "shards-cpu.json" if args.out else None
    result = json.loads(saved.read_text()) if saved and saved.is_file() and args.only else {}
    result.update(
        command="python benchmarks/shards.py " + " ".join(sys.argv[1:]),
        machine=f"{cpu_model()}, {os.cpu_count()} cores; {code_version()}",
        workers=args.workers,
        batch=args.batch_size,
        mem_batches=args.mem_batches,
        batch_mem=args.mem_batch_size,
        load_avg=[os.getloadavg()[0]],
    )
    parts = {
        "throughput": lambda: throughput(args.folder, args.shards, args.workers, args.batch_size),
        "scale": lambda: scale(args.folder, args.shards, args.mem_batches, args.mem_batch_size),
    }
    for name, measure in parts.items():
        if args.only in (None, name):
            result[name] = measure()
            if saved:  # kept as each part is done: a later failure loses nothing
                saved.parent.mkdir(parents=True, exist_ok=True)
                saved.write_text(json.dumps(result, indent=1))
    result["load_avg"].append(os.getloadavg()[0])
    if saved:
        saved.write_text(json.dumps(result, indent=1))
    text = render(result)
    print(text)
    if args.out:
        (args.out / "shards-cpu.md").write_text(text)


if __name__ == "__main__":
    main()
