"""``python -m distres.prepare shards SRC OUT``: a data set as tar shards (``data.shardformat``
describes the layout).

SRC is an ImageFolder (train/ and val/ or test/), torchvision's CIFAR-10 or CIFAR-100 files, or
MNIST's idx files; the samples and labels are the ones training reads from SRC, in the same
order (``sources.imagefolder_splits`` and ``known.splits`` list them). Image files go in as
they are, byte for byte, unless ``--resize`` re-encodes them as JPEG; CIFAR and MNIST images
become lossless PNGs.

The split into shards is planned once (``.plan.json``: which samples go to which shard, from
the file sizes) and each shard is one task, written under a temporary name, then its index,
then a record of it (``.done/``) with its checksum. Re-running the command skips the shards
whose record and checksum match, and rewrites the others (a damaged shard is found by its
checksum). The tables and ``manifest.json`` are written last, when every shard is there: a
shard set without its manifest is an unfinished one. Images that the training decoder cannot
read are left out, listed on the console and in the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distres import files
from distres.data import shardformat as fmt
from distres.errors import UserError

PLAN, DONE = ".plan.json", ".done"
OVERHEAD = 3 * fmt.BLOCK  # a sample's two headers and its label's block, besides its image
ESTIMATE_FROM = 64  # images encoded to estimate the size of re-encoded ones


@dataclass
class Split:
    """One split of the source: its samples in training's order."""

    name: str
    labels: np.ndarray
    names: list[str]  # each sample's name for the lists of left-out images
    read: object  # read(i) -> (bytes, extension) of sample i as the source holds it
    file_sizes: np.ndarray | None  # bytes of each source file (None: encoded here)


def _folder_split(name: str, source) -> Split:
    paths = [str(p) for p in source.paths]

    def read(i: int):
        with open(paths[i], "rb") as f:
            data = f.read()
        ext = Path(paths[i]).suffix.lower().lstrip(".")
        return data, "jpg" if ext == "jpeg" else ext

    sizes = np.array([os.stat(p).st_size for p in paths], dtype=np.int64)
    return Split(name, source.labels.numpy().astype(np.int64), paths, read, sizes)


def _array_split(name: str, source) -> Split:
    from PIL import Image

    def read(i: int):
        img = source.images[i].permute(1, 2, 0).numpy()
        if (img == img[..., :1]).all():  # MNIST: one channel, replicated again when decoded
            img = img[..., 0]
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "PNG")
        return buf.getvalue(), "png"

    return Split(name, source.labels.numpy().astype(np.int64), [source.name(i) for i in range(len(source))], read, None)


def collect(src: Path) -> tuple[str, list[str], list[Split]]:
    """(the kind of source, its classes, its train and validation splits)."""
    from distres.data import known, sources

    kinds = {
        "cifar10": src / known.CIFAR10_FOLDER,
        "cifar100": src / "cifar-100-python",
        "mnist": src / "MNIST" / "raw",
    }
    if src.name in (known.CIFAR10_FOLDER, "cifar-100-python"):
        kinds = {("cifar10" if src.name == known.CIFAR10_FOLDER else "cifar100"): src}
        src = src.parent
    kind = next((k for k, path in kinds.items() if path.is_dir()), None)
    if kind is None and all((src / n).is_file() or (src / (n + ".gz")).is_file() for n in known.MNIST_FILES[True]):
        kind = "mnist"
    if kind is None:
        train, val = sources.imagefolder_splits(src)
        for note in train.notes + val.notes:
            print(note, flush=True)
        return "imagefolder", list(train.classes), [_folder_split("train", train), _folder_split("val", val)]
    train, val = known.splits(kind, src, download=False)
    make = _folder_split if hasattr(train, "paths") else _array_split
    return kind, list(train.classes), [make("train", train), make("val", val)]


def reencode(data: bytes, size: int, quality: int) -> bytes:
    """A JPEG with the shorter side ``size`` (0: as it is); a smaller image is not enlarged."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        w, h = im.size
        scale = size / min(w, h) if size else 1.0
        if scale < 1:
            im.draft("RGB", (max(1, int(w * scale + 1)), max(1, int(h * scale + 1))))
        im = im.convert("RGB")
        if scale < 1:
            im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


class Writer:
    """Plans and writes the shards of one source into ``out`` with the given options."""

    def __init__(self, src: Path, out: Path, shard_size: int, resize: int, quality: int, workers: int):
        self.src, self.out, self.shard_size, self.workers = src, out, shard_size, workers
        self.resize, self.quality = resize, quality
        self.reencoding = resize > 0 or quality > 0
        self.options = {"shard_size": shard_size, "resize": resize, "quality": quality}

    def image(self, split: Split, i: int) -> tuple[bytes, str]:
        """Sample i's member bytes and extension; an image training could not decode raises."""
        from distres.data.decode import decode_bytes

        data, ext = split.read(i)
        if self.reencoding:
            return reencode(data, self.resize, self.quality or 90), "jpg"
        decode_bytes(data)  # the training decoder's verdict, so training never meets a bad member
        return data, ext

    def _crashing(self, split: Split, start: int, end: int) -> dict[int, str]:
        """The samples of a shard, other than JPEGs, whose decoding kills the process (libpng dies
        on some damaged PNGs instead of failing), found by decoding them in a throw-away process
        first (``data.isolate.probe``): they are left out and listed, as any unreadable image."""
        from distres.data import isolate

        if split.file_sizes is None:  # images encoded here from arrays: nothing to fear, nothing to decode twice
            return {}
        others = [i for i in range(start, end) if not split.names[i].lower().endswith((".jpg", ".jpeg"))]
        found = isolate.probe(others, lambda i: self.image(split, i)) if others else {}
        return {i: why for i, why in found.items() if why.startswith(isolate.CRASHED)}

    def plan(self, splits: list[Split]) -> dict:
        """Which samples (start, end) go to which shard, kept in OUT/.plan.json: a re-run goes on
        with the same cut, and refuses other options or another source."""
        path = self.out / PLAN
        wanted = {"source": str(self.src.resolve()), "options": self.options}
        if path.is_file():
            plan = json.loads(path.read_text())
            if {k: plan.get(k) for k in wanted} != wanted:
                raise UserError(
                    f"{self.out} holds shards of {plan.get('source')} with options {plan.get('options')}; "
                    "run again with those, or pick a new OUT folder"
                )
            return plan
        cuts = {s.name: _cut(self._sizes(s), self.shard_size) for s in splits}
        total = max(len(s.labels) for s in splits)
        plan = {**wanted, "digits": max(8, len(str(total))), "shards": cuts}
        files.atomic_write(path, lambda tmp: tmp.write_text(json.dumps(plan)))
        return plan

    def _sizes(self, split: Split) -> np.ndarray:
        if split.file_sizes is not None and not self.reencoding:
            return split.file_sizes + OVERHEAD
        n = min(ESTIMATE_FROM, len(split.labels))
        encoded = []
        for i in range(n):
            try:
                encoded.append(len(self.image(split, i)[0]))
            except Exception:  # noqa: BLE001 (a bad image only does not count towards the estimate)
                continue
        mean = int(np.mean(encoded)) if encoded else 1
        return np.full(len(split.labels), mean + OVERHEAD, dtype=np.int64)

    def run(self) -> None:
        kind, classes, splits = collect(self.src)
        self.out.mkdir(parents=True, exist_ok=True)
        plan = self.plan(splits)
        tasks = [
            (split, k, start, end) for split in splits for k, (start, end) in enumerate(plan["shards"][split.name])
        ]
        records = self._write_all(tasks, plan["digits"])
        self._finish(kind, classes, splits, records, plan["digits"])

    def _write_all(self, tasks, digits: int) -> dict:
        from tqdm import tqdm

        records, todo = {}, []
        for task in tasks:
            record = self._done(task[0].name, task[1])
            if record is None:
                todo.append(task)
            else:
                records[(task[0].name, task[1])] = record
        bar = tqdm(
            total=sum(end - start for _, _, start, end in todo),
            desc="shards",
            unit="img",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        )
        with bar, ThreadPoolExecutor(max(1, self.workers)) as pool:
            futures = {pool.submit(self._write, *task, digits, bar.update): task for task in todo}
            for fut in as_completed(futures):
                split, k = futures[fut][:2]
                records[(split.name, k)] = fut.result()
        print(
            f"distres.prepare: shards: {len(todo)} written, {len(tasks) - len(todo)} already there",
            flush=True,
        )
        return records

    def _done(self, split: str, k: int) -> dict | None:
        """The record of shard k if the shard is there and whole (its checksum matches)."""
        tar = self.out / fmt.shard_name(split, k)
        record_path = self.out / DONE / (tar.name + ".json")
        if not record_path.is_file() or not tar.is_file():
            return None
        record = json.loads(record_path.read_text())
        idx = self.out / fmt.index_name(tar.name)
        if tar.stat().st_size == record["bytes"] and files.sha256(tar) == record["sha256"] and idx.is_file():
            return record
        print(f"distres.prepare: {tar} does not match its checksum; writing it again", flush=True)
        return None

    def _write(self, split: Split, k: int, start: int, end: int, digits: int, progress) -> dict:
        name = fmt.shard_name(split.name, k)
        members, table, bad = [], {"key": [], "offset": [], "size": [], "label": []}, []
        digest, offset = hashlib.sha256(), 0

        def put(f, member: str, data: bytes) -> int:
            nonlocal offset
            block = fmt.member_header(member, len(data)) + data + bytes(fmt.padded(len(data)))
            f.write(block)
            digest.update(block)
            offset += len(block)
            return offset - len(block) + fmt.BLOCK

        crashing = self._crashing(split, start, end)

        def write(tmp: Path) -> None:
            with open(tmp, "wb") as f:
                for i in range(start, end):
                    progress(1)
                    if i in crashing:
                        bad.append((split.names[i], crashing[i]))
                        continue
                    try:
                        data, ext = self.image(split, i)
                    except Exception as e:  # noqa: BLE001 (whatever the decoders raise, the image is left out)
                        bad.append((split.names[i], " ".join(str(e).split())[:200] or type(e).__name__))
                        continue
                    key = fmt.key_text(i, digits)
                    cls = str(int(split.labels[i])).encode()
                    at = put(f, f"{key}.{ext}", data)
                    members.append(
                        [(f"{key}.{ext}", at, len(data)), (f"{key}.cls", put(f, f"{key}.cls", cls), len(cls))]
                    )
                    for field, value in zip(table, (i, at, len(data), int(split.labels[i]))):
                        table[field].append(value)
                end_blocks = bytes(2 * fmt.BLOCK)
                f.write(end_blocks)
                digest.update(end_blocks)

        files.atomic_write(self.out / name, write)
        lines = [f"v1.2 {len(members)}"] + [fmt.index_line(m) for m in members]
        files.atomic_write(self.out / fmt.index_name(name), lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
        record = {"tar": name, "samples": len(members), "bytes": offset + 2 * fmt.BLOCK, "sha256": digest.hexdigest()}
        record.update(table=table, bad=bad)
        files.atomic_write(self.out / DONE / (name + ".json"), lambda tmp: tmp.write_text(json.dumps(record)))
        return record

    def _finish(self, kind: str, classes: list[str], splits: list[Split], records: dict, digits: int) -> None:
        manifest = {
            "format": fmt.MANIFEST_FORMAT,
            "version": fmt.VERSION,
            "dataset": kind,
            "classes": classes,
            "source": str(self.src.resolve()),
            "options": self.options,
            "key_digits": digits,
            "splits": {},
            "left_out": [],
        }
        for split in splits:
            shards = [records[key] for key in sorted(k for k in records if k[0] == split.name)]
            manifest["left_out"] += [{"name": n, "reason": r} for s in shards for n, r in s["bad"]]
            table = {
                f: np.concatenate([np.asarray(s["table"][f], dtype=np.int64) for s in shards])
                for f in shards[0]["table"]
            }
            table["shard"] = np.concatenate([np.full(s["samples"], k, dtype=np.int32) for k, s in enumerate(shards)])
            table_file = self.out / fmt.table_name(split.name)
            files.atomic_write(table_file, lambda tmp, t=table: _save_npz(tmp, t))
            manifest["splits"][split.name] = {
                "samples": int(sum(s["samples"] for s in shards)),
                "table": table_file.name,
                "table_sha256": files.sha256(table_file),
                "shards": [
                    {
                        "tar": s["tar"],
                        "index": fmt.index_name(s["tar"]),
                        "samples": s["samples"],
                        "bytes": s["bytes"],
                        "sha256": s["sha256"],
                    }
                    for s in shards
                ],
            }
        files.atomic_write(self.out / fmt.MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=1)))
        for item in manifest["left_out"]:
            print(f"  unreadable, left out: {item['name']}: {item['reason']}", flush=True)
        counts = ", ".join(
            f"{n} {s['samples']} samples in {len(s['shards'])} shards" for n, s in manifest["splits"].items()
        )
        print(
            f"distres.prepare: shards: {counts}, {len(manifest['left_out'])} unreadable left out; {self.out / fmt.MANIFEST}",
            flush=True,
        )


def _cut(sizes: np.ndarray, shard_size: int) -> list[tuple[int, int]]:
    """Consecutive (start, end) ranges of samples, each about ``shard_size`` bytes (at least one sample)."""
    cuts, start, total = [], 0, 0
    for i, size in enumerate(sizes.tolist()):
        if total and total + size > shard_size:
            cuts.append((start, i))
            start, total = i, 0
        total += size
    cuts.append((start, len(sizes)))
    return cuts


def _save_npz(path: Path, arrays: dict) -> None:
    with open(path, "wb") as f:
        np.savez(f, **arrays)
