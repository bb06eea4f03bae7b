"""The one reader of a committed shard's tar: every path that hands out pairs (`skindual.pairs`,
`skindual.shards`, the stages' Ray Data reads, export, ``python -m skindual.shards cat``) goes through it.

A shard's tar is fetched into a bounded spool (memory up to `SPOOL_IN_MEMORY`, then a temp file) while it is
hashed; its size and sha256 must match its ``_stats.json`` (a tar without one is not committed) before a
header is parsed.  Then every member is checked before any is read: a regular file (no sparse file, link or
device), named ``{key}.{extension}`` with a key of that shard, within a size bound per extension, in key
order, each sample complete.  So no pair of a shard is handed out before the whole shard is known good, and
a tar that is not what skindual writes is one `DataError` line naming the shard and member, never a
traceback or an allocation its headers ask for.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from skindual.errors import DataError
from skindual.prompts import MAX_SAMPLES_PER_SHARD
from skindual.shard_format import shard_names
from skindual.shard_store import read_stats
from skindual.storage import Storage

SPOOL_IN_MEMORY = 32 << 20
"""A shard's tar is held in memory up to this many bytes while it is verified, beyond that in a temp file."""
MEMBER_NAME = re.compile(r"^(\d{9,})\.(jpg|png|seg\.png|ignore\.png|cls|txt|json)$")
"""A member's name: a sample key (`skindual.prompts.sample_key`, 9 digits below shard 100000) and an extension."""
MEMBER_LIMITS = {"jpg": 64 << 20, "png": 64 << 20, "seg.png": 64 << 20, "ignore.png": 64 << 20,
                 "json": 1 << 20, "txt": 1 << 20, "cls": 64}
"""The most bytes a member of each extension may hold: a bound on what one member makes a reader allocate."""
REQUIRED = ("seg.png", "cls", "txt", "json")  # besides one image (jpg or png); ignore.png is optional
_MALFORMED = (tarfile.TarError, EOFError, ValueError, OverflowError, UnicodeError)  # what tarfile raises on bad headers


def _refused(storage: Storage, shard: int, why: str, overwrite: bool = False) -> DataError:
    advice = ("run the job that wrote it again with --overwrite" if overwrite
              else "run the job that wrote it again (it writes that shard again)")
    return DataError(f"shard {shard:05d} of {storage.url}: {why}; {advice}")


@contextmanager
def verified_tar(storage: Storage, shard: int) -> Iterator[IO[bytes]]:
    """The bytes of ``shard``'s tar, positioned at 0, once they match the size and sha256 its ``_stats.json``
    records (a `DataError` naming the shard otherwise, before a byte is handed out); no more than the
    recorded size is ever fetched.  The spool is gone when the context ends."""
    tar_name = shard_names(shard)[0]
    stats = read_stats(storage, shard)
    if stats is None:
        raise _refused(storage, shard, "it has no _stats.json, so it is not committed (a run cut short, or a "
                       "commit marker lost)")
    with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, prefix="skindual-shard-") as spool:
        digest, size = hashlib.sha256(), 0
        try:
            for chunk in storage.iter_bytes(tar_name):
                size += len(chunk)
                if size > stats.tar_bytes:
                    raise _refused(storage, shard, f"its {tar_name} is larger than the {stats.tar_bytes:,} bytes "
                                   "its _stats.json records")
                digest.update(chunk)
                spool.write(chunk)
        except FileNotFoundError:
            raise _refused(storage, shard, f"its {tar_name} is missing") from None
        if size != stats.tar_bytes:
            raise _refused(storage, shard, f"its {tar_name} is {size:,} bytes where its _stats.json records "
                           f"{stats.tar_bytes:,}")
        if digest.hexdigest() != stats.tar_sha256:
            raise _refused(storage, shard, f"its {tar_name} does not match the sha256 its _stats.json records")
        spool.seek(0)
        yield _Bounded(spool, size)


class _Bounded:
    """A seekable file that never reads past `size`: a header declaring more cannot make a read allocate it."""

    def __init__(self, raw: IO[bytes], size: int) -> None:
        self.raw, self.size = raw, size

    def read(self, n: int = -1) -> bytes:
        left = max(0, self.size - self.raw.tell())
        return self.raw.read(left if n is None or n < 0 else min(n, left))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()


def _kind(member: tarfile.TarInfo) -> str:
    if member.issparse():
        return "a sparse file"
    if member.issym():
        return "a symbolic link"
    if member.islnk():
        return "a hard link"
    if member.isdev():
        return "a device"
    return "a directory" if member.isdir() else f"of tar type {member.type!r}"


def _check_member(storage: Storage, shard: int, member: tarfile.TarInfo) -> tuple[str, str]:
    """(key, extension) of a member a reader may read, else a `DataError` naming it."""
    name = member.name
    if not member.isreg() or member.issparse():
        raise _refused(storage, shard, f"member {name!r} is {_kind(member)}, not a regular file", overwrite=True)
    match = MEMBER_NAME.match(name)
    key = match.group(1) if match else "0"
    if match is None or key != f"{int(key):09d}" or int(key) // MAX_SAMPLES_PER_SHARD != shard:
        raise _refused(storage, shard, f"member {name!r} is not named {{key}}.{{extension}} with a key of shard "
                       f"{shard:05d} and one of the extensions {', '.join(MEMBER_LIMITS)}", overwrite=True)
    extension = match.group(2)
    if member.size > MEMBER_LIMITS[extension]:
        raise _refused(storage, shard, f"member {name!r} holds {member.size:,} bytes, more than the "
                       f"{MEMBER_LIMITS[extension]:,} a .{extension} member may", overwrite=True)
    return key, extension


def _check_sample(storage: Storage, shard: int, key: str, extensions: set[str]) -> None:
    missing = [e for e in REQUIRED if e not in extensions]
    if len(extensions & {"jpg", "png"}) != 1:
        missing.insert(0, "jpg or png")
    if missing:
        raise _refused(storage, shard, f"sample {key} has no {', '.join(missing)} member (or two images)",
                       overwrite=True)


def checked_members(storage: Storage, shard: int, tar: tarfile.TarFile) -> list[tuple[str, dict[str, tarfile.TarInfo]]]:
    """Every sample of an open, verified tar as (key, extension → member), after checking every member's
    header (`_check_member`), that keys come in order with no extension twice, and that each sample has its
    image, mask, class, prompt and metadata: a `DataError` naming the shard and member otherwise."""
    samples: list[tuple[str, dict[str, tarfile.TarInfo]]] = []
    try:
        for member in tar:
            key, extension = _check_member(storage, shard, member)
            if samples and samples[-1][0] == key:
                if extension in samples[-1][1]:
                    raise _refused(storage, shard, f"member {member.name!r} is there twice", overwrite=True)
                samples[-1][1][extension] = member
                continue
            if samples and key < samples[-1][0]:
                raise _refused(storage, shard, f"member {member.name!r} comes after key {samples[-1][0]} (keys "
                               "are in order, each sample's members together)", overwrite=True)
            if samples:
                _check_sample(storage, shard, samples[-1][0], set(samples[-1][1]))
            samples.append((key, {extension: member}))
    except _MALFORMED as exc:
        raise _refused(storage, shard, f"its tar cannot be read ({exc})", overwrite=True) from None
    if samples:
        _check_sample(storage, shard, samples[-1][0], set(samples[-1][1]))
    return samples


def _open_tar(storage: Storage, shard: int, spool: IO[bytes]) -> tarfile.TarFile:
    try:
        return tarfile.open(fileobj=spool, mode="r:")  # type: ignore[call-overload]
    except _MALFORMED as exc:
        raise _refused(storage, shard, f"its tar cannot be read ({exc})", overwrite=True) from None


def verified_samples(storage: Storage, shard: int, keys: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of a committed shard, dicts of ``__key__`` and extension → bytes (``jpg`` or ``png``,
    ``seg.png``, ``cls``, ``txt``, ``json``, maybe ``ignore.png``), in key order; only `keys` if given.
    Nothing comes out before the whole tar matched its ``_stats.json`` (`verified_tar`) and every member
    passed `checked_members`."""
    wanted = set(keys) if keys is not None else None
    with verified_tar(storage, shard) as spool, _open_tar(storage, shard, spool) as tar:
        samples = checked_members(storage, shard, tar)
        for key, members in samples:
            if wanted is not None and key not in wanted:
                continue
            sample: dict[str, Any] = {"__key__": key}
            for extension, member in members.items():
                reader = tar.extractfile(member)
                assert reader is not None  # a regular file, checked
                sample[extension] = reader.read()
            yield sample


def check_shard(storage: Storage, shard: int) -> int:
    """Check a committed shard as `verified_samples` would before it hands out a pair, reading no member:
    its number of samples, or a `DataError` naming the shard (and member)."""
    with verified_tar(storage, shard) as spool, _open_tar(storage, shard, spool) as tar:
        return len(checked_members(storage, shard, tar))


def copy_verified(storage: Storage, shard: int, out: IO[bytes]) -> None:
    """Write the tar of a committed shard to `out` once it passed `check_shard`; nothing is written before."""
    with verified_tar(storage, shard) as spool:
        with _open_tar(storage, shard, spool) as tar:
            checked_members(storage, shard, tar)
        spool.seek(0)
        shutil.copyfileobj(spool, out, 1 << 20)  # type: ignore[misc]
