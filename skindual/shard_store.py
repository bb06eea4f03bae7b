"""Shards into and out of storage: the commit protocol (tar, parquet, then the stats that mark the shard
committed) and the scans of an output's committed, damaged, intact and readable shards.

Files are uploaded through `skindual.storage`; a crash mid-shard leaves no (or the previous run's deleted)
stats, so the shard counts as not done.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from skindual.errors import UserError
from skindual.fingerprint import canonical_json
from skindual.shard_format import (MANIFEST_FILE, OPTIONAL_META_FIELDS, PARQUET_SCHEMA, RUN_FILE, SAMPLE_META_FIELDS, SHARD_FILE, SIZES_FILE,
                                   TAR_MODE, TAR_MTIME, TAR_OWNER, Sample, ShardStats, encode_sample, parquet_row,
                                   shard_names, validate_samples)
from skindual.storage import Listed, Storage, file_sha256

log = logging.getLogger(__name__)


def write_shard(storage: Storage, shard: int, samples: Sequence[Sample], run_info: Mapping[str, Any]) -> ShardStats:
    """Write one shard of generated samples: tar, parquet and (last, as commit marker) stats.

    ``run_info`` holds the `SAMPLE_META_FIELDS`, ``fingerprint`` (`config_fingerprint` of the run)
    and optionally ``image_format`` ("jpg", the default, or "png") and ``device`` (what sampled it).  Rejected samples go only into
    the parquet.  See `commit_shard` for how the files reach storage.
    """
    missing = [name for name in (*SAMPLE_META_FIELDS, "fingerprint") if name not in run_info]
    if missing:
        raise ValueError(f"run_info lacks {', '.join(missing)}")
    image_format = run_info.get("image_format", "jpg")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', not {image_format!r}")
    ordered = validate_samples(shard, samples, image_format)
    meta = {name: run_info[name] for name in SAMPLE_META_FIELDS}
    meta |= {name: run_info[name] for name in OPTIONAL_META_FIELDS if run_info.get(name)}
    members = []
    for s in ordered:
        if s.status != "ok":
            continue
        if s.image_bytes is None or s.mask_bytes is None:
            s = encode_sample(s, image_format)
        member = {"__key__": s.key, image_format: s.image_bytes, "seg.png": s.mask_bytes,
                  "cls": str(s.class_index).encode(), "txt": s.prompt.encode(),
                  "json": canonical_json({**meta, **parquet_row(s)})}
        if s.ignore_bytes is not None:
            member["ignore.png"] = s.ignore_bytes
        members.append(member)
    table = pa.Table.from_pylist([parquet_row(s) for s in ordered], schema=PARQUET_SCHEMA)
    return commit_shard(storage, shard, members, table, str(run_info["fingerprint"]), image_format,
                        str(run_info.get("device", "")))


def commit_shard(storage: Storage, shard: int, members: Sequence[Mapping[str, Any]], table: pa.Table,
                 fingerprint: str, image_format: str = "jpg", device: str = "") -> ShardStats:
    """Write a shard from its tar `members` (webdataset samples: ``__key__`` and encoded bytes by
    extension, in key order) and its parquet `table` (every sample, with ``class_code``, ``status``
    "ok" or "rejected" and ``reason``; a ``split`` column is counted per split too).

    The tar is byte-reproducible (webdataset's `TarWriter` with a fixed mtime, owner and mode, USTAR,
    members of a sample sorted by name).  Files are built in a local temp dir, then uploaded
    (multipart on S3) in the order tar, parquet, stats; any old stats file is deleted first, so a
    crash never leaves old stats beside new data.  The stats record what storage's listing then says of the
    tar and parquet (size and stamp: S3's ETag, a folder's mtime), so a resume decides from a listing whether
    the files are still the ones committed (`damaged_shards`).
    """
    from webdataset import TarWriter

    rows = table.to_pylist()
    per_class: dict[str, dict[str, int]] = {}
    per_split: dict[str, dict[str, int]] = {}
    for row in rows:
        code = str(row["class_code"])
        counts = per_class.setdefault(code, {"ok": 0, "rejected": 0})
        counts[row["status"]] += 1
        if "split" in row and row["status"] == "ok":
            split = per_split.setdefault(str(row["split"]), {})
            split[code] = split.get(code, 0) + 1
    tar_name, parquet_name, stats_name = shard_names(shard)
    with tempfile.TemporaryDirectory(prefix="skindual-shard-") as tmp:
        tar_path, parquet_path, stats_path = (Path(tmp, n) for n in shard_names(shard))
        with tar_path.open("wb") as f, TarWriter(f, user=TAR_OWNER, group=TAR_OWNER, mode=TAR_MODE,
                                                 mtime=TAR_MTIME, encoder=False) as tar:
            for member in members:
                tar.write(dict(member))
        pq.write_table(table, parquet_path, compression="zstd", use_dictionary=True, write_statistics=True)
        storage.delete(stats_name)  # un-commit a previous attempt before replacing its data
        storage.upload_file(tar_path, tar_name)
        storage.upload_file(parquet_path, parquet_name)
        listed = storage.listing(f"{shard:05d}.")  # "" when a listing does not show it yet: hashed when checked
        stamps = {name: listed[name].stamp if name in listed else "" for name in (tar_name, parquet_name)}
        successes = sum(r["status"] == "ok" for r in rows)
        draws = sum(int(r.get("attempts") or 1) for r in rows)  # a real row, without attempts, is one
        stats = ShardStats(
            shard=shard, count=len(rows), successes=successes, failed_to_generate=len(rows) - successes,
            rejections=dict(Counter(str(r["reason"]) for r in rows if r["status"] != "ok")),
            per_class=per_class, tar_sha256=file_sha256(tar_path), tar_bytes=tar_path.stat().st_size,
            parquet_sha256=file_sha256(parquet_path), parquet_bytes=parquet_path.stat().st_size,
            fingerprint=fingerprint, image_format=image_format, per_split=per_split, device=device,
            draws=draws, tar_stamp=stamps[tar_name], parquet_stamp=stamps[parquet_name])
        stats_path.write_bytes(canonical_json(asdict(stats)))
        storage.upload_file(stats_path, stats_name)
    return stats


class DamagedRecord(UserError):
    """A run file (``run.json``, ``manifest.json``, a shard's ``_stats.json``) that is there but is not the record
    this tool writes: a file cut short or edited."""


def read_record(storage: Storage, name: str) -> Any:
    """The JSON object in `name` at `storage`; `FileNotFoundError` when there is none, `DamagedRecord` (one line
    naming the file) when it is not a JSON object."""
    raw = storage.read_bytes(name)
    try:
        record = json.loads(raw)
    except ValueError as exc:
        record, why = None, f"not valid JSON ({exc})"
    else:
        why = "not a JSON object"
    if not isinstance(record, dict):
        raise DamagedRecord(f"{storage.url.rstrip('/')}/{name} is {why}: a file cut short or edited by hand; pass "
                            "--overwrite to write the output again, or restore the file")
    return record


def read_stats(storage: Storage, shard: int) -> ShardStats | None:
    """The stats of ``shard``, or None when it has none (never written or not finished); `DamagedRecord` when its
    ``_stats.json`` is not the stats this tool writes."""
    name = shard_names(shard)[2]
    try:
        record = read_record(storage, name)
    except FileNotFoundError:
        return None
    try:
        return ShardStats(**record)
    except TypeError:
        raise DamagedRecord(f"{storage.url.rstrip('/')}/{name} does not hold a shard's stats (its fields are "
                            f"{', '.join(sorted(record)) or 'none'}): a file edited by hand or written by another "
                            "tool; pass --overwrite to write the output again, or restore the file") from None


def is_committed(storage: Storage, shard: int, fingerprint: str) -> bool:
    """Whether ``shard`` is complete and was written with the settings of ``fingerprint``."""
    stats = read_stats(storage, shard)
    tar_name, parquet_name, _ = shard_names(shard)
    return (stats is not None and stats.fingerprint == fingerprint
            and storage.exists(tar_name) and storage.exists(parquet_name))


def committed_shards(storage: Storage, names: Iterable[str] | None = None) -> list[int]:
    """Sorted numbers of the shards whose tar, parquet and stats all exist (one listing, or the given `names`)."""
    found: dict[int, set[str]] = {}
    for name in storage.list() if names is None else names:
        match = SHARD_FILE.match(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return sorted(n for n, kinds in found.items() if len(kinds) == 3)


def _mismatch(stats: ShardStats, listing: Mapping[str, Listed]) -> str | None:
    """Why a committed shard's files are not what its stats record (by size), or None."""
    tar_name, parquet_name, _ = shard_names(stats.shard)
    for name, recorded in ((tar_name, stats.tar_bytes), (parquet_name, stats.parquet_bytes)):
        size = listing[name].size if name in listing else None
        if size != recorded:
            return f"its {name} is {size or 0:,} bytes where its _stats.json records {recorded:,}"
    return None


def _listed_as_committed(stats: ShardStats, listing: Mapping[str, Listed]) -> bool:
    """Whether the listing shows the shard's tar and parquet with the stamps recorded at commit (stats written
    before stamps were recorded have none: never)."""
    tar_name, parquet_name, _ = shard_names(stats.shard)
    return all(stamp and name in listing and listing[name].stamp == stamp
               for name, stamp in ((tar_name, stats.tar_stamp), (parquet_name, stats.parquet_stamp)))


def _sha256_of(storage: Storage, name: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.iter_bytes(name):
        digest.update(chunk)
    return digest.hexdigest()


def damaged_shards(storage: Storage, verify: bool = False, workers: int = 8, changed: bool = False,
                   listing: Mapping[str, Listed] | None = None) -> dict[int, str]:
    """The committed shards (a ``_stats.json`` beside a tar and a parquet) whose files do not match what their
    stats record: shard → why.  Sizes come from one listing (`listing`, when the caller has made it).  With
    `changed`, the shards whose listing does not show the stamps recorded at commit (a file written since, or
    stats older than stamps) are read and their sha256 compared; with `verify`, every shard is (threads of
    `workers`)."""
    from concurrent.futures import ThreadPoolExecutor

    listing = storage.listing() if listing is None else listing
    found: dict[int, str] = {}
    stats = []
    for n in committed_shards(storage, listing):
        try:
            record = read_stats(storage, n)
        except DamagedRecord:
            found[n] = "its _stats.json is damaged"
            continue
        if record is not None:
            stats.append(record)
    for record in stats:
        why = _mismatch(record, listing)
        if why:
            found[record.shard] = why

    def check(record: ShardStats) -> tuple[int, str | None]:
        tar_name, parquet_name, _ = shard_names(record.shard)
        for name, recorded in ((tar_name, record.tar_sha256), (parquet_name, record.parquet_sha256)):
            try:
                if _sha256_of(storage, name) != recorded:
                    return record.shard, f"its {name} does not match the sha256 its _stats.json records"
            except FileNotFoundError:
                return record.shard, f"its {name} is missing"
        return record.shard, None

    to_read = [r for r in stats if r.shard not in found
               and (verify or (changed and not _listed_as_committed(r, listing)))]
    if to_read:
        with ThreadPoolExecutor(workers) as pool:
            for shard, why in pool.map(check, to_read):
                if why:
                    found[shard] = why
    return dict(sorted(found.items()))


def intact_shards(storage: Storage, verify: bool = False) -> set[int]:
    """The committed shards a resume may skip: those whose files match their ``_stats.json``.  A shard whose
    listing shows the size and stamp recorded at commit is taken as intact without reading it; any other is read
    and its sha256 compared, and with `verify` every shard is (`damaged_shards`).  Each damaged one is one log
    line naming it; the resume writes it again."""
    listing = storage.listing()
    damaged = damaged_shards(storage, verify=verify, changed=True, listing=listing)
    for shard, why in damaged.items():
        log.warning("shard %05d at %s does not match its _stats.json (%s): it is written again", shard,
                    storage.url, why)
    return set(committed_shards(storage, listing)) - set(damaged)


def _read_json(storage: Storage, name: str) -> Any:
    try:
        return read_record(storage, name)
    except FileNotFoundError:
        return None


def unfinished(storage: Storage, committed: Sequence[int] | None = None) -> str | None:
    """Why the output at `storage` is not the whole output of a finished run, or None.

    A run records the shards it will write when it starts (``sizes.json``, and ``manifest.json`` with
    ``"complete": false``, `run_files.start_run`) and rewrites both at its end.  So an output is unfinished when
    its manifest says ``"complete": false`` (a run cut short or still running), when its ``sizes.json`` names
    shards it has not committed (a commit marker lost), or when it has a ``run.json`` and neither file (a run of
    an earlier version cut short).  An output with shards and none of the three was not written by a run of this
    tool (`write_shard` alone, another tool): nothing says what it should hold, and it is taken as it is."""
    committed = set(committed_shards(storage) if committed is None else committed)
    manifest, sizes = _read_json(storage, MANIFEST_FILE), _read_json(storage, SIZES_FILE)
    named = sorted(int(m.group(1)) for m in map(SHARD_FILE.match, sizes if isinstance(sizes, dict) else {}) if m)
    missing = [n for n in named if n not in committed]
    shown = ", ".join(f"{n:05d}" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
    if isinstance(manifest, dict) and manifest.get("complete") is False:
        planned = (f"; {len(named) - len(missing)} of the {len(named)} shards it planned are committed"
                   + (f", not {shown}" if missing else "")) if named else ""
        return f"the run writing it has not finished (its manifest.json says so{planned})"
    if missing:
        return (f"its sizes.json names {len(named)} shards but {len(missing)} of them are not committed (no "
                f"_stats.json: {shown})")
    if manifest is None and sizes is None and storage.exists(RUN_FILE):
        return f"it has a {RUN_FILE} but no manifest.json: the run writing it has not finished"
    return None


def unfinished_part(storage: Storage) -> list[int] | None:
    """The committed shards of an unfinished output (what a ``--partial`` read of it uses), or None when it is
    whole.  Work done on a partial read names them in its fingerprint, so that it is not taken for the work of
    the finished output."""
    committed = committed_shards(storage)
    return committed if unfinished(storage, committed) else None


def readable_shards(storage: Storage, what: str = "", partial: bool = False) -> list[int]:
    """The committed shards a reader may use, checked: one whose files do not match its ``_stats.json``
    (sizes) is a `UserError` naming it, and so is an output whose run has not finished (`unfinished`) unless
    `partial`, which reads the committed part.  `what` is the flag that named the output in a job (every job
    that reads a dataset has ``--partial``): the message names the flag, or without `what` the argument."""
    label = f"{what} {storage.url}" if what else storage.url
    listing = storage.listing()
    damaged = damaged_shards(storage, listing=listing)
    if damaged:
        shard, why = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise UserError(f"{label}: shard {shard:05d} does not match its _stats.json: {why}{more}; run the job that "
                        "wrote it again (it writes that shard again)")
    committed = committed_shards(storage, listing)
    why = unfinished(storage, committed)
    if why and not partial:
        how = "pass --partial" if what else "read it with partial=True"
        raise UserError(f"{label}: {why}; run the job that wrote it again to finish it, or {how} to use its "
                        f"{len(committed)} committed shards")
    return committed
