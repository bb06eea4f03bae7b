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
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from skindual.errors import UserError
from skindual.fingerprint import canonical_json
from skindual.shard_format import (PARQUET_SCHEMA, SAMPLE_META_FIELDS, SHARD_FILE, SIZES_FILE, TAR_MODE, TAR_MTIME,
                                   TAR_OWNER, Sample, ShardStats, encode_sample, parquet_row, shard_names,
                                   validate_samples)
from skindual.storage import Storage, file_sha256

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
    crash never leaves old stats beside new data.
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
        successes = sum(r["status"] == "ok" for r in rows)
        draws = sum(int(r.get("attempts") or 1) for r in rows)  # a real row, without attempts, is one
        stats = ShardStats(
            shard=shard, count=len(rows), successes=successes, failed_to_generate=len(rows) - successes,
            rejections=dict(Counter(str(r["reason"]) for r in rows if r["status"] != "ok")),
            per_class=per_class, tar_sha256=file_sha256(tar_path), tar_bytes=tar_path.stat().st_size,
            parquet_sha256=file_sha256(parquet_path), parquet_bytes=parquet_path.stat().st_size,
            fingerprint=fingerprint, image_format=image_format, per_split=per_split, device=device,
            draws=draws)
        stats_path.write_bytes(canonical_json(asdict(stats)))
        storage.delete(stats_name)  # un-commit a previous attempt before replacing its data
        storage.upload_file(tar_path, tar_name)
        storage.upload_file(parquet_path, parquet_name)
        storage.upload_file(stats_path, stats_name)
    return stats


def read_stats(storage: Storage, shard: int) -> ShardStats | None:
    """The stats of ``shard``, or None when it has none (never written or not finished)."""
    try:
        return ShardStats(**json.loads(storage.read_bytes(shard_names(shard)[2])))
    except FileNotFoundError:
        return None


def is_committed(storage: Storage, shard: int, fingerprint: str) -> bool:
    """Whether ``shard`` is complete and was written with the settings of ``fingerprint``."""
    stats = read_stats(storage, shard)
    tar_name, parquet_name, _ = shard_names(shard)
    return (stats is not None and stats.fingerprint == fingerprint
            and storage.exists(tar_name) and storage.exists(parquet_name))


def committed_shards(storage: Storage) -> list[int]:
    """Sorted numbers of the shards whose tar, parquet and stats all exist (one listing)."""
    found: dict[int, set[str]] = {}
    for name in storage.list():
        match = SHARD_FILE.match(name)
        if match:
            found.setdefault(int(match.group(1)), set()).add(match.group(2))
    return sorted(n for n, kinds in found.items() if len(kinds) == 3)


def _mismatch(stats: ShardStats, sizes: Mapping[str, int]) -> str | None:
    """Why a committed shard's files are not what its stats record (by size), or None."""
    tar_name, parquet_name, _ = shard_names(stats.shard)
    for name, recorded in ((tar_name, stats.tar_bytes), (parquet_name, stats.parquet_bytes)):
        if sizes.get(name) != recorded:
            return f"its {name} is {sizes.get(name, 0):,} bytes where its _stats.json records {recorded:,}"
    return None


def _sha256_of(storage: Storage, name: str) -> str:
    digest = hashlib.sha256()
    for chunk in storage.iter_bytes(name):
        digest.update(chunk)
    return digest.hexdigest()


def damaged_shards(storage: Storage, verify: bool = False, workers: int = 8) -> dict[int, str]:
    """The committed shards (a ``_stats.json`` beside a tar and a parquet) whose files do not match what their
    stats record: shard → why.  Sizes come from one listing; with `verify` every byte is read and its
    sha256 compared too (threads of `workers`), which is what a resume does before it skips a shard."""
    from concurrent.futures import ThreadPoolExecutor

    sizes = storage.sizes()
    found: dict[int, str] = {}
    stats = [s for s in (read_stats(storage, n) for n in committed_shards(storage)) if s is not None]
    for record in stats:
        why = _mismatch(record, sizes)
        if why:
            found[record.shard] = why
    if verify:
        def check(record: ShardStats) -> tuple[int, str | None]:
            tar_name, parquet_name, _ = shard_names(record.shard)
            for name, recorded in ((tar_name, record.tar_sha256), (parquet_name, record.parquet_sha256)):
                try:
                    if _sha256_of(storage, name) != recorded:
                        return record.shard, f"its {name} does not match the sha256 its _stats.json records"
                except FileNotFoundError:
                    return record.shard, f"its {name} is missing"
            return record.shard, None

        with ThreadPoolExecutor(workers) as pool:
            for shard, why in pool.map(check, [r for r in stats if r.shard not in found]):
                if why:
                    found[shard] = why
    return dict(sorted(found.items()))


def intact_shards(storage: Storage) -> set[int]:
    """The committed shards a resume may skip: those whose files match their ``_stats.json`` to the last byte
    (`damaged_shards` with every sha256 read).  Each damaged one is one log line naming it; the resume
    writes it again."""
    damaged = damaged_shards(storage, verify=True)
    for shard, why in damaged.items():
        log.warning("shard %05d at %s does not match its _stats.json (%s): it is written again", shard,
                    storage.url, why)
    return set(committed_shards(storage)) - set(damaged)


def readable_shards(storage: Storage, what: str = "", partial: bool = False) -> list[int]:
    """The committed shards a reader may use, checked: one whose files do not match its ``_stats.json``
    (sizes) is a `UserError` naming it, and so are the shards its ``sizes.json`` names that are not committed
    (a run cut short, or a commit marker lost) unless `partial`, which reads the committed part."""
    label = f"{what} {storage.url}" if what else storage.url
    damaged = damaged_shards(storage)
    if damaged:
        shard, why = next(iter(damaged.items()))
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        raise UserError(f"{label}: shard {shard:05d} does not match its _stats.json: {why}{more}; run the job that "
                        "wrote it again (it writes that shard again)")
    committed = committed_shards(storage)
    try:
        listed = json.loads(storage.read_bytes(SIZES_FILE))
    except FileNotFoundError:
        listed = {}
    named = sorted(int(name.split(".")[0]) for name in listed if SHARD_FILE.match(name))
    missing = [n for n in named if n not in committed]
    if missing and not partial:
        shown = ", ".join(f"{n:05d}" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{label}: its sizes.json names {len(named)} shards but {len(missing)} of them are not "
                        f"committed (no _stats.json: {shown}); run the job that wrote it again, or pass --partial "
                        "to use the committed ones")
    return committed
