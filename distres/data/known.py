"""The small data sets distres knows by name (``--data cifar10 | cifar100 | mnist``): where
their files live, their native size and normalisation, and how to read them.

Each reads torchvision's files (downloaded through torchvision when online, on local rank 0)
or, for the CIFARs, an ImageFolder copy with train/ + test/. Offline without the files the run
stops with one line saying which files to put where.

MNIST's 1-channel 28 x 28 digits are replicated to 3 identical channels when read, so every
torchvision ResNet (and any pretrained weights) takes them unchanged; the training size stays
the native 28 (no resampling), where the CIFAR stem and the pad-crop augmentation apply.
"""

from __future__ import annotations

import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distres.data.sources import ArraySource, imagefolder_splits
from distres.errors import UserError

NO_FLIP = ("mnist",)  # a mirrored digit is another glyph (or none): no random flips in training
MNIST_CLASSES = tuple(str(d) for d in range(10))
# The idx files as LeCun published them and torchvision keeps them (under MNIST/raw/).
MNIST_FILES = {
    True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


@dataclass(frozen=True)
class Known:  # (the native image size, the default --image-size, is config.NATIVE_SIZE)
    mean: tuple[float, ...]
    std: tuple[float, ...]


KNOWN = {
    "cifar10": Known((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": Known((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    # One channel's statistics, repeated for the three copies of it.
    "mnist": Known((0.1307,) * 3, (0.3081,) * 3),
}


def default_dir(name: str) -> Path:
    return Path(os.environ.get("DISTRES_DATA", Path.home() / ".cache" / "distres")) / name


def splits(name: str, root: Path, download: bool, classes: list[str] | None = None) -> tuple:
    """(train, test) sources of data set ``name`` from root; ``classes`` as for
    ``sources.imagefolder_splits`` (a trained model's, which must be the data set's own)."""
    if name != "mnist" and (root / "train").is_dir() and any((root / n).is_dir() for n in ("test", "val")):
        return imagefolder_splits(root, classes)
    if name == "cifar10":
        from distres.data.sources import cifar10_splits

        return cifar10_splits(root, download, classes)
    reader = {"cifar100": _cifar100, "mnist": _mnist}[name]
    result = reader(root, download)
    if classes is not None and list(classes) != list(result[1].classes):
        raise UserError(
            f"the model's classes ({', '.join(classes[:5])}, ...) are not {name}'s; "
            "pass the --data and --data-dir it was trained on"
        )
    return result


def _download(name: str, root: Path, expected: str) -> None:
    import torchvision.datasets as tvd

    cls, title = {"cifar100": (tvd.CIFAR100, "CIFAR-100"), "mnist": (tvd.MNIST, "MNIST")}[name]
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as e:  # no network, proxy, disk full: the fix is the same
        raise UserError(
            f"{title} is not in {root} and could not be downloaded ({type(e).__name__}); "
            f"offline, pass --data-dir with {expected}"
        ) from None


# --- CIFAR-100: torchvision's cifar-100-python/ (train, test, meta pickles; the 100 fine labels)


def _cifar100(root: Path, download: bool) -> tuple:
    folder = root / "cifar-100-python"
    expected = "cifar-100-python/ (train, test, meta) or train/ + test/ image folders"
    if not all((folder / f).is_file() for f in ("train", "test", "meta")):
        if not download:
            raise UserError(f"CIFAR-100 not found in {root}; pass --data-dir with {expected}")
        _download("cifar100", root, expected)
    classes = list(_unpickle(folder / "meta")["fine_label_names"])
    out = []
    for split in ("train", "test"):
        d = _unpickle(folder / split)
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out.append(ArraySource(images, d["fine_labels"], classes, name=f"cifar100-{split}"))
    return tuple(out)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="latin1")  # the files were written by Python 2
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}); download it again") from None


# --- MNIST: the idx files, plain or .gz, in D/ or D/MNIST/raw/


def _mnist(root: Path, download: bool) -> tuple:
    names = [n for pair in MNIST_FILES.values() for n in pair]
    expected = f"{', '.join(n + '[.gz]' for n in names)} (in it or in its MNIST/raw/)"
    folder = _mnist_folder(root, names)
    if folder is None:
        if not download:
            raise UserError(f"MNIST not found in {root}; pass --data-dir with {expected}")
        _download("mnist", root, expected)
        folder = _mnist_folder(root, names)
    out = []
    for train, (images, labels) in MNIST_FILES.items():
        x = read_idx(_idx_path(folder, images))
        y = read_idx(_idx_path(folder, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UserError(
                f"{folder}: {images} ({x.shape}) and {labels} ({y.shape}) do not pair up as "
                "N images and N labels; download them again"
            )
        # 1 channel -> 3 identical ones: the models and weights stay torchvision's (module docstring).
        rgb = np.repeat(x[..., None], 3, axis=-1)
        out.append(
            ArraySource(rgb, y.astype(np.int64), list(MNIST_CLASSES), name=f"mnist-{'train' if train else 't10k'}")
        )
    return tuple(out)


def _idx_path(folder: Path, name: str) -> Path | None:
    return next((p for p in (folder / name, folder / (name + ".gz")) if p.is_file()), None)


def _mnist_folder(root: Path, names: list[str]) -> Path | None:
    return next((f for f in (root, root / "MNIST" / "raw") if all(_idx_path(f, n) for n in names)), None)


_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: Path) -> np.ndarray:
    """An idx file (LeCun's format: 2 zero bytes, a type code, the number of dimensions, the
    sizes as big-endian int32, then the data), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        if data[:2] != b"\0\0" or data[2] not in _IDX_TYPES:
            raise ValueError("not an idx header")
        ndim = data[3]
        shape = tuple(int.from_bytes(data[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim))
        arr = np.frombuffer(data, dtype=_IDX_TYPES[data[2]], offset=4 + 4 * ndim)
        return arr.reshape(shape)
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise UserError(f"{path} is not a readable idx file ({type(e).__name__}); download it again") from None


def write_idx(path: Path, arr: np.ndarray) -> None:
    """``read_idx``'s inverse for uint8 arrays (gzipped when the name ends in .gz)."""
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in arr.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + arr.tobytes())
