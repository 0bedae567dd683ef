"""python -m distres.prepare on files made here: ffmpeg's test-pattern videos, JPEGs, CIFAR-10
pickles. Broken inputs are listed and counted without stopping the run; a second run skips
what exists; the outputs load as an ImageFolder."""

import pickle
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distres.prepare import main
from tests.helpers import break_jpeg, make_imagefolder, run_here

needs_ffmpeg = pytest.mark.skipif(
    shutil.which("ffmpeg") is None, reason="the ffmpeg program is not installed (apt-get install ffmpeg)"
)


def _testsrc(path: Path, seconds: int, size: str, pattern: str = "testsrc") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "ffmpeg",
            "-nostdin",
            "-loglevel",
            "error",
            "-f",
            "lavfi",
            "-i",
            f"{pattern}=duration={seconds}:size={size}:rate=10",
            "-pix_fmt",
            "yuv420p",
            str(path),
        ],
        check=True,
    )
    return path


def _summary(out: str) -> str:
    return next(ln for ln in out.splitlines() if ln.startswith("distres.prepare: ") and "written" in ln)


@needs_ffmpeg
def test_video_frames_broken_video_listed_and_rerun_skips(tmp_path, capsys):
    src, dst = tmp_path / "videos", tmp_path / "frames"
    _testsrc(src / "bars" / "clip.mp4", 2, "96x64")
    _testsrc(src / "noise" / "tall.mkv", 1, "64x96", "testsrc2")
    good = src / "bars" / "clip.mp4"
    (src / "noise" / "cut.mp4").write_bytes(good.read_bytes()[:1500])  # a cut-off download
    (src / "noise" / "README.txt").write_text("not a video")
    assert main(["video", str(src), str(dst), "--fps", "2", "--size", "32", "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert _summary(out) == "distres.prepare: video: 2 written, 0 already there, 1 unreadable"
    assert f"unreadable: {src / 'noise' / 'cut.mp4'}: " in out
    assert "1 file(s) are not videos" in out and "README.txt" in out
    frames = sorted(dst.rglob("*.jpg"))
    assert [f.relative_to(dst).as_posix() for f in frames] == [
        "bars/clip_000001.jpg",
        "bars/clip_000002.jpg",
        "bars/clip_000003.jpg",
        "bars/clip_000004.jpg",
        "noise/tall_000001.jpg",
        "noise/tall_000002.jpg",
    ]  # 2 fps of 2 s and 1 s
    assert {Image.open(f).size for f in frames} == {(48, 32), (32, 48)}  # shorter side 32
    assert not list(dst.rglob(".*"))  # no temporary folders left

    (dst / "bars" / "clip_000001.jpg").unlink()  # as if interrupted before this clip finished
    assert main(["video", str(src), str(dst), "--fps", "2", "--size", "32"]) == 0
    assert _summary(capsys.readouterr().out) == "distres.prepare: video: 1 written, 1 already there, 1 unreadable"
    assert len(list(dst.rglob("*.jpg"))) == 6

    from distres.data.sources import FolderSource

    frames = FolderSource(dst)
    assert frames.classes == ["bars", "noise"] and len(frames) == 6


def test_resize_keeps_the_tree_lists_broken_images_and_resumes(tmp_path, capsys):
    src = make_imagefolder(tmp_path / "src", {"train": {"a": 3, "b": 2}, "val": {"a": 1}}, size=80)
    Image.new("RGB", (100, 60), (10, 200, 30)).save(src / "train" / "b" / "wide.png")
    Image.new("RGB", (20, 24)).save(src / "val" / "a" / "small.jpg")  # smaller than --size: copied as is
    broken = break_jpeg(src / "train" / "a" / "0001.jpg", "truncated")
    dst = tmp_path / "dst"
    assert main(["resize", str(src), str(dst), "--size", "40"]) == 0
    out = capsys.readouterr().out
    assert _summary(out) == "distres.prepare: resize: 7 written, 0 already there, 1 unreadable"
    assert f"unreadable: {broken}: " in out
    assert Image.open(dst / "train" / "a" / "0000.jpg").size == (40, 40)
    assert Image.open(dst / "train" / "b" / "wide.jpg").size == (67, 40)  # PNG in, JPEG out
    assert (dst / "val" / "a" / "small.jpg").read_bytes() == (src / "val" / "a" / "small.jpg").read_bytes()
    assert not (dst / "train" / "a" / "0001.jpg").exists()
    assert main(["resize", str(src), str(dst), "--size", "40"]) == 0
    assert _summary(capsys.readouterr().out) == "distres.prepare: resize: 0 written, 7 already there, 1 unreadable"


def test_cifar10_pickles_to_png_folders(tmp_path, capsys):
    """torchvision's CIFAR-10 layout (pickled dicts of 3072-byte rows), a few images per file."""
    root = tmp_path / "c" / "cifar-10-batches-py"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        batches[name] = (rng.integers(0, 256, (3, 3072), dtype=np.uint8), [1, 7, 1])
        with open(root / name, "wb") as f:
            pickle.dump({"data": batches[name][0], "labels": batches[name][1]}, f)
    dst = tmp_path / "out"
    assert main(["cifar10", str(tmp_path / "c"), str(dst)]) == 0
    out = capsys.readouterr().out
    assert _summary(out) == "distres.prepare: cifar10: 6 written, 0 already there, 0 unreadable"
    assert sorted(p.relative_to(dst).as_posix() for p in (dst / "test").rglob("*.png")) == [
        "test/automobile/00000.png",
        "test/automobile/00002.png",
        "test/horse/00001.png",
    ]
    # lossless: the exact pixels, numbered through the split (data_batch_2 starts at 10000)
    img = np.asarray(Image.open(dst / "train" / "horse" / "10001.png"))
    assert np.array_equal(img, batches["data_batch_2"][0][1].reshape(3, 32, 32).transpose(1, 2, 0))
    assert len(list((dst / "train").rglob("*.png"))) == 5 * 3


def test_bad_arguments_are_one_line(tmp_path):
    r = run_here(main, ["resize", str(tmp_path / "nope"), str(tmp_path / "o"), "--size", "32"])
    assert r.returncode == 2
    assert r.stderr.strip() == (
        f"distres: error: {tmp_path / 'nope'} is not a folder; pass SRC as a folder of class folders"
    )
    (tmp_path / "flat").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "flat" / "x.jpg")
    assert main(["resize", str(tmp_path / "flat"), str(tmp_path / "o"), "--size", "0"]) == 2
    assert main(["resize", str(tmp_path / "flat"), str(tmp_path / "o"), "--size", "4"]) == 2  # no class folders


def test_size_defaults_to_a_shorter_side_of_256():
    from distres.prepare import build_parser

    for command in (["video", "src", "dst", "--fps", "2"], ["resize", "src", "dst"]):
        assert build_parser().parse_args(command).size == 256
