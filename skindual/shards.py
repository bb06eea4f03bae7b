"""WebDataset shards of generated (image, mask) pairs, img2dataset-compatible (docs/architecture.md, "Formats").

One shard is three files under the output root, uploaded through `skindual.storage` in this order:

- ``{shard:05d}.tar``: per accepted sample, in key order, ``{key}.jpg`` (or ``.png``),
  ``{key}.seg.png`` (8-bit L, 0/255), ``{key}.cls`` (class index), ``{key}.txt`` (prompt),
  ``{key}.json`` (the sample's metadata) and, when a QC segmenter judged the pair, ``{key}.ignore.png``
  (8-bit L, 0/255: the pixels a segmenter trained on the pair should leave out of its loss,
  `skindual.qc_model.ignore_maps`).  Written with webdataset's `TarWriter` with a fixed
  mtime, owner and mode, so the same samples give the same bytes.
- ``{shard:05d}.parquet``: every sample, rejected ones too (status, reason).
- ``{shard:05d}_stats.json``: counts and checksums; written LAST, it is the commit marker.  A crash
  mid-shard leaves no (or the previous run's deleted) stats, so the shard counts as not done.

`guard_output` checks a rerun before it starts (same settings: resume; others: refuse unless overwrite) and
`check_output` takes the output over,
`write_run_files` writes ``sizes.json`` and ``manifest.json`` at the end, and `read_shards` reads
committed shards back, locally or from S3 (``pipe:`` URLs that run ``python -m skindual.shards cat``).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import logging
import os
import re
import shlex
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from skindual.errors import UserError
from skindual.images import decode_members
from skindual.prompts import MAX_SAMPLES_PER_SHARD
from skindual.storage import Storage, file_sha256, is_remote, open_storage

if TYPE_CHECKING:  # webdataset imports torch when it is installed: only load it when used
    import webdataset as wds

log = logging.getLogger(__name__)

TAR_MTIME = 0  # fixed member mtime, owner and mode: the tar depends only on the samples
TAR_OWNER = "skindual"
TAR_MODE = 0o444
JPEG_QUALITY = 95
SAMPLE_META_FIELDS = ("base_model", "adapter_sha256", "layout", "scheduler", "steps", "guidance")
"""The run settings (keys of `write_shard`'s ``run_info``) copied into every ``{key}.json``."""

PARQUET_SCHEMA = pa.schema([
    ("key", pa.string()), ("row_id", pa.int64()), ("class_code", pa.string()),
    ("class_index", pa.int8()), ("prompt", pa.string()), ("seed", pa.int64()),
    ("attempts", pa.int32()), ("status", pa.string()), ("reason", pa.string()),
    ("mask_area", pa.float64()), ("width", pa.int32()), ("height", pa.int32()),
    ("rejections", pa.list_(pa.string())),  # the quality-control reason of every failed attempt
    ("consistency", pa.float64()),  # the QC segmenter's score of the kept draw (of the last, for a rejected row)
    ("disagreement", pa.float64()),  # the share of the kept pair's pixels in its ignore map (QC segmenter)
    ("mode", pa.string()),  # "joint" (image and mask sampled together) or "mask" (the image sampled for a given mask)
    ("source_key", pa.string()),  # mask mode: the real pair the mask came from, "{shard:05d}/{key}"
    ("augmentation_seed", pa.int64()),  # mask mode: the seed of the mask's augmentation
])
RUN_FILE, SIZES_FILE, MANIFEST_FILE = "run.json", "sizes.json", "manifest.json"
_SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys and fixed separators: equal objects give equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def config_fingerprint(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the settings that determine the output (caller's choice).

    Values must be JSON types; note ``7`` and ``7.0`` differ, so normalise numbers first.
    """
    return hashlib.sha256(canonical_json(dict(config))).hexdigest()


def shard_names(shard: int) -> tuple[str, str, str]:
    """The tar, parquet and stats file names of ``shard``."""
    return f"{shard:05d}.tar", f"{shard:05d}.parquet", f"{shard:05d}_stats.json"


@dataclass
class Sample:
    """One generated pair, as quality control left it.  Arrays: image uint8 H×W×3, mask H×W 0/1.

    `encode_sample` turns the arrays into the exact bytes `write_shard` would write (``image_bytes``,
    ``mask_bytes``) plus the size and mask area, so encoding can happen away from the writer
    (generation encodes while the GPU works on the next batch); the shard comes out the same.
    """

    key: str  # 9 digits, `skindual.prompts.sample_key`
    row_id: int
    class_code: str
    class_index: int
    prompt: str
    seed: int  # the seed of the attempt kept
    image: np.ndarray | None
    mask: np.ndarray | None
    attempts: int = 1
    status: str = "ok"  # "ok" or "rejected" (quality control failed on every attempt)
    reason: str | None = None  # why rejected: "empty", "full-frame", "fragmented", ...
    rejections: list[str] = field(default_factory=list)  # the reason of every failed attempt, in order
    image_bytes: bytes | None = None  # pre-encoded image (`encode_sample`), instead of `image`
    mask_bytes: bytes | None = None  # pre-encoded mask: 8-bit L PNG, 0/255
    encoded_format: str | None = None  # "jpg" or "png": the format of `image_bytes`
    height: int | None = None  # size and mask area of the encoded arrays
    width: int | None = None
    area: float | None = None
    consistency: float | None = None  # the QC segmenter's image–mask Dice, when generation scored it
    ignore: np.ndarray | None = None  # H×W 0/1: where the QC segmenter contradicts the mask (`qc_model.ignore_maps`)
    ignore_bytes: bytes | None = None  # pre-encoded ignore map: 8-bit L PNG, 0/255
    disagreement: float | None = None  # the ignore map's share of the pixels
    mode: str = "joint"  # "joint", or "mask": the image sampled for a given mask (generate --mask-source)
    source_key: str | None = None  # mask mode: the real pair whose mask was augmented, "{shard:05d}/{key}"
    augmentation_seed: int | None = None  # mask mode: the augmentation's seed

    @property
    def mask_area(self) -> float | None:
        if self.mask is None:
            return self.area
        return float(np.count_nonzero(self.mask)) / self.mask.size

    @property
    def size(self) -> tuple[int | None, int | None]:
        """(height, width) of the image, or (None, None) when there is none."""
        return (self.height, self.width) if self.image is None else self.image.shape[:2]


@dataclass(frozen=True)
class ShardStats:
    """The content of ``{shard:05d}_stats.json``."""

    shard: int
    count: int
    successes: int
    failed_to_generate: int  # samples in the parquet but not in the tar (rejected)
    rejections: dict[str, int]  # reason -> samples
    per_class: dict[str, dict[str, int]]  # class code -> {"ok": n, "rejected": m}
    tar_sha256: str
    tar_bytes: int
    parquet_sha256: str
    parquet_bytes: int
    fingerprint: str
    image_format: str = "jpg"
    per_split: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> class code -> ok samples (real data)
    device: str = ""  # the model of the device that sampled the shard ("cpu", a GPU's name; "" for real data)


def _validate(shard: int, samples: Sequence[Sample], image_format: str = "jpg") -> list[Sample]:
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"shard {shard}: duplicate sample keys")
    for s in samples:
        if not (len(s.key) == 9 and s.key.isdigit() and int(s.key) // MAX_SAMPLES_PER_SHARD == shard):
            raise ValueError(f"sample key {s.key!r} does not belong to shard {shard}")
        if s.status not in ("ok", "rejected") or (s.status == "ok") != (s.reason is None):
            raise ValueError(f"sample {s.key}: status {s.status!r} with reason {s.reason!r}")
        encoded = s.image_bytes is not None and s.mask_bytes is not None
        if s.status == "ok" and not encoded and (s.image is None or s.mask is None):
            raise ValueError(f"sample {s.key}: an accepted sample needs an image and a mask")
        if s.image_bytes is not None and s.encoded_format != image_format:
            raise ValueError(f"sample {s.key}: encoded as {s.encoded_format!r}, the shard is {image_format!r}")
        if s.image is not None and (s.image.dtype != np.uint8 or s.image.ndim != 3 or s.image.shape[2] != 3):
            raise ValueError(f"sample {s.key}: image must be uint8 H×W×3, got {s.image.dtype} {s.image.shape}")
        for name in ("mask", "ignore"):
            array = getattr(s, name)
            if array is None:
                continue
            if s.image is not None and array.shape != s.image.shape[:2]:
                raise ValueError(f"sample {s.key}: {name} {array.shape} vs image {s.image.shape[:2]}")
            if array.ndim != 2 or not np.isin(array, (0, 1)).all():
                raise ValueError(f"sample {s.key}: {name} must be H×W with values 0/1")
        if s.mode not in ("joint", "mask"):
            raise ValueError(f"sample {s.key}: mode {s.mode!r}")
    return sorted(samples, key=lambda s: s.key)


def encode_image(array: np.ndarray, image_format: str = "png") -> bytes:
    """PNG, or JPEG (quality 95, 4:4:4, no EXIF), of a uint8 H×W×3 (RGB) or H×W (L) array."""
    buf = io.BytesIO()
    options = {"jpg": {"format": "JPEG", "quality": JPEG_QUALITY, "subsampling": 0},
               "png": {"format": "PNG", "compress_level": 6}}[image_format]
    Image.fromarray(array).save(buf, **options)
    return buf.getvalue()


def encode_mask(mask: np.ndarray) -> bytes:
    """The ``{key}.seg.png`` of a H×W 0/1 mask: 8-bit L PNG with values 0/255."""
    return encode_image((mask > 0).astype(np.uint8) * 255)


def encode_sample(sample: Sample, image_format: str = "jpg") -> Sample:
    """A copy of ``sample`` with its arrays replaced by the bytes `write_shard` would write for them.

    A sample without arrays (a rejected one) is returned unchanged.
    """
    if sample.image is None or sample.mask is None:
        return sample
    _validate(int(sample.key) // MAX_SAMPLES_PER_SHARD, [sample])
    height, width = sample.image.shape[:2]
    ignore = {} if sample.ignore is None else {"ignore": None, "ignore_bytes": encode_mask(sample.ignore)}
    return replace(sample, image=None, mask=None, image_bytes=encode_image(sample.image, image_format),
                   mask_bytes=encode_mask(sample.mask), encoded_format=image_format,
                   height=int(height), width=int(width), area=sample.mask_area, **ignore)


def _row(s: Sample) -> dict[str, Any]:
    """The sample's parquet row (also the core of its ``{key}.json``)."""
    height, width = s.size
    return {"key": s.key, "row_id": s.row_id, "class_code": s.class_code, "class_index": s.class_index,
            "prompt": s.prompt, "seed": s.seed, "attempts": s.attempts, "status": s.status,
            "reason": s.reason, "mask_area": s.mask_area, "width": width, "height": height,
            "rejections": list(s.rejections), "consistency": s.consistency, "disagreement": s.disagreement,
            "mode": s.mode, "source_key": s.source_key, "augmentation_seed": s.augmentation_seed}


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
    ordered = _validate(shard, samples, image_format)
    meta = {name: run_info[name] for name in SAMPLE_META_FIELDS}
    members = []
    for s in ordered:
        if s.status != "ok":
            continue
        if s.image_bytes is None or s.mask_bytes is None:
            s = encode_sample(s, image_format)
        member = {"__key__": s.key, image_format: s.image_bytes, "seg.png": s.mask_bytes,
                  "cls": str(s.class_index).encode(), "txt": s.prompt.encode(),
                  "json": canonical_json({**meta, **_row(s)})}
        if s.ignore_bytes is not None:
            member["ignore.png"] = s.ignore_bytes
        members.append(member)
    table = pa.Table.from_pylist([_row(s) for s in ordered], schema=PARQUET_SCHEMA)
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
        stats = ShardStats(
            shard=shard, count=len(rows), successes=successes, failed_to_generate=len(rows) - successes,
            rejections=dict(Counter(str(r["reason"]) for r in rows if r["status"] != "ok")),
            per_class=per_class, tar_sha256=file_sha256(tar_path), tar_bytes=tar_path.stat().st_size,
            parquet_sha256=file_sha256(parquet_path), parquet_bytes=parquet_path.stat().st_size,
            fingerprint=fingerprint, image_format=image_format, per_split=per_split, device=device)
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
        match = _SHARD_FILE.match(name)
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
    named = sorted(int(name.split(".")[0]) for name in listed if _SHARD_FILE.match(name))
    missing = [n for n in named if n not in committed]
    if missing and not partial:
        shown = ", ".join(f"{n:05d}" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserError(f"{label}: its sizes.json names {len(named)} shards but {len(missing)} of them are not "
                        f"committed (no _stats.json: {shown}); run the job that wrote it again, or pass --partial "
                        "to use the committed ones")
    return committed


def write_run_files(storage: Storage, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``sizes.json`` and ``manifest.json`` from the committed shards' stats; return the manifest.

    ``manifest`` holds the run's config and versions; totals (overall, per reason, per class) are
    added under ``"totals"``.  If it names a ``fingerprint``, every shard must have been written with it.
    """
    all_stats = [read_stats(storage, n) for n in committed_shards(storage)]
    stats_list = [s for s in all_stats if s is not None]
    wrong = [s.shard for s in stats_list if "fingerprint" in manifest and s.fingerprint != manifest["fingerprint"]]
    if wrong:
        raise UserError(f"{storage.url}: shards {wrong} were written with other settings; rerun with --overwrite")
    rejections: Counter[str] = Counter()
    per_class: dict[str, Counter[str]] = {}
    per_split: dict[str, Counter[str]] = {}
    for s in stats_list:
        rejections.update(s.rejections)
        for code, counts in s.per_class.items():
            per_class.setdefault(code, Counter()).update(counts)
        for split, counts in s.per_split.items():
            per_split.setdefault(split, Counter()).update(counts)
    totals = {"shards": len(stats_list), "count": sum(s.count for s in stats_list),
              "successes": sum(s.successes for s in stats_list),
              "failed_to_generate": sum(s.failed_to_generate for s in stats_list),
              "rejections": dict(rejections), "per_class": {c: dict(n) for c, n in per_class.items()}}
    if per_split:
        totals["per_split"] = {split: dict(sorted(n.items())) for split, n in sorted(per_split.items())}
    sizes = {shard_names(s.shard)[0]: s.successes for s in stats_list}
    result = {**manifest, "totals": totals}
    storage.write_bytes(SIZES_FILE, json.dumps(sizes, sort_keys=True, indent=1).encode())
    storage.write_bytes(MANIFEST_FILE, json.dumps(result, sort_keys=True, indent=1).encode())
    return result


def _flag(name: str, value: Any) -> str:
    shown = "(unset)" if value is None else value if isinstance(value, (str, int, float)) else json.dumps(value)
    return f"--{name.replace('_', '-')} {shown}"


def read_run_config(storage: Storage) -> dict[str, Any]:
    """The settings (``config``) recorded in an output's ``run.json``; empty when it has none."""
    try:
        return json.loads(storage.read_bytes(RUN_FILE)).get("config", {})
    except FileNotFoundError:
        return {}


def guard_output(storage: Storage, config: Mapping[str, Any], overwrite: bool = False) -> str:
    """The fingerprint of `config` for a run into `storage`, after checking that the run may write there
    (reads only; `check_output` then takes the output over).

    Without ``overwrite``: no ``run.json`` is a fresh output (refused if it holds shards anyway); the
    same fingerprint is a resume (committed shards are kept); another one is a `UserError` naming the
    differing settings."""
    fingerprint = config_fingerprint(config)
    if overwrite:
        return fingerprint
    try:
        previous = json.loads(storage.read_bytes(RUN_FILE))
    except FileNotFoundError:
        previous = None
    if previous is not None:
        if previous.get("fingerprint") == fingerprint:
            return fingerprint
        old = previous.get("config", {})
        diffs = [f"{_flag(k, old.get(k))}, now {_flag(k, config.get(k))}"
                 for k in sorted(set(old) | set(config)) if old.get(k) != config.get(k)]
        what = "; ".join(diffs) or f"other settings (fingerprint {previous.get('fingerprint')})"
        raise UserError(f"{storage.url} was written with {what}; pass --overwrite to replace it, "
                        "or choose another --output")
    if any(_SHARD_FILE.match(n) or n in (SIZES_FILE, MANIFEST_FILE) for n in storage.list()):
        raise UserError(f"{storage.url} holds shards but no {RUN_FILE}, so not from a run of this "
                        "tool; pass --overwrite to replace them, or choose another --output")
    return fingerprint


def check_output(storage: Storage, config: Mapping[str, Any], overwrite: bool = False, device: str = "") -> str:
    """Take an output over for a run of `config` (`guard_output` first); return the fingerprint.

    ``overwrite``: start afresh, deleting the old shard and run files (only those: other files under the
    root stay).  `device` (what samples the shards: its model, or the CPU and its thread count) is recorded
    in ``run.json``: a resume on another device model is refused, as its bytes would differ from the
    committed shards'.  ``run.json`` is written when the output is fresh."""
    fingerprint = guard_output(storage, config, overwrite)
    try:
        previous = None if overwrite else json.loads(storage.read_bytes(RUN_FILE))
    except FileNotFoundError:
        previous = None
    if previous is not None:
        recorded = previous.get("device", "")
        if device and recorded and recorded != device and committed_shards(storage):
            raise UserError(f"{storage.url} was sampled on {recorded} and this run would sample on {device}, which "
                            "gives other bytes; run it where the first run ran (--accelerator-type, "
                            "--cpus-per-actor), or pass --overwrite")
        return fingerprint
    ours = [n for n in storage.list() if _SHARD_FILE.match(n) or n in (SIZES_FILE, MANIFEST_FILE, RUN_FILE)]
    # stats (commit markers) first, so an interrupted delete leaves no committed shard behind
    for name in sorted(ours, key=lambda n: (not n.endswith("_stats.json"), n)):
        storage.delete(name)
    record = {"fingerprint": fingerprint, "config": dict(config), **({"device": device} if device else {})}
    storage.write_bytes(RUN_FILE, json.dumps(record, sort_keys=True, indent=1).encode())
    return fingerprint


def shard_urls(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None, partial: bool = False) -> list[str]:
    """URLs webdataset can open for the committed shards of output roots (checked by `readable_shards`:
    a damaged shard, or one the output names but never committed, is a `UserError` unless `partial`), or
    of ``.tar`` URLs given.

    Local tars are plain paths; S3 tars become ``pipe:`` URLs streaming through `cat` with the
    standard AWS credential chain (nothing secret is put into the URL).
    """
    urls: list[str] = []
    for url in [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls):
        if url.endswith(".tar"):
            parent, _, name = url.rpartition("/")
            names, storage = [name], open_storage(parent or ".", s3_endpoint)
        else:
            storage = open_storage(url, s3_endpoint)
            names = [shard_names(n)[0] for n in readable_shards(storage, partial=partial)]
        for name in names:
            if not is_remote(storage.url):
                urls.append(storage.join(name))
                continue
            command = [sys.executable, "-m", "skindual.shards", "cat", storage.join(name)]
            if s3_endpoint:
                command += ["--s3-endpoint", s3_endpoint]
            urls.append("pipe:" + shlex.join(command))
    return urls


def _to_output(sample: dict[str, Any], to_tensors: bool) -> dict[str, Any]:
    """A raw webdataset sample decoded: its members opened as their names' formats and checked against the
    size its json records (`images.decode_members`)."""
    meta = json.loads(sample["json"])
    image, mask, ignore = decode_members(sample, meta)
    image = np.asarray(image)
    ignore = ignore if ignore is not None else np.zeros_like(mask)
    out = {"key": sample["__key__"], "image": image, "mask": mask, "ignore": ignore,
           "class_index": int(sample["cls"]), "prompt": sample["txt"].decode(), "meta": meta}
    if to_tensors:
        import torch  # only consumers that ask for tensors need torch

        out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255)
        out["mask"] = torch.from_numpy(mask[None]).float()
        out["ignore"] = torch.from_numpy(ignore[None]).float()
    return out


def read_shards(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None,
                to_tensors: bool = False, shardshuffle: int | bool = False, partial: bool = False) -> wds.WebDataset:
    """A webdataset pipeline over committed shards yielding dicts: ``key``, ``image`` (uint8
    H×W×3), ``mask`` (uint8 H×W 0/1), ``ignore`` (uint8 H×W 0/1: the pair's ignore map, pixels a
    segmenter should leave out of its loss; all 0 for a pair without one), ``class_index``, ``prompt``,
    ``meta`` (the sample's json).

    ``to_tensors``: image float C×H×W in [0, 1], mask and ignore float 1×H×W in {0, 1}.  Shards are split over
    torch.distributed ranks and DataLoader workers.  Further stages can be chained as usual.  The shards
    are checked first (`readable_shards`; `partial` reads the committed part of an output that names more).
    """
    import webdataset as wds

    urls = shard_urls(url_or_urls, s3_endpoint, partial)
    if not urls:
        raise UserError(f"no committed shards (with a _stats.json) under {url_or_urls}")
    dataset = wds.WebDataset(urls, shardshuffle=shardshuffle, nodesplitter=wds.split_by_node)
    return dataset.map(functools.partial(_to_output, to_tensors=to_tensors))


def _cat(url: str, s3_endpoint: str | None) -> int:
    """Stream one shard from S3 to stdout (the ``pipe:`` URLs of `shard_urls`)."""
    parent, _, name = url.rpartition("/")
    storage = open_storage(parent, s3_endpoint)
    if not is_remote(url):
        print(f"skindual.shards cat: {url} is not an s3:// URL", file=sys.stderr)
        return 2
    try:  # the storage layer turns a missing object or bad credentials into one line
        for chunk in storage.iter_bytes(name):
            sys.stdout.buffer.write(chunk)
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # the reader stopped early: exit quietly with the status of a
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # SIGPIPE death (141),
        return 141  # which webdataset's Pipe ignores
    except (UserError, OSError) as exc:
        print(f"skindual.shards cat: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skindual.shards")
    sub = parser.add_subparsers(dest="command", required=True)
    cat = sub.add_parser("cat", help="write one shard (s3:// URL) to stdout")
    cat.add_argument("url")
    cat.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    return _cat(args.url, args.s3_endpoint)


if __name__ == "__main__":
    sys.exit(main())
