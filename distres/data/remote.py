"""Where a shard set's bytes come from: a local (or shared) folder, or any fsspec URL
(``s3://``, ``gs://``, ``https://``), read by byte ranges.

A store reads a whole small file (the manifest, a table) or one byte range of a shard. Each
process opens what it reads itself, the first time it reads it, and keeps it open: DataLoader
workers are forked, and neither a file offset nor an object-store client's connections may be
shared across a fork, so a store carries only its address to a worker and each process makes
its own handles (``_here`` starts a process's handles afresh).

Remote stores read with range requests. With a cache folder (``--cache-dir``), the first
process to need a shard downloads all of it there (checked against the manifest's checksum)
while the others go on with range requests; from then on every process reads it locally, so a
second epoch reads nothing remote. ``--cache-size`` bounds the folder: the oldest shards go
first. Credentials and endpoint come from where the store's own client looks (for S3:
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, ``AWS_ENDPOINT_URL``); no message
here names them.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from distres import files
from distres.errors import RankError, UserError

FIX_SHARDS = "run python -m distres.prepare shards again on its source (it rewrites damaged shards)"


class ShardError(RankError):
    """A shard set that cannot be read as its manifest says. DataLoader re-raises a worker's
    exception as its type built from the worker's whole traceback text: the message is the
    traceback's last line again, so that it stays one line."""

    def __init__(self, message: str):
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(": ", 1)[-1]
        super().__init__(message)


def is_url(where: str) -> bool:
    return "://" in where and not where.startswith("file://")


class LocalStore:
    def __init__(self, root: str):
        self.root = Path(root.removeprefix("file://"))
        self._fds: dict[str, int] = {}
        self._pid = os.getpid()
        self.opened = 0  # files opened by this process (the benchmark counts them)

    def url(self, name: str) -> str:
        return str(self.root / name)

    def read(self, name: str) -> bytes:
        with open(self.root / name, "rb") as f:
            return f.read()

    def exists(self, name: str) -> bool:
        return (self.root / name).is_file()

    def missing(self) -> str:
        return f"the folder {self.root} does not exist" if not self.root.is_dir() else "the folder holds no manifest"

    def read_range(self, name: str, start: int, length: int) -> bytes:
        return os.pread(self._fd(name), length, start)

    def size(self, name: str) -> int:
        return os.fstat(self._fd(name)).st_size

    def _fd(self, name: str) -> int:
        if self._pid != os.getpid():
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(name)
        if fd is None:
            try:
                fd = self._fds[name] = os.open(self.root / name, os.O_RDONLY)
            except FileNotFoundError:
                raise ShardError(f"{self.url(name)} is missing; {FIX_SHARDS}") from None
            self.opened += 1
        return fd

    def __getstate__(self):
        return {"root": str(self.root)}

    def __setstate__(self, state):
        self.__init__(state["root"])


class FsspecStore:
    """Any fsspec URL; ``cache``: a ``ShardCache`` or None."""

    def __init__(self, url: str, cache: ShardCache | None = None):
        self.base, self.cache = url.rstrip("/"), cache
        self._fs, self._pid = None, os.getpid()
        self.remote_bytes = 0  # bytes this process fetched from the store

    def url(self, name: str) -> str:
        return f"{self.base}/{name}"

    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            import fsspec

            try:
                self._fs, _ = fsspec.core.url_to_fs(self.base, skip_instance_cache=True)
            except (ImportError, ValueError) as e:
                raise UserError(f"cannot read {self.base}: {' '.join(str(e).split())}") from None
            self._pid = os.getpid()
        return self._fs

    def read(self, name: str) -> bytes:
        with remote_errors(self.url(name)):
            data = self.fs.cat_file(self.url(name))
        self.remote_bytes += len(data)
        return data

    def exists(self, name: str) -> bool:
        with remote_errors(self.url(name)):
            return self.fs.exists(self.url(name))

    def missing(self) -> str:
        """Why the store has no manifest: its bucket (or top folder) is missing, or only the prefix."""
        top = self.base.split("://", 1)[1].split("/", 1)[0]
        with remote_errors(self.base):
            if not self.fs.exists(top):
                return f"the bucket {top} does not exist (check the name in --data-dir, and AWS_ENDPOINT_URL)"
        return "nothing is stored there"

    def read_range(self, name: str, start: int, length: int, expected: tuple[int, str] | None = None) -> bytes:
        """``expected``: the shard's (bytes, sha256) from the manifest, for the cache."""
        if self.cache is not None and expected is not None:
            local = self.cache.get(self.fs, self.url(name), name, *expected)
            if local is not None:
                return local.read_range(local_name(name, expected[1]), start, length)
        with remote_errors(self.url(name)):
            data = self.fs.cat_file(self.url(name), start=start, end=start + length)
        self.remote_bytes += len(data)
        return data

    def size(self, name: str) -> int:
        with remote_errors(self.url(name)):
            return int(self.fs.info(self.url(name))["size"])

    def __getstate__(self):
        return {"base": self.base, "cache": self.cache}

    def __setstate__(self, state):
        self.__init__(state["base"], state["cache"])


def local_name(name: str, sha256: str) -> str:
    return f"{sha256[:16]}-{name}"


class ShardCache:
    """Whole shards of a remote store in a local folder, at most ``limit`` bytes of them."""

    def __init__(self, folder: str, limit: int):
        self.folder, self.limit = Path(folder), limit
        self.store = LocalStore(str(self.folder))

    def check_room(self, needed: int) -> None:
        """A folder that cannot hold what it is meant to: one line now, not a failed write later."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            free = shutil.disk_usage(self.folder).free + self._held()
        except OSError as e:
            raise UserError(f"cannot use --cache-dir {self.folder} ({e.strerror}); pick a writable folder") from None
        want = min(needed, self.limit)
        if free < want:
            raise UserError(
                f"--cache-dir {self.folder} has {free / 2**30:.1f} GiB free, and {want / 2**30:.1f} GiB of shards "
                "are to be cached there; free space, point --cache-dir elsewhere or lower --cache-size"
            )

    def get(self, fs, url: str, name: str, size: int, sha256: str) -> LocalStore | None:
        """The local store holding the shard, downloading it if no other process is; None:
        read remotely this time (another process is downloading it, or it does not fit)."""
        target = self.folder / local_name(name, sha256)
        if target.is_file():
            return self.store
        if size > self.limit:
            return None
        lock = self.folder / f".{target.name}.lock"
        with open(lock, "w") as held:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            if not target.is_file():
                self._make_room(size)
                self._download(fs, url, target, size, sha256)
        return self.store

    def _download(self, fs, url: str, target: Path, size: int, sha256: str) -> None:
        tmp = target.with_name(f".{target.name}.partial")
        try:
            with remote_errors(url):
                fs.get_file(url, str(tmp))
            if tmp.stat().st_size != size or files.sha256(tmp) != sha256:
                raise ShardError(f"{url} does not match the checksum in its manifest; {FIX_SHARDS}")
            os.replace(tmp, target)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise ShardError(
                    f"--cache-dir {self.folder} is full; free space, point --cache-dir elsewhere or lower --cache-size"
                ) from None
            raise
        finally:
            tmp.unlink(missing_ok=True)

    def _held(self) -> int:
        return sum(p.stat().st_size for p in self.folder.glob("*.tar"))

    def _make_room(self, size: int) -> None:
        cached = sorted(self.folder.glob("*.tar"), key=lambda p: p.stat().st_mtime)
        total = sum(p.stat().st_size for p in cached)
        while cached and total + size > self.limit:
            oldest = cached.pop(0)
            total -= oldest.stat().st_size
            with contextlib.suppress(OSError):
                oldest.unlink()


@contextlib.contextmanager
def remote_errors(url: str):
    """An object store's failures as one line naming the URL and the fix."""
    try:
        yield
    except FileNotFoundError as e:
        raise ShardError(f"{url} does not exist ({_why(e)}); check --data-dir (the bucket and the prefix)") from None
    except PermissionError as e:
        raise ShardError(
            f"access to {url} was refused ({_why(e)}); check the credentials (AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY or the profile) and that they may read it"
        ) from None
    except Exception as e:
        if type(e).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
            raise ShardError(
                f"no credentials to read {url}; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
                "and AWS_ENDPOINT_URL for a store other than AWS"
            ) from None
        if type(e).__name__ in ("EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"):
            raise ShardError(f"cannot connect to the store of {url} ({_why(e)}); check AWS_ENDPOINT_URL") from None
        raise


def _why(err: BaseException) -> str:
    return " ".join(str(err).split())[:160] or type(err).__name__


def open_store(where: str, cache_dir: str | None = None, cache_size: int = 0):
    if not is_url(where):
        return LocalStore(where)
    return FsspecStore(where, ShardCache(cache_dir, cache_size) if cache_dir else None)
