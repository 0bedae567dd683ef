"""A shard set in object storage (``--data-dir s3://bucket/prefix``), read through s3fs from a
real S3 server on 127.0.0.1 (moto's standalone server, as s3fs's own tests use), with the
credentials and endpoint in the variables the AWS SDKs read."""

import logging
import os

import pytest
import torch

from tests.helpers import TINY, make_imagefolder, one_error_line, run_here, train_here, train_losses
from tests.test_shards import _epoch, _loaders

pytest.importorskip("s3fs", reason="the s3 extra: pip install -e '.[test]'")
moto_server = pytest.importorskip("moto.server", reason="the s3 extra: pip install -e '.[test]'")

COUNTS = {"train": {"cat": 10, "dog": 10, "fox": 10}, "val": {"cat": 3, "dog": 3, "fox": 2}}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def bucket(module_dir):
    """(the local shard set, its URL in the server's bucket); the server's address and the
    credentials are in the environment for the module's tests."""
    from distres import prepare

    folder = make_imagefolder(module_dir / "folder", COUNTS)
    local = module_dir / "shards"
    assert run_here(prepare.main, ["shards", str(folder), str(local), "--shard-size", "8K"]).returncode == 0
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the server's access log
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in {**CREDENTIALS, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}.items():
            env.setenv(name, value)
        env.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookups for credentials
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
            env.delenv(name, raising=False)
        import boto3

        s3 = boto3.client("s3")
        s3.create_bucket(Bucket="data")
        for path in local.iterdir():
            if path.is_file():
                s3.upload_file(str(path), "data", f"sets/tiny/{path.name}")
        yield local, "s3://data/sets/tiny"
    server.stop()


def test_remote_batches_are_the_local_ones_and_the_second_epoch_reads_from_the_cache(bucket, tmp_path):
    """In a forked worker process too; with a cache folder, every shard is fetched once."""
    local, url = bucket
    ref = _loaders("shards", local, 2, 1)
    got = _loaders("shards", url, 2, 1, ["--workers", "1"])
    for split in ("train", "val"):
        assert all(
            torch.equal(a, b)
            for x, y in zip(_epoch(getattr(ref, split), 2), _epoch(getattr(got, split), 2))
            for a, b in zip(x, y)
        )
    cache = tmp_path / "cache"
    cached = _loaders("shards", url, 1, 0, ["--cache-dir", str(cache), "--cache-size", "1G"]).train
    first = _epoch(cached, 0)
    store = cached.source.store
    fetched = store.remote_bytes
    assert sorted(p.name.split("-", 1)[1] for p in cache.glob("*.tar")) == sorted(
        p.name for p in local.glob("train-*.tar")
    )
    second = _epoch(cached, 1)
    assert store.remote_bytes == fetched and len(second) == len(first)
    small = _loaders("shards", url, 1, 0, ["--cache-dir", str(tmp_path / "small"), "--cache-size", "20K"]).train
    _epoch(small, 0)
    assert sum(p.stat().st_size for p in (tmp_path / "small").glob("*.tar")) <= 20 * 1024  # the oldest went


@pytest.mark.slow
def test_a_run_from_s3_interrupted_and_resumed_is_the_local_run(bucket, tmp_path):
    local, url = bucket
    base = TINY[: TINY.index("--data")] + TINY[TINY.index("--data") + 2 :]
    base += ["--batch-size", "4", "--epochs", "1", "--workers", "1", "--seed", "2", "--schedule", "constant"]
    base += [
        "--warmup-epochs",
        "0",
        "--checkpoint-every",
        "0",
        "--eval-every",
        "0",
        "--threads",
        "1",
        "--data",
        "shards",
    ]
    assert train_here(base + ["--data-dir", str(local), "--output-dir", str(tmp_path / "local")]).returncode == 0
    remote = base + ["--data-dir", url, "--output-dir", str(tmp_path / "s3"), "--cache-dir", str(tmp_path / "cache")]
    assert train_here(remote + ["--max-steps", "3"]).returncode == 0
    r = train_here(remote + ["--resume"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert (
        train_losses(tmp_path / "s3") == train_losses(tmp_path / "local") and len(train_losses(tmp_path / "local")) == 7
    )


def test_a_wrong_bucket_and_missing_credentials_are_one_line(bucket, tmp_path, monkeypatch):
    base = TINY[: TINY.index("--data")] + TINY[TINY.index("--data") + 2 :] + ["--data", "shards", "--batch-size", "4"]
    base += ["--output-dir", str(tmp_path / "run")]
    r = train_here(base + ["--data-dir", "s3://no-such-bucket/sets/tiny"])
    assert "the bucket no-such-bucket does not exist" in one_error_line(r.stderr) and r.returncode == 2
    for name in CREDENTIALS:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    r = train_here(base + ["--data-dir", bucket[1]])
    line = one_error_line(r.stderr)
    assert "no credentials to read s3://data/sets/tiny" in line and "AWS_ACCESS_KEY_ID" in line
    assert "testing" not in r.stderr and os.environ.get("AWS_ACCESS_KEY_ID") is None


def test_a_full_cache_folder_is_one_line(bucket, tmp_path):
    """The cache's downloads written to a device that is full (/dev/full: every write fails with
    ENOSPC, as on a full disk)."""
    import json

    from distres.data.remote import ShardError, local_name

    local, url = bucket
    cache = tmp_path / "cache"
    cache.mkdir()
    for shard in json.loads((local / "manifest.json").read_text())["splits"]["train"]["shards"]:
        (cache / f".{local_name(shard['tar'], shard['sha256'])}.partial").symlink_to("/dev/full")
    loader = _loaders("shards", url, 1, 0, ["--cache-dir", str(cache)]).train
    with pytest.raises(ShardError, match=f"--cache-dir {cache} is full; free space, point --cache-dir elsewhere"):
        _epoch(loader, 0)
