"""One small interface over a local directory and an S3 prefix.

`open_storage` takes a local path, a ``file://`` URL or ``s3://bucket/prefix``; the `Storage` it
returns takes names relative to that root, with ``/`` separators (``"shards/00000.tar"``).  A file
is visible under its final name only once complete: local writes go to a hidden temp file in the
same directory, fsynced, then `os.replace`d; S3 PUTs and multipart uploads are atomic already.

S3 goes through boto3: endpoint from the ``s3_endpoint`` argument, else ``AWS_ENDPOINT_URL``;
credentials only from the standard AWS chain, never taken, logged or echoed here (and the jobs keep
botocore's request logging, which shows signed headers, off: `cli.quiet_request_loggers`); botocore's
adaptive retries so that hundreds of writers ride out throttling.  Failures the user can fix
become one-line `StorageError`s, a missing object a `FileNotFoundError`.  A `Storage` pickles
without its boto3 client (Ray ships it to actors) and makes a new one on first use.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import unquote

import boto3
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (BotoCoreError, ClientError, ConnectTimeoutError,
                                 EndpointConnectionError, NoCredentialsError,
                                 PartialCredentialsError)

from skindual.errors import StorageError, UserError

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_PART_SIZE", "Listed", "LocalStorage", "S3Storage", "Storage", "cache_root", "file_sha256",
           "finished", "is_remote", "open_storage", "output_storage"]

DEFAULT_PART_SIZE = 64 * 1024 * 1024
"""S3 multipart threshold and part size of `Storage.upload_file` (S3's minimum part is 5 MiB)."""

_TMP_PREFIX = ".tmp-skindual-"
_DENIED = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "403", "Forbidden",
           "InvalidToken", "ExpiredToken"}
_MISSING = {"NoSuchKey", "404", "NotFound"}
_T = TypeVar("_T")


def cache_root() -> Path:
    """This node's cache folder: ``$SKINDUAL_CACHE``, else ``~/.cache/skindual`` (the materialised demo base,
    cached features and extractor weights live under it)."""
    return Path(os.environ.get("SKINDUAL_CACHE", Path.home() / ".cache" / "skindual"))


def is_remote(url: str | os.PathLike[str]) -> bool:
    """True for an ``s3://`` URL, False for a local path or ``file://`` URL."""
    return os.fspath(url).startswith("s3://")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a local file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def output_storage(url: str, s3_endpoint: str | None = None, flag: str = "--output") -> Storage:
    """The storage a job writes to, checked usable (`Storage.check`); its errors name the flag."""
    storage = open_storage(url, s3_endpoint)
    try:
        storage.check()
    except StorageError as err:
        raise StorageError(f"{flag} {err}") from None
    return storage


def finished(storage: Storage, marker: str, fingerprint: str) -> dict | None:
    """Whether a stage's work at `storage` is already done: the JSON `marker` it writes LAST, once its outputs
    are complete, when that records `fingerprint` (the settings and inputs that shape them) and does not
    say ``"complete": false``; else None.  Every stage decides "already done" this one way."""
    try:
        record = json.loads(storage.read_bytes(marker))
    except (FileNotFoundError, ValueError):
        return None
    if isinstance(record, dict) and record.get("fingerprint") == fingerprint and record.get("complete", True):
        return record
    return None


def open_storage(url: str | os.PathLike[str], s3_endpoint: str | None = None, *,
                 part_size: int = DEFAULT_PART_SIZE) -> Storage:
    """Open a storage root: a local path, ``file://`` URL or ``s3://bucket/prefix``.

    ``s3_endpoint`` (e.g. ``http://127.0.0.1:8333``) wins over ``AWS_ENDPOINT_URL``; ``part_size``
    is the multipart threshold and part size of S3 uploads.  Both are ignored for local roots.
    Nothing is contacted here: call `Storage.check` to fail early on an unusable location.
    """
    text = os.fspath(url)
    scheme, sep, rest = text.partition("://")
    if not sep:
        return LocalStorage(text)
    if scheme == "file":
        return LocalStorage(unquote(rest))
    if scheme != "s3":
        raise StorageError(f"{text}: unsupported storage URL; use a local path, file:// or s3://")
    bucket, _, prefix = rest.partition("/")
    if not bucket:
        raise StorageError(f"{text}: an S3 URL needs a bucket, e.g. s3://my-bucket/run1")
    return S3Storage(bucket, prefix, s3_endpoint or os.environ.get("AWS_ENDPOINT_URL"), part_size)


def _check_name(name: str, *, prefix: bool = False) -> str:
    """Return ``name`` if it is a clean relative name (a prefix may be empty or end in '/')."""
    body = name[:-1] if prefix and name.endswith("/") else name
    if (name or not prefix) and ("\\" in name or any(
            part in ("", ".", "..") for part in body.split("/"))):
        raise ValueError(f"bad relative storage name {name!r}: use 'a/b.ext', no '.', '..' or '//'")
    return name


def is_clean_name(name: str) -> bool:
    """Whether `name` is a clean relative name inside a storage root (``a/b.ext``): no empty, ``.`` or ``..``
    part, no leading ``/``, no backslash; what every `Storage` method accepts."""
    try:
        _check_name(name)
    except ValueError:
        return False
    return "\0" not in name


@dataclass(frozen=True)
class Listed:
    """A file as a listing shows it: its size, and its stamp, which changes whenever the file is written again
    (S3's ETag, ``etag:...``; a folder's modification time, ``mtime_ns:...``).  A listing that still shows the
    size and stamp recorded when a file was written vouches for its bytes without reading them."""

    size: int
    stamp: str


class Storage(ABC):
    """A root directory or S3 prefix holding files; every name is relative to ``url``."""

    url: str

    @abstractmethod
    def join(self, relpath: str) -> str:
        """The full location of ``relpath``: an absolute local path or an ``s3://`` URL."""

    @abstractmethod
    def write_bytes(self, relpath: str, data: bytes) -> None:
        """Write ``data`` to ``relpath`` atomically, replacing any previous file."""

    @abstractmethod
    def read_bytes(self, relpath: str) -> bytes:
        """The content of ``relpath``; `FileNotFoundError` when there is no such file."""

    @abstractmethod
    def iter_bytes(self, relpath: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        """The content of ``relpath`` in chunks, streamed (`FileNotFoundError` when there is no such file)."""

    @abstractmethod
    def exists(self, relpath: str) -> bool:
        """Whether the file ``relpath`` exists (on S3, False also when the bucket is missing)."""

    def list(self, prefix: str = "") -> list[str]:
        """Sorted relative names of all files, at any depth, whose name starts with ``prefix``."""
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """Relative name → size in bytes of all files, at any depth, whose name starts with ``prefix`` (one listing)."""
        return {name: listed.size for name, listed in self.listing(prefix).items()}

    @abstractmethod
    def listing(self, prefix: str = "") -> dict[str, Listed]:
        """Relative name → `Listed` (size and stamp) of all files, at any depth, whose name starts with ``prefix``
        (one listing: pages of LIST on S3, a walk of the folder with a stat of each matching file)."""

    @abstractmethod
    def delete(self, relpath: str) -> None:
        """Delete the file ``relpath``; deleting a missing file is not an error."""

    @abstractmethod
    def upload_file(self, local_path: str | os.PathLike[str], relpath: str) -> None:
        """Copy a local file to ``relpath`` atomically (multipart upload on S3, for big shards)."""

    @abstractmethod
    def download_file(self, relpath: str, local_path: str | os.PathLike[str]) -> None:
        """Copy ``relpath`` to a local file, creating its parent directories."""

    @abstractmethod
    def check(self) -> None:
        """Raise `StorageError` unless the location is usable (local: writable; S3: bucket ok)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _file_mode() -> int:
    """The mode a new file gets from the process's umask (0o644 under the usual 022)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _atomic_write(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Create ``path`` from a fsynced temp file in its directory renamed onto it, with the umask's mode (a
    temp file is private until it is renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_TMP_PREFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), _file_mode())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class LocalStorage(Storage):
    """A directory on a local or shared file system (created on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(os.path.abspath(os.path.expanduser(root)))  # absolute for Ray workers
        self.url = str(self.root)

    def _path(self, relpath: str) -> Path:
        return self.root / _check_name(relpath)

    def join(self, relpath: str) -> str:
        return str(self._path(relpath))

    def write_bytes(self, relpath: str, data: bytes) -> None:
        _atomic_write(self._path(relpath), lambda f: f.write(data))

    def read_bytes(self, relpath: str) -> bytes:
        return self._path(relpath).read_bytes()

    def iter_bytes(self, relpath: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        with self._path(relpath).open("rb") as f:
            while chunk := f.read(chunk_size):
                yield chunk

    def exists(self, relpath: str) -> bool:
        return self._path(relpath).is_file()

    def listing(self, prefix: str = "") -> dict[str, Listed]:
        found = {}
        top = self.root / _check_name(prefix, prefix=True).rpartition("/")[0]
        for dirpath, dirs, files in os.walk(top):
            here = Path(dirpath).relative_to(self.root).as_posix()
            # only a folder whose path starts the prefix, or starts with it, can hold a match
            below = [(d, f"{d}/" if here == "." else f"{here}/{d}/") for d in dirs]
            dirs[:] = [d for d, path in below if prefix.startswith(path) or path.startswith(prefix)]
            for name in files:
                rel = Path(dirpath, name).relative_to(self.root).as_posix()
                if rel.startswith(prefix) and not name.startswith(_TMP_PREFIX):
                    try:
                        stat = Path(dirpath, name).stat()
                    except FileNotFoundError:  # deleted while listing
                        continue
                    found[rel] = Listed(stat.st_size, f"mtime_ns:{stat.st_mtime_ns}")
        return found

    def delete(self, relpath: str) -> None:
        self._path(relpath).unlink(missing_ok=True)

    def upload_file(self, local_path: str | os.PathLike[str], relpath: str) -> None:
        with open(local_path, "rb") as src:
            _atomic_write(self._path(relpath), lambda f: shutil.copyfileobj(src, f))

    def download_file(self, relpath: str, local_path: str | os.PathLike[str]) -> None:
        with self._path(relpath).open("rb") as src:
            _atomic_write(Path(local_path), lambda f: shutil.copyfileobj(src, f))

    def check(self) -> None:
        """Writable, without creating anything: the folder, or the nearest folder above it that exists (its
        folders are made on the first write)."""
        if self.root.exists() and not self.root.is_dir():
            raise StorageError(f"{self.url} is a file, not a folder; give a folder or an s3:// prefix")
        existing = self.root
        while not existing.exists():
            existing = existing.parent
        if not existing.is_dir():
            raise StorageError(f"{self.url}: {existing} is a file, not a folder; give a folder or an s3:// prefix")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise StorageError(f"cannot write to {self.url}: {existing} is not writable; fix the path or its "
                               "permissions")


class S3Storage(Storage):
    """A prefix in an S3 or S3-compatible (SeaweedFS, MinIO, Ceph) bucket.

    Addressing style is ``SKINDUAL_S3_ADDRESSING_STYLE`` (default ``path``, which S3-compatible
    servers need), read, like the endpoint, when the object is made, so Ray workers agree.
    """

    def __init__(self, bucket: str, prefix: str, endpoint: str | None,
                 part_size: int = DEFAULT_PART_SIZE) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.endpoint = endpoint or None
        self.addressing_style = os.environ.get("SKINDUAL_S3_ADDRESSING_STYLE", "path")
        self.part_size = part_size
        self.url = f"s3://{bucket}/{self.prefix}"
        self._client: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def _make_client(self, max_attempts: int, connect_timeout: float) -> Any:
        config = Config(retries={"mode": "adaptive", "max_attempts": max_attempts},
                        connect_timeout=connect_timeout, read_timeout=120,
                        s3={"addressing_style": self.addressing_style})
        return boto3.session.Session().client("s3", endpoint_url=self.endpoint, config=config)

    def _s3(self) -> Any:
        if self._client is None:
            self._client = self._make_client(max_attempts=10, connect_timeout=10)
        return self._client

    def _key(self, relpath: str) -> str:
        return self.prefix + _check_name(relpath)

    def _call(self, fn: Callable[[], _T], relpath: str | None = None) -> _T:
        """Run S3 requests about ``relpath`` (None: about the bucket), translating failures the
        user can fix into `StorageError` and a missing object into `FileNotFoundError`."""
        log.debug("S3 request: %s", self.join(relpath) if relpath is not None else f"s3://{self.bucket}")
        try:
            return fn()
        except (S3UploadFailedError, BotoCoreError, ClientError) as exc:
            # boto3's S3UploadFailedError keeps the ClientError only as its context
            cause = exc.__context__ if isinstance(exc, S3UploadFailedError) else exc
            translated = self._translate(cause, relpath)
            if translated is None:
                raise
            raise translated from exc

    def _translate(self, exc: BaseException | None, relpath: str | None) -> Exception | None:
        where = f"endpoint {self.endpoint}" if self.endpoint else "AWS's default endpoint"
        if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
            return StorageError(f"no usable AWS credentials for {self.url}; set AWS_ACCESS_KEY_ID/"
                                "AWS_SECRET_ACCESS_KEY or AWS_PROFILE")
        if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError)):
            return StorageError(f"cannot reach S3 at {where} for {self.url}; "
                                "check --s3-endpoint / AWS_ENDPOINT_URL")
        code = str(exc.response["Error"].get("Code")) if isinstance(exc, ClientError) else ""
        if code in _DENIED:  # the server's own message is dropped: it may quote signing details
            return StorageError(f"access to {self.url} at {where} denied ({code}); check "
                                "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or your AWS profile")
        if code == "NoSuchBucket" or (code in _MISSING and relpath is None):
            return StorageError(f"bucket {self.bucket} does not exist at {where}; "
                                "create it or fix the URL")
        if code in _MISSING:
            return FileNotFoundError(f"{self.url}{relpath} does not exist")
        return None

    def join(self, relpath: str) -> str:
        return f"s3://{self.bucket}/{self._key(relpath)}"

    def _object_call(self, operation: str, relpath: str, **kwargs: Any) -> Any:
        """Run the client's ``operation`` on the object ``relpath``."""
        key = self._key(relpath)
        return self._call(lambda: getattr(self._s3(), operation)(
            Bucket=self.bucket, Key=key, **kwargs), relpath)

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self._object_call("put_object", relpath, Body=data)

    def read_bytes(self, relpath: str) -> bytes:
        body = self._object_call("get_object", relpath)["Body"]
        return self._call(body.read, relpath)

    def iter_bytes(self, relpath: str, chunk_size: int = 1 << 20) -> Iterator[bytes]:
        body = self._object_call("get_object", relpath)["Body"]
        yield from body.iter_chunks(chunk_size)

    def exists(self, relpath: str) -> bool:
        try:
            self._object_call("head_object", relpath)
        except FileNotFoundError:
            return False
        return True

    def listing(self, prefix: str = "") -> dict[str, Listed]:
        full = self.prefix + _check_name(prefix, prefix=True)

        def objects() -> list[tuple[str, Listed]]:
            pages = self._s3().get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=full)
            return [(obj["Key"], Listed(int(obj["Size"]), "etag:" + str(obj.get("ETag", "")).strip('"')))
                    for page in pages for obj in page.get("Contents", [])]

        # keys ending in "/" are directory markers some servers and tools create, not files
        return {k[len(self.prefix):]: listed for k, listed in self._call(objects) if not k.endswith("/")}

    def delete(self, relpath: str) -> None:
        self._object_call("delete_object", relpath)

    def _transfer_config(self) -> TransferConfig:
        size = self.part_size
        return TransferConfig(multipart_threshold=size, multipart_chunksize=size,
                              preferred_transfer_client="classic")

    def upload_file(self, local_path: str | os.PathLike[str], relpath: str) -> None:
        key, config = self._key(relpath), self._transfer_config()
        self._call(lambda: self._s3().upload_file(os.fspath(local_path), self.bucket, key,
                                                  Config=config), relpath)

    def download_file(self, relpath: str, local_path: str | os.PathLike[str]) -> None:
        key, config = self._key(relpath), self._transfer_config()
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        self._call(lambda: self._s3().download_file(self.bucket, key, os.fspath(local_path),
                                                    Config=config), relpath)

    def check(self) -> None:
        probe = self._make_client(max_attempts=2, connect_timeout=3)  # fail fast, unlike data calls
        self._call(lambda: probe.head_bucket(Bucket=self.bucket))


def ray_storage(output: str, s3_endpoint: str | None, region_of=None):
    """(storage_path, storage_filesystem) for RunConfig: a local folder, or s3:// through pyarrow's S3
    filesystem in the bucket's own region (pyarrow does not follow S3's redirects to it): on AWS asked of
    S3 (`region_of`, default `pyarrow.fs.resolve_s3_region`), on another endpoint AWS_REGION /
    AWS_DEFAULT_REGION or us-east-1."""
    if not is_remote(output):
        return os.path.abspath(output.removeprefix("file://")), None
    from pyarrow import fs

    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    bucket = output.removeprefix("s3://").split("/", 1)[0]
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https",
                  "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    else:
        try:
            kwargs = {"region": (region_of or fs.resolve_s3_region)(bucket)}
        except OSError as exc:
            raise UserError(f"--output {output}: cannot find the region of bucket {bucket} ({exc}); check the "
                            "bucket name and your AWS credentials") from None
    return output.removeprefix("s3://"), fs.S3FileSystem(**kwargs)
