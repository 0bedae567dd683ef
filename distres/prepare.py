"""Data set preparation: video frames, smaller copies of image folders, CIFAR-10 as files.

    python -m distres.prepare video SRC DST --fps 2                # class folders of videos -> JPEG frames, shorter side 256
    python -m distres.prepare resize SRC DST --size 160            # an ImageFolder with shorter side 160 (default 256)
    python -m distres.prepare cifar10 SRC DST                      # cifar-10-batches-py -> train/ + test/ PNGs
    python -m distres.prepare shards SRC OUT --shard-size 256MB    # a data set -> WebDataset tar shards + index

Every command mirrors SRC's folder tree into DST (so SRC may be a class-folder root or hold
train/ and val/), runs ``--workers`` tasks at a time with a progress bar, and can be run again
after an interruption: outputs that already exist are skipped, and each output appears only
when it is complete (written under a temporary name, then renamed). An input that cannot be
read does not stop the run; such inputs are listed with the reason and counted at the end
(except cifar10's files: one download, checked first, and a damaged one stops the command).
``shards`` is described in ``distres.prepare_shards``.
Video decoding uses the ``ffmpeg`` binary (Debian: ``apt-get install ffmpeg``) through the
ffmpeg-python package.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import shutil
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distres.data.formats import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS
from distres.errors import ArgumentParser, UserError, run_cli
from distres.files import atomic_write
from distres.host import available_cpus

JPEG_QUALITY = 90
# Shorter side written by video and resize unless --size says otherwise: 256 px is what the
# ImageNet recipes resize to before their 224-px crops, so the outputs train at 224 px as they are.
DEFAULT_SIZE = 256
FFMPEG_QSCALE = 2  # ffmpeg's MJPEG scale (2 best .. 31 worst); 2 is close to JPEG quality 90-95


class Unreadable(Exception):
    """An input that cannot be turned into output; the run goes on and lists it."""


@dataclass
class Task:
    name: str  # the input, as listed when it fails
    done: Callable[[], bool]
    run: Callable[[], None]


def run_tasks(tasks: list[Task], workers: int, what: str) -> None:
    """Run the tasks not done yet, in parallel, with a progress bar; list the failures.

    Threads are enough: the work happens in ffmpeg processes or in PIL/zlib code that
    releases the GIL, and threads need no pickling of images."""
    from tqdm import tqdm

    todo = [t for t in tasks if not t.done()]
    failed: list[tuple[str, str]] = []
    with (
        ThreadPoolExecutor(max(1, workers)) as pool,
        tqdm(
            total=len(todo),
            desc=what,
            unit="file",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30.0,
        ) as bar,
    ):
        futures = {pool.submit(t.run): t for t in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except (Unreadable, OSError, ValueError, SyntaxError, pickle.UnpicklingError, EOFError) as e:
                failed.append((futures[fut].name, " ".join(str(e).split())[:300] or type(e).__name__))
            bar.update(1)
    done = len(todo) - len(failed)
    print(
        f"distres.prepare: {what}: {done} written, {len(tasks) - len(todo)} already there, {len(failed)} unreadable",
        flush=True,
    )
    for name, reason in sorted(failed):
        print(f"  unreadable: {name}: {reason}", flush=True)
    if failed and done == 0 and len(todo) == len(tasks):
        raise UserError(f"none of the {len(tasks)} inputs could be read (listed above); check SRC")


def _inputs(src: Path, extensions: tuple[str, ...], kind: str) -> list[Path]:
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass SRC as a folder of class folders")
    found, other = [], []
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if f.startswith("."):
                continue
            (found if f.lower().endswith(extensions) else other).append(Path(dirpath) / f)
    if other:
        print(
            f"distres.prepare: {len(other)} file(s) are not {kind}s and are left out "
            f"(e.g. {other[0]}); {kind}s end in {', '.join(extensions)}",
            flush=True,
        )
    if not found:
        raise UserError(f"{src} holds no {kind} files ({', '.join(extensions)}); expected SRC/<class>/<file>")
    for folder in sorted({p.parent for p in found}):
        if folder == src:
            raise UserError(f"{kind}s lie directly in {src}; put them in class folders, SRC/<class>/<file>")
    return found


# --- video -------------------------------------------------------------------------------------


def _ffmpeg():
    try:
        import ffmpeg
    except ImportError:
        raise UserError("the video command needs ffmpeg-python; pip install ffmpeg-python") from None
    if not hasattr(ffmpeg, "probe"):  # the unrelated PyPI package 'ffmpeg' shadows the module
        raise UserError(
            "the installed Python package 'ffmpeg' is not ffmpeg-python; "
            "pip uninstall ffmpeg && pip install ffmpeg-python"
        )
    if shutil.which("ffmpeg") is None or shutil.which("ffprobe") is None:
        raise UserError("the ffmpeg program is not installed; install it (Debian: apt-get install ffmpeg)")
    return ffmpeg


def _ffmpeg_reason(err, video: Path) -> str:
    lines = [ln for ln in (err.stderr or b"").decode(errors="replace").splitlines() if ln.strip()]
    return lines[-1].removeprefix(f"{video}: ") if lines else "ffmpeg failed"


def extract_frames(ffmpeg, video: Path, out_dir: Path, fps: float, size: int) -> int:
    """Frames at ``fps`` per second, shorter side ``size`` (the other rounded to even), as
    out_dir/<video stem>_NNNNNN.jpg. Written to a hidden folder first, moved when complete."""
    try:
        info = ffmpeg.probe(str(video))
    except ffmpeg.Error as e:
        raise Unreadable(_ffmpeg_reason(e, video)) from None
    if not any(s.get("codec_type") == "video" for s in info.get("streams", [])):
        raise Unreadable("no video stream")
    tmp = out_dir / f".{video.stem}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    scale = (f"if(lt(iw,ih),{size},-2)", f"if(lt(iw,ih),-2,{size})")
    try:
        (
            ffmpeg.input(str(video))
            .filter("fps", fps=fps)
            .filter("scale", *scale)
            .output(str(tmp / f"{video.stem}_%06d.jpg"), **{"q:v": FFMPEG_QSCALE})
            .global_args("-nostdin", "-loglevel", "error")
            .run(capture_stdout=True, capture_stderr=True)
        )
    except ffmpeg.Error as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unreadable(_ffmpeg_reason(e, video)) from None
    frames = sorted(tmp.iterdir())
    if not frames:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Unreadable("no frames could be decoded")
    for f in frames:
        os.replace(f, out_dir / f.name)
    tmp.rmdir()  # last: its absence marks the video as done
    return len(frames)


def _frames_done(video: Path, out_dir: Path) -> bool:
    return (out_dir / f"{video.stem}_000001.jpg").exists() and not (out_dir / f".{video.stem}.partial").exists()


def video_tasks(src: Path, dst: Path, fps: float, size: int) -> list[Task]:
    ffmpeg = _ffmpeg()
    tasks = []
    for video in _inputs(src, VIDEO_EXTENSIONS, "video"):
        out_dir = dst / video.parent.relative_to(src)
        tasks.append(
            Task(
                str(video),
                functools.partial(_frames_done, video, out_dir),
                lambda v=video, o=out_dir: extract_frames(ffmpeg, v, o, fps, size),
            )
        )
    return tasks


# --- resize ------------------------------------------------------------------------------------


def resize_image(src: Path, dst: Path, size: int, quality: int) -> None:
    """A JPEG copy with the shorter side ``size``; a smaller image is not enlarged."""
    from PIL import Image

    from distres.data import decode

    try:
        decode.check_pixels(src.read_bytes())  # (too many pixels: skipped before decoding)
        with Image.open(src) as im:
            w, h = im.size
            scale = size / min(w, h)
            if scale >= 1 and src.suffix.lower() in (".jpg", ".jpeg"):
                im.load()  # reads the whole file: a truncated one fails here
                atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
                return
            # JPEG draft mode decodes at 1/2, 1/4 or 1/8 scale straight from the DCT
            # coefficients, several times faster, while staying >= the target size.
            im.draft("RGB", (max(1, int(w * scale + 1)), max(1, int(h * scale + 1))))
            im = im.convert("RGB")
            if scale < 1:
                target = (max(1, round(w * scale)), max(1, round(h * scale)))
                im = im.resize(target, Image.Resampling.LANCZOS)
            atomic_write(dst, lambda tmp: im.save(tmp, "JPEG", quality=quality))
    except decode.DECODE_ERRORS as e:  # PIL: unidentified, truncated, bad header
        raise Unreadable(" ".join(str(e).split()) or type(e).__name__) from None


def resize_tasks(src: Path, dst: Path, size: int, quality: int) -> list[Task]:
    tasks = []
    for image in _inputs(src, IMAGE_EXTENSIONS, "image"):
        rel = image.relative_to(src)
        out = dst / (rel if rel.suffix.lower() in (".jpg", ".jpeg") else rel.with_suffix(".jpg"))
        tasks.append(Task(str(image), out.exists, lambda i=image, o=out: resize_image(i, o, size, quality)))
    return tasks


# --- cifar10 -----------------------------------------------------------------------------------

CIFAR_CHUNK = 1000  # images per task: enough work to amortise the task, small for the progress bar


def _cifar_root(src: Path) -> Path:
    for root in (src / "cifar-10-batches-py", src):
        if (root / "test_batch").is_file() or (root / "data_batch_1").is_file():
            return root
    raise UserError(
        f"no CIFAR-10 files in {src}; expected {src}/cifar-10-batches-py/data_batch_1 ... test_batch "
        "(torchvision's download)"
    )


def _write_pngs(images: np.ndarray, names: list[Path]) -> None:
    from PIL import Image

    for img, name in zip(images, names):
        if not name.exists():
            atomic_write(name, lambda tmp, img=img: Image.fromarray(img).save(tmp, "PNG"))


def cifar10_tasks(src: Path, dst: Path) -> list[Task]:
    """PNG (lossless: the exact CIFAR-10 pixels) as DST/train|test/<class>/NNNNN.png.

    The files are checked as training checks them (``known.read_cifar10``): they are one
    download, and a damaged one stops the command before anything is written, rather than
    leaving a copy that lacks a file's 10,000 images."""
    from distres.data.known import CIFAR10_FILES, read_cifar10

    root = _cifar_root(src)
    classes, batches = read_cifar10(
        root, "delete it, download CIFAR-10 again (torchvision's cifar-10-python.tar.gz) and run this command again"
    )
    tasks = []
    for split, files in CIFAR10_FILES.items():
        for k, fname in enumerate(files):
            path = root / fname
            images, labels = batches[fname]
            for lo in range(0, len(labels), CIFAR_CHUNK):
                # numbered through the split (each file holds 10,000), whatever else fails
                names = [
                    dst / split / classes[labels[i]] / f"{k * 10000 + i:05d}.png"
                    for i in range(lo, min(lo + CIFAR_CHUNK, len(labels)))
                ]
                part = slice(lo, lo + len(names))
                tasks.append(
                    Task(
                        f"{path}[{lo}:{lo + len(names)}]",
                        lambda n=names: all(x.exists() for x in n),
                        lambda im=images[part], n=names: _write_pngs(im, n),
                    )
                )
    return tasks


# --- command line ------------------------------------------------------------------------------


def _positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
        return value

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m distres.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    cpus = available_cpus()

    def common(sp):
        sp.add_argument("src", type=Path, help="input folder")
        sp.add_argument("dst", type=Path, help="output folder (created; existing outputs are kept)")
        sp.add_argument(
            "--workers", type=_positive(int), default=cpus, help="parallel tasks (default: the CPUs available)"
        )

    v = sub.add_parser("video", help="class folders of videos -> an ImageFolder of JPEG frames")
    common(v)
    v.add_argument("--fps", type=_positive(float), required=True, help="frames kept per second of video")
    v.add_argument(
        "--size",
        type=_positive(int),
        default=DEFAULT_SIZE,
        help=f"shorter side of the frames in pixels (default: {DEFAULT_SIZE})",
    )
    r = sub.add_parser("resize", help="a copy of an ImageFolder with the shorter side S (cheaper decoding)")
    common(r)
    r.add_argument(
        "--size",
        type=_positive(int),
        default=DEFAULT_SIZE,
        help=f"shorter side in pixels, never enlarged (default: {DEFAULT_SIZE})",
    )
    r.add_argument("--quality", type=_positive(int), default=JPEG_QUALITY, help="JPEG quality of resized images")
    c = sub.add_parser("cifar10", help="torchvision's CIFAR-10 files -> train/ and test/ PNG class folders")
    common(c)
    s = sub.add_parser("shards", help="an ImageFolder, CIFAR-10/100 or MNIST -> tar shards with an index (WebDataset)")
    common(s)
    s.add_argument("--shard-size", type=_size, default="256MB", help="about this many bytes per shard (K/M/G suffixes)")
    s.add_argument(
        "--resize", type=_positive(int), default=0, help="re-encode as JPEG, shorter side S (default: keep the files)"
    )
    s.add_argument(
        "--quality",
        type=_positive(int),
        default=0,
        help=f"re-encode as JPEG of this quality ({JPEG_QUALITY} with --resize)",
    )
    return p


def _size(text: str) -> int:
    from distres.data.shardformat import parse_size

    try:
        value = parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 (got {text})")
    return value


def main(argv: list[str] | None = None) -> int:
    def body():
        a = build_parser().parse_args(argv)
        if a.src.resolve() == a.dst.resolve():
            raise UserError("DST must differ from SRC; pick a new output folder")
        if a.command == "shards":
            from distres.prepare_shards import Writer

            return Writer(a.src, a.dst, a.shard_size, a.resize, a.quality, a.workers).run()
        if a.command == "video":
            tasks = video_tasks(a.src, a.dst, a.fps, a.size)
        elif a.command == "resize":
            tasks = resize_tasks(a.src, a.dst, a.size, a.quality)
        else:
            tasks = cifar10_tasks(a.src, a.dst)
        run_tasks(tasks, a.workers, a.command)

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
