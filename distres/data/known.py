"""The small data sets distres knows by name (``--data cifar10 | cifar100 | mnist``): where
their files live, their native size and normalisation, and how to read them.

Each reads torchvision's files (downloaded through torchvision when online, on local rank 0)
or, for the CIFARs, an ImageFolder copy with train/ + test/. Offline without the files the run
stops with one line saying which files to put where; a failed download leaves no folder behind
that was not there before, and a damaged download (a file cut short or missing) is one line too.

No torch import at module level: ``distres.prepare cifar10`` reads the CIFAR-10 files through
``read_cifar10`` and starts without it.

MNIST's 1-channel 28 x 28 digits are replicated to 3 identical channels when read, so every
torchvision ResNet (and any pretrained weights) takes them unchanged; the training size stays
the native 28 (no resampling), where the CIFAR stem and the pad-crop augmentation apply.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distres.data.formats import CIFAR10_CLASSES
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
    from distres.data.sources import imagefolder_splits, listed

    if name != "mnist" and (root / "train").is_dir() and any((root / n).is_dir() for n in ("test", "val")):
        return imagefolder_splits(root, classes)
    mismatch = (
        f"the model's classes ({listed(classes or [])}) are not {name}'s; "
        "pass the --data and --data-dir it was trained on"
    )
    if name == "cifar10":  # the classes are known before reading anything
        if classes is not None and list(classes) != list(CIFAR10_CLASSES):
            raise UserError(mismatch)
        return _cifar10(root, download, classes)
    reader = {"cifar100": _cifar100, "mnist": _mnist}[name]
    result = reader(root, download)
    if classes is not None and list(classes) != list(result[1].classes):
        raise UserError(mismatch)
    return result


@contextlib.contextmanager
def _new_folders_removed_on_error(root: Path):
    """On an error, remove the folders that a download made and left empty: root (and the folders
    above it) and torchvision's MNIST/raw/, which it makes before it connects. The user's folder
    stays as it was; a folder holding files (a partly finished download) is kept."""
    inner_first = [root / "MNIST" / "raw", root / "MNIST", root, *root.parents]
    new = [p for p in inner_first if not p.exists()]
    try:
        yield
    except BaseException:
        for folder in new:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only an empty one
        raise


def _download(name: str, root: Path, fix: str) -> None:
    """Download data set ``name`` into root (torchvision's layout); ``fix``: what to do offline."""
    import torchvision.datasets as tvd

    cls, title = {
        "cifar10": (tvd.CIFAR10, "CIFAR-10"),
        "cifar100": (tvd.CIFAR100, "CIFAR-100"),
        "mnist": (tvd.MNIST, "MNIST"),
    }[name]
    try:
        with _new_folders_removed_on_error(root):
            root.mkdir(parents=True, exist_ok=True)
            for train in (True, False):
                cls(str(root), train=train, download=True)
    except Exception as e:  # no network, proxy, disk full: the fix is the same
        raise UserError(
            f"{title} is not in {root} and could not be downloaded ({type(e).__name__}); offline, {fix}"
        ) from None


# --- CIFAR-10: torchvision's cifar-10-batches-py/ (data_batch_1..5, test_batch, batches.meta)

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR10_FILES = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}


def _cifar10(root: Path, download: bool, classes: list[str] | None) -> tuple:
    from distres.data.sources import ArraySource

    folder = root / CIFAR10_FOLDER
    if not folder.is_dir():
        expected = f"{CIFAR10_FOLDER}/ or train/ + test/ image folders"
        if not download:
            raise UserError(f"CIFAR-10 not found in {root}; pass --data-dir with {expected}")
        _download("cifar10", root, f"pass --data-dir with {expected}")
    _, batches = read_cifar10(
        folder,
        f"delete it and run again online (the run downloads it), or unpack an intact cifar-10-python.tar.gz in {root}",
    )
    out = []
    for split, files in CIFAR10_FILES.items():
        images = np.concatenate([batches[f][0] for f in files])
        labels = [y for f in files for y in batches[f][1]]
        out.append(ArraySource(images, labels, list(classes or CIFAR10_CLASSES), name=f"cifar10-{split}"))
    return tuple(out)


def read_cifar10(folder: Path, fix: str) -> tuple[list[str], dict[str, tuple[np.ndarray, list[int]]]]:
    """torchvision's cifar-10-batches-py/ read and checked: the class names (batches.meta's, or
    CIFAR-10's own where it is missing) and each batch file's (N x 32 x 32 x 3 uint8 images,
    N labels) by file name. A missing file or one that does not read as a CIFAR-10 batch (a
    download cut short) stops with one line naming every such file, ending in ``fix``."""
    problems = []
    missing = [n for names in CIFAR10_FILES.values() for n in names if not (folder / n).is_file()]
    if missing:
        problems.append(f"{', '.join(missing)} missing")
    batches = {}
    for name in (n for names in CIFAR10_FILES.values() for n in names if n not in missing):
        try:
            batches[name] = _cifar10_batch(folder / name)
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError) as e:
            problems.append(f"{name} unreadable ({_reason(e)})")
    classes = list(CIFAR10_CLASSES)
    if (folder / "batches.meta").is_file():
        try:
            classes = [str(c) for c in _load_pickle(folder / "batches.meta")["label_names"]]
            if len(classes) != len(CIFAR10_CLASSES):
                raise ValueError(f"{len(classes)} label names, not {len(CIFAR10_CLASSES)}")
        except (OSError, pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, IndexError) as e:
            problems.append(f"batches.meta unreadable ({_reason(e)})")
    if problems:
        raise UserError(f"{folder} is a damaged CIFAR-10 download: {'; '.join(problems)}; {fix}")
    return classes, batches


def _cifar10_batch(path: Path) -> tuple[np.ndarray, list[int]]:
    d = _load_pickle(path)
    data, labels = np.asarray(d["data"]), [int(y) for y in d["labels"]]
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(f"its images are {data.dtype} {data.shape}, not N x 3072 uint8")
    if len(labels) != len(data) or not all(0 <= y < len(CIFAR10_CLASSES) for y in labels):
        raise ValueError(f"{len(labels)} labels for {len(data)} images, or a label outside 0..9")
    # The rows hold channel planes: N x 3 x 32 x 32 -> N x H x W x C, as torchvision reads them.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _load_pickle(path: Path):
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")  # the files were written by Python 2


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())[:200]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# --- CIFAR-100: torchvision's cifar-100-python/ (train, test, meta pickles; the 100 fine labels)


def _cifar100(root: Path, download: bool) -> tuple:
    from distres.data.sources import ArraySource

    folder = root / "cifar-100-python"
    expected = "cifar-100-python/ (train, test, meta) or train/ + test/ image folders"
    if not all((folder / f).is_file() for f in ("train", "test", "meta")):
        if not download:
            raise UserError(f"CIFAR-100 not found in {root}; pass --data-dir with {expected}")
        _download("cifar100", root, f"pass --data-dir with {expected}")
    classes = list(_unpickle(folder / "meta")["fine_label_names"])
    out = []
    for split in ("train", "test"):
        d = _unpickle(folder / split)
        images = np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        out.append(ArraySource(images, d["fine_labels"], classes, name=f"cifar100-{split}"))
    return tuple(out)


def _unpickle(path: Path) -> dict:
    try:
        return _load_pickle(path)
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"{path} is not a readable CIFAR pickle ({type(e).__name__}); download it again") from None


# --- MNIST: the idx files, plain or .gz, in D/ or D/MNIST/raw/


def _mnist(root: Path, download: bool) -> tuple:
    from distres.data.sources import ArraySource

    names = [n for pair in MNIST_FILES.values() for n in pair]
    folder = _mnist_folder(root, names)
    if folder is None:
        # Name only the files that are missing, in the place that holds the others (if any).
        where, missing = min(
            ((f, [n for n in names if not _idx_path(f, n)]) for f in (root, root / "MNIST" / "raw")),
            key=lambda found: len(found[1]),
        )
        files = ", ".join(n + "[.gz]" for n in missing)
        if len(missing) == len(names):
            problem, fix = f"MNIST not found in {root}", f"pass --data-dir with {files} (in it or in its MNIST/raw/)"
        else:
            problem, fix = f"MNIST in {where} is incomplete ({files} missing)", f"put {files} in {where}"
        if not download:
            raise UserError(f"{problem}; {fix}")
        _download("mnist", root, fix)
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
