"""Many strings (a data set's file paths) held in two NumPy arrays instead of a list.

A forked DataLoader worker shares its parent's memory until a page is written, and reading a
Python object writes its reference count: a list of 1.28 M path strings is copied page by page
into every worker as the epoch touches it (pytorch/pytorch#13246), hundreds of MB per worker.
Two arrays (the UTF-8 bytes of all strings, and where each one ends) are never written."""

from __future__ import annotations

import operator

import numpy as np


class Strings:
    def __init__(self, items):
        encoded = [s.encode("utf-8", "surrogateescape") for s in items]
        self.ends = np.cumsum([len(b) for b in encoded], dtype=np.int64)
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        i = operator.index(i)
        if i < 0:
            i += len(self)
        start = int(self.ends[i - 1]) if i > 0 else 0
        return self.data[start : int(self.ends[i])].tobytes().decode("utf-8", "surrogateescape")

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __eq__(self, other) -> bool:
        return list(self) == list(other)
