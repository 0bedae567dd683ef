"""Shard sets: ``python -m distres.prepare shards`` writes WebDataset tars with DALI's index, and
``--data shards`` reads them as the folder they were made from: the same batches bit for bit,
in any split of the global batch and from any resume position; damaged shard sets stop with
one line."""

import csv
import json
import tarfile

import pytest
import torch

from distres import evaluate, predict, prepare
from distres.config import parse_args
from distres.data import build
from distres.data import shardformat as fmt
from distres.data.remote import ShardError
from distres.data.sharding import epoch_order
from distres.dist import DistContext
from distres.errors import UserError
from tests.helpers import (
    TINY,
    break_jpeg,
    closed_at_the_end,
    make_imagefolder,
    one_error_line,
    run_here,
    train_here,
    train_losses,
    train_ranks,
)

COUNTS = {"train": {"cat": 14, "dog": 12, "fox": 13}, "val": {"cat": 4, "dog": 5, "fox": 3}}


@pytest.fixture(scope="module")
def shard_set(module_dir):
    """(the ImageFolder of 32-px JPEGs, its shard set in shards of about 8 KB: several per split)."""
    folder = make_imagefolder(module_dir / "folder", COUNTS)
    out = module_dir / "shards"
    r = run_here(prepare.main, ["shards", str(folder), str(out), "--shard-size", "8K", "--workers", "2"])
    assert r.returncode == 0, r.stderr
    return folder, out


def _loaders(data: str, where, world: int, rank: int, extra=()):
    cfg = parse_args(
        ["--data", data, "--data-dir", str(where), "--image-size", "32", "--seed", "5", "--batch-size", "4"]
        + ["--data-backend", "torch", "--workers", "0", *extra]
    )
    ctx = DistContext(rank, rank, world, world, torch.device("cpu"), "gloo" if world > 1 else None)
    return closed_at_the_end(build(cfg, ctx, torch.contiguous_format))


def _epoch(loader, epoch: int, start: int = 0):
    loader.set_epoch(epoch, start)
    return [(x.clone(), y.clone()) for x, y in loader]


def test_prepare_writes_tars_that_tar_readers_and_dali_index_agree_on(shard_set):
    folder, out = shard_set
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["classes"] == ["cat", "dog", "fox"] and manifest["version"] == 1
    assert manifest["splits"]["train"]["samples"] == 39 and manifest["splits"]["val"]["samples"] == 12
    shards = manifest["splits"]["train"]["shards"]
    assert len(shards) > 3 and sum(s["samples"] for s in shards) == 39
    keys, labels = [], []
    for s in shards:
        with tarfile.open(out / s["tar"]) as tar:
            members = tar.getmembers()
            names = [m.name for m in members]
            assert names == [n for k in names[::2] for n in (k, k.replace(".jpg", ".cls"))]
            labels += [int(tar.extractfile(m).read()) for m in members if m.name.endswith(".cls")]
            # DALI's index: "v1.2 N", then per sample "ext offset size name" for each member
            lines = (out / s["index"]).read_text().splitlines()
            assert lines[0] == f"v1.2 {s['samples']}"
            want = [
                f"{a.name[-3:]} {a.offset_data} {a.size} {a.name} cls {b.offset_data} {b.size} {b.name}"
                for a, b in zip(members[::2], members[1::2])
            ]
            assert lines[1:] == want
        keys += [n.split(".")[0] for n in names[::2]]
    assert keys == sorted(keys) and len(set(keys)) == 39
    assert labels == [0] * 14 + [1] * 12 + [2] * 13  # the ImageFolder's order and labels
    first = sorted((folder / "train" / "cat").iterdir())[0].read_bytes()
    with tarfile.open(out / shards[0]["tar"]) as tar:
        assert tar.extractfile(tar.getmembers()[0]).read() == first  # the file itself, byte for byte


def test_rerun_skips_whole_shards_and_rewrites_a_damaged_one(shard_set, tmp_path):
    folder, out = shard_set
    r = run_here(prepare.main, ["shards", str(folder), str(out), "--shard-size", "8K"])
    assert r.returncode == 0 and "0 written" in r.stdout, r.stdout
    damaged = out / "val-000000.tar"
    before = damaged.read_bytes()
    damaged.write_bytes(before[:700] + bytes([before[700] ^ 1]) + before[701:])
    r = run_here(prepare.main, ["shards", str(folder), str(out), "--shard-size", "8K"])
    assert "val-000000.tar does not match its checksum" in r.stdout and "1 written" in r.stdout
    assert damaged.read_bytes() == before
    r = run_here(prepare.main, ["shards", str(folder), str(out), "--shard-size", "16K"])
    assert r.returncode == 2 and "run again with those, or pick a new OUT folder" in one_error_line(r.stderr)


@pytest.mark.parametrize(
    "world,extra,start",
    [
        (1, (), 0),
        (2, (), 8),
        (2, ("--grad-accum", "2"), 16),
        (3, ("--repeated-aug", "3"), 12),
        (1, ("--decode-on", "device"), 4),
    ],
)
def test_an_epoch_over_shards_is_the_epoch_over_the_folder(shard_set, world, extra, start):
    """Every rank's batches, from the start or from a resume position, training crops and
    evaluation, the same tensors from the shards as from the folder."""
    folder, out = shard_set
    for rank in range(world):
        ref, got = _loaders("imagefolder", folder, world, rank, extra), _loaders("shards", out, world, rank, extra)
        assert ref.classes == got.classes and ref.mean == got.mean
        for split in ("train", "val"):
            want, have = (_epoch(getattr(x, split), 1, start if split == "train" else 0) for x in (ref, got))
            assert len(want) == len(have) > 0
            for (xa, ya), (xb, yb) in zip(want, have):
                assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_member_headers_read_as_tarfile_reads_them(shard_set):
    """``shardformat.header_fields`` (a sample's check that its shard holds it where the table
    says) reads each header as tarfile does, and refuses one whose checksum fails."""
    _, out = shard_set
    for path in sorted(out.glob("*.tar")):
        data = path.read_bytes()
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                header = data[member.offset : member.offset + fmt.BLOCK]
                assert fmt.header_fields(header) == (member.name, member.size)
                damaged = bytearray(header)
                damaged[3] ^= 1  # one bit of the name
                assert fmt.header_fields(bytes(damaged)) is None


@pytest.mark.parametrize("backend", ["gpu", "dali"])
def test_the_other_backends_read_shards_as_the_folder(shard_set, backend):
    """The gpu backend (the set decoded once into one tensor) and DALI's external-source feed
    (here in its CPU mode), each the same batches from the shards as from the folder."""
    if backend == "dali":
        pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (the [dali] extra)")
    folder, out = shard_set
    extra = ["--data-backend", backend, "--workers", "1"]
    ref, got = _loaders("imagefolder", folder, 2, 0, extra), _loaders("shards", out, 2, 0, extra)
    for split in ("train", "val"):
        want, have = (_epoch(getattr(x, split), 1, 8 if split == "train" else 0) for x in (ref, got))
        assert len(want) == len(have) > 0
        for (xa, ya), (xb, yb) in zip(want, have):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        if backend == "dali":  # JPEG members are known by their bytes: none decoded again to vet it
            assert getattr(got, split).vetted == set()


@pytest.mark.slow
def test_training_on_shards_is_training_on_the_folder_across_a_stop_and_resume(shard_set, tmp_path):
    """The same losses bit for bit, with a worker process reading the shards, stopped in the
    middle of the epoch and resumed (a constant schedule: stopping early leaves the learning
    rates alone)."""
    folder, out = shard_set
    base = TINY + ["--batch-size", "4", "--epochs", "1", "--workers", "1", "--seed", "2", "--schedule", "constant"]
    base += ["--warmup-epochs", "0", "--checkpoint-every", "0", "--eval-every", "0", "--threads", "1"]
    base = base[: base.index("--data")] + base[base.index("--data") + 2 :]
    whole, cut = tmp_path / "folder", tmp_path / "shards"
    r = train_here(base + ["--data", "imagefolder", "--data-dir", str(folder), "--output-dir", str(whole)])
    assert r.returncode == 0, r.stderr[-2000:]
    shards = base + ["--data", "shards", "--data-dir", str(out), "--output-dir", str(cut)]
    assert train_here(shards + ["--max-steps", "5"]).returncode == 0
    r = train_here(shards + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert train_losses(cut) == train_losses(whole) and len(train_losses(whole)) == 9
    summaries = []  # distres.evaluate: the same report from the shards as from the folder
    for data, where in (("imagefolder", folder), ("shards", out)):
        args = ["--checkpoint", str(cut / "checkpoints" / "last.pt"), "--data", data, "--data-dir", str(where)]
        r = run_here(evaluate.main, args + ["--device", "cpu", "--output-dir", str(tmp_path / data)])
        assert r.returncode == 0, r.stderr[-2000:]
        summary = json.loads((tmp_path / data / "summary.json").read_text())
        summaries.append({k: v for k, v in summary.items() if k not in ("data", "data_dir")})
    assert summaries[0] == summaries[1] and summaries[0]["eval_samples"] == 12
    tables = []  # distres.predict: the shard set's validation samples scored as the folder's files are
    for inputs in ([str(folder / "val")], [str(out), "--split", "val"]):
        preds = tmp_path / f"predictions{len(tables)}.csv"
        args = ["--checkpoint", str(cut / "checkpoints" / "last.pt"), *inputs, "--workers", "1", "--top-k", "2"]
        r = run_here(predict.main, args + ["--device", "cpu", "--output", str(preds)])
        assert r.returncode == 0, r.stderr[-2000:]
        tables.append(list(csv.reader(preds.open())))
    assert len(tables[1]) == 13 and tables[1][1][0] == f"{out / 'val-000000.tar'}:00000000"
    assert [row[1:] for row in tables[0]] == [row[1:] for row in tables[1]]


def _copy(out, tmp_path):
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(out, dst)
    return dst


def _fails(where, tmp_path, workers: str = "0") -> str:
    args = TINY[: TINY.index("--data")] + TINY[TINY.index("--data") + 2 :]
    args += ["--data", "shards", "--data-dir", str(where), "--batch-size", "4", "--workers", workers]
    r = train_here(args + ["--max-steps", "1", "--eval-every", "0", "--output-dir", str(tmp_path / "run")])
    assert r.returncode == 2, r.stderr[-2000:]
    return one_error_line(r.stderr)


def test_damaged_shard_sets_are_one_line(shard_set, tmp_path):
    """A missing manifest, one of another version, shards cut short (found in a worker process),
    and shards whose members are not where the table says."""
    _, out = shard_set
    assert "the folder holds no manifest): --data-dir is not a shard set" in _fails(tmp_path, tmp_path)
    copy = _copy(out, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(UserError, match="version 99"):
        _loaders("shards", copy, 1, 0)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    originals = {tar.name: tar.read_bytes() for tar in copy.glob("train-*.tar")}
    for name, data in originals.items():  # the member headers moved: the table no longer points at them
        (copy / name).write_bytes(bytes(512) + data[:-512])
    with pytest.raises(ShardError, match="does not hold sample .* its index disagrees"):
        _epoch(_loaders("shards", copy, 1, 0).train, 0)
    for name, data in originals.items():  # every shard cut short, whichever the first batch reads
        (copy / name).write_bytes(data[:1000])
    line = _fails(copy, tmp_path, workers="1")
    assert "cut short or replaced" in line and "distres.prepare shards again" in line and "Traceback" not in line


def test_an_undecodable_member_is_skipped_and_counted(shard_set, tmp_path, capsys):
    _, out = shard_set
    copy = _copy(out, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    bad = copy / manifest["splits"]["train"]["shards"][0]["tar"]
    data = bytearray(bad.read_bytes())
    sos = data.index(b"\xff\xda")  # the first image's scan header, as helpers.break_jpeg damages a file
    data[sos + 5] = 0x77
    bad.write_bytes(bytes(data))
    loader = _loaders("shards", copy, 1, 0).train
    batches = _epoch(loader, 0)
    assert loader.bad_samples == 1 and sum(len(y) for _, y in batches) == len(batches) * 4 - 1
    assert f"skipping unreadable image {bad}:00000000" in capsys.readouterr().err


def test_prepare_lists_and_leaves_out_unreadable_images(tmp_path):
    folder = make_imagefolder(tmp_path / "folder", {"train": {"a": 3, "b": 2}, "val": {"a": 1, "b": 1}})
    broken = break_jpeg(sorted((folder / "train" / "b").iterdir())[0], "truncated")
    r = run_here(prepare.main, ["shards", str(folder), str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    assert f"unreadable, left out: {broken}" in r.stdout
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 4 and manifest["left_out"][0]["name"] == str(broken)


def test_mnist_files_become_shards_of_the_same_pixels_and_settings(tmp_path):
    """Arrays (here MNIST's idx files) go in as lossless PNGs: the shards decode to the pixels
    the arrays hold, with their labels, and keep the data set's own statistics and no flips."""
    import numpy as np

    from distres.data import known

    rng = np.random.default_rng(0)
    (tmp_path / "mnist").mkdir()
    for stem, n in (("train", 20), ("t10k", 8)):
        known.write_idx(tmp_path / "mnist" / f"{stem}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        known.write_idx(tmp_path / "mnist" / f"{stem}-labels-idx1-ubyte", np.arange(n) % 10)
    r = run_here(prepare.main, ["shards", str(tmp_path / "mnist"), str(tmp_path / "out"), "--shard-size", "4K"])
    assert r.returncode == 0, r.stderr
    arrays = known.splits("mnist", tmp_path / "mnist", download=False)
    bundle = _loaders("shards", tmp_path / "out", 1, 0, ["--image-size", "28"])
    for array, shards in zip(arrays, (bundle.train.source, bundle.val.source)):
        assert len(array) == len(shards) and shards.dataset == "mnist"
        for i in range(len(array)):
            (a, la), (b, lb) = array.load(i), shards.load(i)
            assert torch.equal(a, b) and la == lb
    assert bundle.mean == known.KNOWN["mnist"].mean and bundle.train.spec.flip is False


def test_shard_scope_reads_shard_after_shard_and_resumes_exactly_on_another_split(shard_set):
    """--shuffle-scope shard: the epoch visits the shards one after the other (each shuffled
    within, the shards in a shuffled order), a function of seed and epoch alone, so 2 processes
    from a resume position get the micro-batches of 1 process with --grad-accum 2."""
    _, out = shard_set
    scope = ["--shuffle-scope", "shard"]
    one = _loaders("shards", out, 1, 0, scope + ["--grad-accum", "2"]).train
    shard_of = one.source.shard
    order = epoch_order(len(shard_of), 5, 0, True, blocks=shard_of).numpy()  # the global order (--seed 5)
    assert sorted(order.tolist()) == list(range(len(shard_of))) and order.tolist() != sorted(order.tolist())
    visited = shard_of[order]
    runs = [int(k) for i, k in enumerate(visited) if i == 0 or k != visited[i - 1]]
    assert len(runs) == len(set(runs)) == len(set(shard_of.tolist())) and runs != sorted(runs)
    accum = _epoch(one, 0, 8)
    for rank in range(2):
        two = _epoch(_loaders("shards", out, 2, rank, scope).train, 0, 8)
        assert len(two) == len(accum) // 2
        for k, (x, y) in enumerate(two):
            assert torch.equal(x, accum[2 * k + rank][0]) and torch.equal(y, accum[2 * k + rank][1])


def test_dali_webdataset_reader_takes_the_shards_and_their_index(shard_set):
    """DALI's own reader (``fn.readers.webdataset``, CPU mode) reads the tars through the index
    files as they are: the first samples' bytes and labels are the folder's files and classes."""
    import numpy as np

    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI not installed (the [dali] extra)")
    from nvidia.dali import fn, pipeline_def

    folder, out = shard_set
    shards = json.loads((out / "manifest.json").read_text())["splits"]["train"]["shards"]

    @pipeline_def(batch_size=5, num_threads=1, device_id=None)
    def pipe():
        images, labels = fn.readers.webdataset(
            paths=[str(out / s["tar"]) for s in shards],
            index_paths=[str(out / s["index"]) for s in shards],
            ext=["jpg", "cls"],
            random_shuffle=False,
        )
        return images, labels

    p = pipe()
    p.build()
    images, labels = p.run()
    files = sorted((folder / "train" / "cat").iterdir())[:5]
    assert [np.array(images[i]).tobytes() for i in range(5)] == [f.read_bytes() for f in files]
    assert [np.array(labels[i]).tobytes() for i in range(5)] == [b"0"] * 5


@pytest.mark.slow
def test_a_two_rank_run_on_shards_resumed_on_one_process_is_the_folders(shard_set, tmp_path):
    """2 ranks stopped in the middle of the epoch, resumed as one process: the
    shards give, loss for loss, what the folder they were made from gives in the same run."""
    folder, out = shard_set
    base = TINY[: TINY.index("--data")] + TINY[TINY.index("--data") + 2 :]
    base += ["--batch-size", "2", "--epochs", "1", "--workers", "1", "--seed", "3", "--schedule", "constant"]
    base += ["--warmup-epochs", "0", "--checkpoint-every", "0", "--eval-every", "0"]
    losses = []
    for data, where in (("imagefolder", folder), ("shards", out)):
        args = base + ["--data", data, "--data-dir", str(where), "--output-dir", str(tmp_path / data)]
        r = train_ranks(args + ["--max-steps", "4"])
        assert r.returncode == 0, r.stderr[-2000:]
        r = train_here(args + ["--resume"])
        assert r.returncode == 0, r.stderr[-2000:]
        losses.append(train_losses(tmp_path / data))
    assert losses[0] == losses[1] and len(losses[0]) > 4
