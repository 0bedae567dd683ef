"""Where samples come from: an ImageFolder tree of image files, or in-memory uint8 arrays
(torchvision's CIFAR and MNIST files, read by ``known``). Both hand out (uint8 CHW tensor, int label) by index and a
name for the log; a broken file raises one of ``decode.DECODE_ERRORS``."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from distres.data import decode
from distres.data.formats import IMAGE_EXTENSIONS
from distres.data.strings import Strings
from distres.errors import UserError

LISTED = 5  # names shown in a message; the rest are "..."


def listed(names) -> str:
    """The first few names, comma-separated, with ", ..." only when some were left out."""
    names = list(names)
    return ", ".join(names[:LISTED]) + (", ..." if len(names) > LISTED else "")


class FolderSource:
    """root/<class>/<image>; classes sorted by name, as torchvision's ImageFolder does.

    ``classes`` given (a validation split) uses the training split's classes; a class folder
    without images is then only noted, while in the training split it is an error (its label
    would exist with nothing to learn it from)."""

    def __init__(self, root: Path, classes: list[str] | None = None, decoder: str = "torchvision"):
        self.root, self.decoder = root, decode.DECODERS[decoder]
        if not root.is_dir():
            raise UserError(f"data folder {root} does not exist; check --data-dir")
        found = sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))
        unknown = sorted(set(found) - set(classes)) if classes is not None else []
        if unknown:
            raise UserError(
                f"{root} has class folder(s) {listed(unknown)} that the training classes "
                f"({listed(classes)}) do not have; its "
                "images would be scored against the wrong labels: give it the same class folders"
            )
        self.classes = list(classes) if classes is not None else found
        if not self.classes:
            raise UserError(f"{root} has no class sub-folders; expected {root}/<class>/<image>.jpg")
        paths: list[str] = []
        self.notes: list[str] = []  # printed once by the caller (rank 0)
        labels: list[int] = []
        empty: list[str] = []
        ignored: list[str] = []
        for label, name in enumerate(self.classes):
            folder = root / name
            entries = (
                [e for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".")] if folder.is_dir() else []
            )
            files = sorted(e.path for e in entries if e.name.lower().endswith(IMAGE_EXTENSIONS))
            ignored += sorted(e.path for e in entries if not e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                empty.append(name)
            paths += files
            labels += [label] * len(files)
        self.paths = Strings(paths)  # (``strings`` says why not the list)
        if not paths:
            raise UserError(f"{root} holds no image files ({', '.join(IMAGE_EXTENSIONS)}); check --data-dir")
        if empty and classes is None:
            raise UserError(
                f"class folder(s) {listed(empty)} in {root} hold no image files; "
                "add images or remove the empty folder(s)"
            )
        if empty:
            self.notes.append(f"distres: note: {root} has no images of class(es) {listed(empty)}")
        if ignored:
            self.notes.append(
                f"distres: note: ignored {len(ignored)} non-image file(s) in {root} "
                f"(e.g. {ignored[0]}); images end in {', '.join(IMAGE_EXTENSIONS)}"
            )
        self.labels = torch.tensor(labels, dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.paths)

    def name(self, i: int) -> str:
        return self.paths[i]

    def read(self, i: int) -> bytes:
        return decode.read_checked(self.paths[i])

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.decoder(self.paths[i]), int(self.labels[i])


class ArraySource:
    """uint8 images held in memory as N x H x W x C (the layout of the CIFAR-10 pickles)."""

    def __init__(self, images: np.ndarray, labels, classes: list[str], name: str = "cifar10"):
        self.images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.classes, self._name, self.notes = classes, name, []

    def __len__(self) -> int:
        return len(self.labels)

    def name(self, i: int) -> str:
        return f"{self._name}[{i}]"

    def load(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


def imagefolder_splits(root: Path, classes: list[str] | None = None) -> tuple[FolderSource | None, FolderSource]:
    """train/ and val/ (or test/) under root, the validation split using train's classes.

    With ``classes`` (a trained model's), only the validation split is needed: val/, test/,
    or root itself holding the class folders; the train split is None."""
    if not root.is_dir():
        raise UserError(f"--data-dir {root} does not exist; point it at a folder with train/ and val/")
    val_dir = next((root / n for n in ("val", "test") if (root / n).is_dir()), None)
    if classes is not None:
        return None, FolderSource(val_dir or root, classes=classes)
    if not (root / "train").is_dir() or val_dir is None:
        raise UserError(f"--data-dir {root} must contain train/ and val/ (or test/) class folders")
    train = FolderSource(root / "train")
    return train, FolderSource(val_dir, classes=train.classes)
