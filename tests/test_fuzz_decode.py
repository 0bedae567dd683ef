"""Damaged images from a seeded generator (``tests/damaged.py``: bit flips, byte runs,
truncations, changed header fields of JPEG, PNG, WebP, GIF and BMP) through every backend's
decoding and through predict: each pass ends normally, and each file is decoded or skipped and
counted, including those that crash torchvision's decoder (about one in five here). Decoded
images have the size their header declares. ``benchmarks/fuzz_decode.py`` runs thousands."""

from pathlib import Path

import pytest
import torch

from distres.data import decode, isolate
from distres.data.bad import BadSamples
from distres.data.base import Normalize, Spec
from distres.data.loaders import loader_class
from distres.data.sources import FolderSource
from tests.damaged import fuzz
from tests.helpers import closed_at_the_end

COUNT, SEED = 220, 0


@pytest.fixture(scope="module")
def fuzzed(module_dir) -> tuple[Path, list[Path]]:
    root = module_dir / "fuzzed"
    paths = fuzz(root / "a", COUNT // 2, seed=SEED) + fuzz(root / "b", COUNT - COUNT // 2, seed=SEED + 1)
    return root, paths


def test_decoded_files_have_their_declared_size_and_crashes_are_found(fuzzed):
    _, paths = fuzzed
    found = isolate.probe([str(p) for p in paths], decode.decode_torchvision)
    crashes = [p for p, why in found.items() if why.startswith(isolate.CRASHED)]
    assert 10 < len(crashes) < len(found) < len(paths)  # the generator makes all three kinds
    for p in paths:
        if str(p) not in found:  # decoded in the probe: safe to decode here
            img = decode.decode_torchvision(str(p))
            assert img.dtype == torch.uint8 and img.shape[0] == 3
            assert tuple(img.shape[-2:]) == decode.header_size(p.read_bytes()), p.name


@pytest.mark.parametrize(
    "backend", [pytest.param("torch", marks=pytest.mark.slow), pytest.param("gpu", marks=pytest.mark.slow), "dali"]
)
def test_every_backend_decodes_or_skips_each_file(fuzzed, backend):
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (pip install -e '.[dali]')")
    root, paths = fuzzed
    decode.configure()
    try:
        bad = BadSamples("skip")
        norm = Normalize((0.5,) * 3, (0.25,) * 3, torch.device("cpu"), torch.contiguous_format)
        spec = Spec(FolderSource(root), False, 32, norm, bad, 32, 0, 1, 0, workers=2, cpus=2)
        loader = closed_at_the_end(loader_class(backend)(spec))
        seen = sum(len(labels) for _, labels in loader)
        assert seen + bad.count == len(paths) and seen > 0
        assert len(decode.excluded()) > 0 or backend == "dali"
    finally:
        decode.configure()
