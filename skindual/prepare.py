"""The prepare job: a HAM10000 and/or ISIC 2018 download → one real dataset on storage.

The real dataset has the synthetic pairs' shard layout (`skindual.shard_format`), with the bytes inside:
``{key}.jpg`` (the downloaded JPEG without its metadata, `jpeg.strip_metadata`: the same pixels, no EXIF,
GPS or comments; or a resized copy with ``--max-side``), ``{key}.seg.png``
(8-bit 0/255), ``{key}.cls`` (class index, -1 for ISIC 2018's unclassed pairs), ``{key}.txt`` (the
prompt) and ``{key}.json`` (image and lesion id, split, site, age, sex, source, diagnosis type);
``{shard}.parquet`` with every row (bad files too, with their reason and source location),
``{shard}_stats.json`` last, ``sizes.json``, ``preview.png`` (`skindual.preview`), and ``manifest.json``
with the counts per class and split and every skipped file.  Every later stage reads it through
`skindual.pairs`, so a cluster needs no shared file system.

`plan_prepare(config)` then `run_prepare(plan)`: the driver reads the metadata (the CSV and the file listings, from a folder
or an s3:// prefix) with `data.training_table` and splits by lesion; `run_files.check_output` guards
the output (same settings: a rerun skips the committed shards whose listing is unchanged since their commit, or
with ``--verify`` whose sha256 matches; other settings are refused unless ``--overwrite``); the run records the
shards it will write (`run_files.start_run`), then one Ray task per shard still to do reads its pairs from the
source, decodes and checks every image and mask, and commits the shard.  A bad file is one `UserError` naming it
(the shards already committed stay), or with ``--skip-bad`` a rejected row with its reason.
``distributed=False`` (`prepare_here`) runs the same per-shard function in this process (the demo world's
small data).
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from importlib.metadata import version
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from skindual import __version__, data
from skindual.card import check_license, write_card
from skindual.cli import check_fields, option
from skindual.errors import DataError, UserError
from skindual.fingerprint import canonical_json
from skindual.images import image_format
from skindual.jpeg import strip_metadata
from skindual.pairs import read_index
from skindual.preview import write_preview
from skindual.prompts import DEFAULT_TEMPLATE, sample_key
from skindual.run_files import check_output, guard_output, start_run, write_run_files
from skindual.shard_format import CARD_FILE, JPEG_QUALITY, MANIFEST_FILE, encode_mask
from skindual.shard_store import commit_shard, committed_shards, intact_shards
from skindual.storage import Storage, finished, open_storage, output_storage

log = logging.getLogger(__name__)

REAL_SCHEMA = pa.schema([
    ("key", pa.string()), ("image_id", pa.string()), ("lesion_id", pa.string()), ("source", pa.string()),
    ("class_code", pa.string()), ("class_index", pa.int8()), ("split", pa.string()),
    ("localization", pa.string()), ("age", pa.float64()), ("sex", pa.string()), ("dx_type", pa.string()),
    ("dataset", pa.string()), ("prompt", pa.string()), ("status", pa.string()), ("reason", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("mask_area", pa.float64()),
    ("source_image", pa.string()), ("source_mask", pa.string()),
])
"""The parquet of a real shard: one row per pair of the source, ``status`` "ok" or "rejected" (a bad
file, ``reason`` its skip reason); ``source_image``/``source_mask`` are where the pair came from."""
META_FIELDS = ("image_id", "lesion_id", "source", "class_code", "class_index", "split", "localization", "age",
               "sex", "dx_type", "dataset", "width", "height")
"""The fields of a real pair's ``{key}.json`` (besides its key)."""
UNCLASSED = "unclassed"  # class_code of ISIC 2018's pairs in counts and parquets


@dataclass(frozen=True)
class PrepareConfig:
    ham10000: str = option("", "HAM10000 download (HAM10000_metadata.csv, the images, the Tschandl masks): a folder "
                               "or s3:// prefix")
    isic2018: str = option("", "ISIC 2018 Task 1 training data (ISIC2018_Task1-2_Training_Input/, "
                               "ISIC2018_Task1_Training_GroundTruth/; no classes): a folder or s3:// prefix")
    output: str = option("skindual-real", "the prepared real dataset: a folder or s3://bucket/prefix")
    samples_per_shard: int = option(1000, "pairs per shard")
    max_side: int = option(0, "store each pair resized so that its longer side is at most this many pixels "
                              "(0: the downloaded JPEG's own bytes, its metadata (EXIF, GPS, comments) stripped)")
    val_fraction: float = option(0.1, "share of each class's lesions in the val split")
    test_fraction: float = option(0.2, "share of each class's lesions in the test split")
    seed: int = option(0, "seed of the lesion-level split")
    skip_bad: bool = option(False, "skip (and count and list) bad rows and files instead of stopping at the first")
    overwrite: bool = option(False, "replace a dataset at --output prepared with other settings")
    verify: bool = option(False, "read every committed shard and check its sha256 before deciding what is done "
                                 "(else only the shards whose size or stamp in storage's listing changed are read)")
    cpus_per_task: float = option(1.0, "CPUs per shard-writing Ray task")
    license: str = option("", "the licence of the source data, as the dataset's card (README.md) names it: a Hugging "
                              "Face licence id (cc-by-nc-4.0, ...); empty: 'unknown'")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("samples_per_shard",))
        check_license(self.license)
        if not self.ham10000 and not self.isic2018:
            raise UserError("no data: give --ham10000 DIR, --isic2018 DIR, or both (a folder or an s3:// prefix)")
        if self.samples_per_shard > 10_000 or self.max_side < 0 or self.cpus_per_task <= 0:
            raise UserError(f"--samples-per-shard {self.samples_per_shard} / --max-side {self.max_side} / "
                            f"--cpus-per-task {self.cpus_per_task}: need 1-10000, >= 0 and > 0")
        if not (self.val_fraction >= 0 and self.test_fraction >= 0 and self.val_fraction + self.test_fraction < 1):
            raise UserError(f"--val-fraction {self.val_fraction} and --test-fraction {self.test_fraction}: each must "
                            "be >= 0 and together < 1")


FINGERPRINTED = ("ham10000", "isic2018", "samples_per_shard", "max_side", "val_fraction", "test_fraction", "seed")
"""The settings that change the prepared dataset's bytes (its run.json fingerprint).  Not --skip-bad: a
shard committed without it holds no bad file, so a rerun with it (after a stop at a bad file) resumes."""


def source_rows(cfg: PrepareConfig) -> tuple[list[dict], dict[str, int], list[tuple[str, str]]]:
    """The source's rows in key order (metadata and file locations, split by lesion), and the rows the
    metadata already rules out: counts by reason and (file or csv:line, reason)."""
    report = data.training_table(cfg.ham10000 or None, cfg.isic2018 or None, val_fraction=cfg.val_fraction,
                                 test_fraction=cfg.test_fraction, seed=cfg.seed, skip_bad=cfg.skip_bad,
                                 check_files=False, s3_endpoint=cfg.s3_endpoint or None)
    rows = report.table.to_pylist()
    for i, row in enumerate(rows):
        row["key"] = sample_key(*divmod(i, cfg.samples_per_shard))
    return rows, report.skipped, report.skipped_files


def _resized(image: Image.Image, mask: np.ndarray, max_side: int) -> tuple[Image.Image, np.ndarray]:
    """The pair scaled so that its longer side is `max_side` (image Lanczos, mask bilinear ≥ 0.5)."""
    scale = max_side / max(image.size)
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    soft = Image.fromarray(mask.astype(np.float32)).resize(size, Image.Resampling.BILINEAR)
    return image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0), np.asarray(soft) >= 0.5


def _encoded_jpeg(image: Image.Image) -> bytes:
    """`image`'s pixels as a JPEG without metadata (Pillow would write the source's comment, which the
    decoded image carries in its ``info``)."""
    image.info = {}
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buffer.getvalue()


def _without_metadata(image_bytes: bytes, image: Image.Image, source_format: str) -> bytes:
    """A source image's bytes for the real dataset: a JPEG's own, its metadata stripped losslessly
    (`jpeg.strip_metadata`); any other format (`source_format`: what its name's extension pinned when it was
    decoded), or a JPEG whose segments cannot be walked, encoded as JPEG from its decoded pixels."""
    if source_format == "JPEG":
        try:
            return strip_metadata(image_bytes)
        except ValueError:
            pass
    return _encoded_jpeg(image)


def prepare_shard(shard: int, rows: list[dict], cfg: PrepareConfig, fingerprint: str) -> dict[str, Any]:
    """Read, check and commit one shard of the real dataset: its stats as a row, or ``{"error": ...}``
    naming the bad file (without --skip-bad; then nothing of this shard is written)."""
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    members, table = [], []
    for row in rows:
        record = {name: row.get(name) for name in REAL_SCHEMA.names} | {
            "class_code": row.get("class_code") or UNCLASSED, "source_image": row["image_path"],
            "source_mask": row["mask_path"], "status": "ok", "reason": None}
        try:
            image_bytes = data.read_file(row["image_path"], cfg.s3_endpoint or None, "image")
            image, mask = data.decode_pair(image_bytes, data.read_file(row["mask_path"], cfg.s3_endpoint or None,
                                                                       "mask"), row["image_path"], row["mask_path"])
        except DataError as err:
            if not cfg.skip_bad:
                return {"shard": shard, "error": f"{err}, or pass --skip-bad to skip and count such files"}
            table.append(record | {"status": "rejected", "reason": getattr(err, "reason", "unreadable_image")})
            continue
        if cfg.max_side and max(image.size) > cfg.max_side:
            image, mask = _resized(image, mask, cfg.max_side)
            image_bytes = _encoded_jpeg(image)
        else:
            image_bytes = _without_metadata(image_bytes, image, image_format(row["image_path"]))
        record |= {"width": image.width, "height": image.height, "mask_area": float(np.mean(mask))}
        table.append(record)
        members.append({"__key__": row["key"], "jpg": image_bytes, "seg.png": encode_mask(mask),
                        "cls": str(row["class_index"]).encode(), "txt": (row.get("prompt") or "").encode(),
                        "json": canonical_json({"key": row["key"], **{n: record[n] for n in META_FIELDS}})})
    stats = commit_shard(storage, shard, members, pa.Table.from_pylist(table, schema=REAL_SCHEMA), fingerprint)
    return {"shard": shard, "count": stats.count, "successes": stats.successes, "error": ""}


def _prepare_shard_batch(batch: dict, cfg: PrepareConfig, fingerprint: str) -> dict[str, np.ndarray]:
    """Ray Data task: `prepare_shard` of each row (a shard and its source rows, as JSON)."""
    out = [prepare_shard(int(shard), json.loads(rows), cfg, fingerprint)
           for shard, rows in zip(batch["shard"], batch["rows"])]
    return {"shard": np.asarray([o["shard"] for o in out]), "count": np.asarray([o.get("count", 0) for o in out]),
            "successes": np.asarray([o.get("successes", 0) for o in out]),
            "error": np.asarray([o["error"] for o in out], dtype=object)}


@dataclass(frozen=True)
class PreparePlan:
    """A preparation, resolved before any cluster work: the output checked, the source's rows (metadata and
    file locations, split by lesion) grouped by shard, the shards still to do, and whether it is done."""

    config: PrepareConfig
    storage: Storage
    settings: dict[str, Any]
    fingerprint: str
    by_shard: dict[int, list[dict]]
    skipped: dict[str, int]
    skipped_files: list[tuple[str, str]]
    todo: tuple[int, ...]
    done: dict | None


def plan_prepare(cfg: PrepareConfig) -> PreparePlan:
    """Check the output against earlier runs' settings and read the source's metadata (driver: the CSV and the
    file listings only); every problem one `UserError`.  A finished dataset of these settings is not read."""
    storage = output_storage(cfg.output, cfg.s3_endpoint or None)
    settings = {name: getattr(cfg, name) for name in FINGERPRINTED}
    fingerprint = guard_output(storage, settings, cfg.overwrite)
    committed = set() if cfg.overwrite else intact_shards(storage, cfg.verify)
    done = None if cfg.overwrite else finished(storage, MANIFEST_FILE, fingerprint)
    if done is not None and committed == set(committed_shards(storage)) and len(committed) == done["totals"]["shards"]:
        return PreparePlan(cfg, storage, settings, fingerprint, {}, {}, [], (), done)
    rows, skipped, skipped_files = source_rows(cfg)
    by_shard: dict[int, list[dict]] = {}
    for row in rows:
        by_shard.setdefault(int(row["key"]) // 10_000, []).append(row)
    return PreparePlan(cfg, storage, settings, fingerprint, by_shard, skipped, skipped_files,
                       tuple(s for s in sorted(by_shard) if s not in committed), None)


def run_prepare(plan: PreparePlan, distributed: bool = True) -> dict[str, Any]:
    """Write the real dataset's missing shards (Ray tasks on the current cluster, or here when not
    `distributed`); return the manifest (written last)."""
    cfg, storage, by_shard = plan.config, plan.storage, plan.by_shard
    if distributed:
        from skindual.cluster import check_shared_paths, cluster_shape

        check_shared_paths({"--output": cfg.output, "--ham10000": cfg.ham10000, "--isic2018": cfg.isic2018},
                           cluster_shape())
    fingerprint = check_output(storage, plan.settings, cfg.overwrite)
    if not cfg.license:
        log.warning("no --license: the dataset card (%s) says 'license: unknown'; pass --license with the licence "
                    "of the source data", storage.join(CARD_FILE))
    start_run(storage, fingerprint, {s: len(rows) for s, rows in by_shard.items()}, kind="real",
              prompt_template=DEFAULT_TEMPLATE)
    todo = list(plan.todo)
    log.info("%s: %d pairs in %d shards, %d committed, %d to do", storage.url, sum(map(len, by_shard.values())),
             len(by_shard), len(by_shard) - len(todo), len(todo))
    started, written, pairs = time.monotonic(), 0, 0
    if distributed and todo:
        import ray

        items = [{"shard": s, "rows": json.dumps(by_shard[s], default=str)} for s in todo]
        results = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
            _prepare_shard_batch, batch_size=1, batch_format="numpy", num_cpus=cfg.cpus_per_task,
            fn_kwargs={"cfg": cfg, "fingerprint": fingerprint}).iter_rows()
    else:
        results = (prepare_shard(s, json.loads(json.dumps(by_shard[s], default=str)), cfg, fingerprint) for s in todo)
    for result in results:
        if result["error"]:
            raise UserError(result["error"])
        written, pairs = written + 1, pairs + int(result["count"])
        rate = pairs / max(time.monotonic() - started, 1e-9)
        log.info("shard %05d written (%d/%d pairs): %d/%d shards, %.1f pairs/s", result["shard"],
                 result["successes"], result["count"], len(by_shard) - len(todo) + written, len(by_shard), rate)
    # partial: its own output, all committed, whose manifest says "complete": false until the end below
    index = read_index(storage.url, cfg.s3_endpoint or None, partial=True)
    write_preview(storage, index=index)
    rejected = index.filter(pc.equal(pc.field("status"), "rejected"))
    bad_files = [[f, r] for f, r in zip(rejected.column("source_image").to_pylist(), rejected.column("reason").to_pylist())]
    manifest = write_run_files(storage, {
        "config": asdict(cfg), "fingerprint": fingerprint, "kind": "real", "prompt_template": DEFAULT_TEMPLATE,
        "skipped": dict(sorted((Counter(plan.skipped) + Counter(r for _, r in bad_files)).items())),
        "skipped_files": [list(f) for f in plan.skipped_files] + bad_files, "complete": False,
        "versions": {"skindual": __version__, "pillow": version("pillow")}})
    write_card(storage, manifest)  # from the same numbers, and again below: it never shows a count the manifest does not
    _check_classes(manifest, [r for rows in by_shard.values() for r in rows], cfg)
    manifest["complete"] = True  # last: the dataset is done (`storage.finished`)
    storage.write_bytes(MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
    write_card(storage, manifest)
    return manifest


def prepare_here(cfg: PrepareConfig) -> dict[str, Any]:
    """Plan and prepare in this process, without Ray (small data: the demo world, tests); the manifest."""
    plan = plan_prepare(cfg)
    return plan.done if plan.done is not None else run_prepare(plan, distributed=False)


def _check_classes(manifest: dict, rows: list[dict], cfg: PrepareConfig) -> None:
    """Every class the metadata names must keep a usable pair (as `data.read_ham10000` asks of the CSV)."""
    named = {r["class_code"] for r in rows if r.get("class_code")}
    per_class = manifest["totals"]["per_class"]
    empty = sorted(c for c in named if not per_class.get(c, {}).get("ok"))
    if empty:
        raise UserError(f"{cfg.ham10000}: every pair of class {', '.join(empty)} was skipped as bad (see "
                        f"{cfg.output}/manifest.json and the shard parquets); fix those files")
