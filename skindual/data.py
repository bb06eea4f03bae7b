"""Real training data: the HAM10000 and ISIC 2018 Task 1 readers, the training table, pair loading,
and the row selections the stages share (classed rows of a split, class balancing, the low-data cut).

Layouts (docs/architecture.md, "Inputs"), each a local folder or an ``s3://`` prefix (read through
`skindual.storage`; a row's ``image_path``/``mask_path`` is then the file's full location):

- HAM10000 root: `HAM10000_metadata.csv` (`lesion_id,image_id,dx,dx_type,age,sex,localization`,
  optional `dataset`), images `ISIC_xxxxxxx.jpg` anywhere under the root (found by one recursive
  walk that skips the mask folder, so `HAM10000_images_part_1/` and `_part_2/` both work), masks
  `HAM10000_segmentations_lesion_tschandl/ISIC_xxxxxxx_segmentation.png`.
- ISIC 2018 root: `ISIC2018_Task1-2_Training_Input/*.jpg` and
  `ISIC2018_Task1_Training_GroundTruth/ISIC_xxxxxxx_segmentation.png`; no class, one lesion per image.

Bad input is one `DataError` naming the file (or CSV line) and saying what to do. With
`skip_bad=True` a bad row is skipped instead and counted by reason (`SKIP_REASONS`) in the
returned `DataReport`, never dropped silently. Problems no skip can fix (a missing CSV column or
folder, an image id twice, a lesion with two diagnoses) are always errors.

Classes: by default every class the CSV names must keep at least one usable row; if skipping
emptied one, that is an error naming it. `require_classes=[...]` replaces that rule with
"these classes must have rows" (and `[]` with "no class is needed"), for callers who only
train some classes.

With `check_files=True` every image is decoded (JPEG at 1/8 scale) and every mask
decoded and checked for size and binariness, on a thread pool (PIL releases the GIL).
"""

from __future__ import annotations

import csv
import hashlib
import io
import re
import math
import os
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
from PIL import Image

from skindual.errors import DataError, UserError
from skindual.images import open_image
from skindual.prompts import CLASS_BY_CODE, CLASS_CODES, build_prompt, lesion_class
from skindual.storage import Storage, is_remote, open_storage

HAM_CSV = "HAM10000_metadata.csv"
HAM_COLUMNS = ("lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization")
HAM_MASKS = "HAM10000_segmentations_lesion_tschandl"
ISIC_IMAGES = "ISIC2018_Task1-2_Training_Input"
ISIC_MASKS = "ISIC2018_Task1_Training_GroundTruth"
MASK_SUFFIX = "_segmentation.png"
SKIP_REASONS = ("bad_row", "unknown_dx", "missing_image", "unreadable_image",
                "missing_mask", "unreadable_mask", "mask_size", "nonbinary_mask")
_SKIP_HINT = "or pass --skip-bad to skip and count such rows"

SOURCE_SCHEMA = pa.schema([
    ("image_id", pa.string()), ("lesion_id", pa.string()), ("source", pa.string()),
    ("class_code", pa.string()), ("class_index", pa.int8()),
    ("image_path", pa.string()), ("mask_path", pa.string()),
    ("localization", pa.string()), ("age", pa.float64()), ("sex", pa.string()),
    ("dx_type", pa.string()), ("dataset", pa.string()), ("prompt", pa.string()),
])
TRAINING_TABLE_SCHEMA = SOURCE_SCHEMA.append(pa.field("split", pa.string()))


@dataclass
class DataReport:
    """A table of usable rows plus what was skipped: counts by reason and (file or `csv:line`, reason)."""

    table: pa.Table
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_files: list[tuple[str, str]] = field(default_factory=list)


class _FileError(DataError):
    """A DataError about one file, with the skip reason it counts under."""

    def __init__(self, reason: str, path: str, message: str) -> None:
        super().__init__(message)
        self.reason, self.path = reason, path


class _Skips:
    """Raise on bad input, or (skip_bad) count it by reason."""

    def __init__(self, skip_bad: bool) -> None:
        self.skip_bad, self.counts, self.files = skip_bad, Counter[str](), []

    def bad(self, reason: str, where: str, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.counts[reason] += 1
        self.files.append((where, reason))

    def report(self, rows: list[dict]) -> DataReport:
        """The rows (keys outside SOURCE_SCHEMA are dropped) sorted by image id, and the skips."""
        table = pa.Table.from_pylist(rows, schema=SOURCE_SCHEMA).sort_by("image_id")
        return DataReport(table, dict(sorted(self.counts.items())), self.files)


def read_ham10000(
    root: str, *, skip_bad: bool = False, check_files: bool = True, require_classes: Sequence[str] | None = None,
    s3_endpoint: str | None = None,
) -> DataReport:
    """Read a HAM10000 folder (or s3:// prefix) into a table (`SOURCE_SCHEMA`), rows sorted by image id."""
    storage = open_storage(root if is_remote(root) else os.path.abspath(root), s3_endpoint)
    names = storage.list()
    csv_path, mask_dir = storage.join(HAM_CSV), storage.join(HAM_MASKS)
    masks = {n[len(HAM_MASKS) + 1:] for n in names if n.startswith(HAM_MASKS + "/")}
    for path, found, what in ((csv_path, HAM_CSV in names, "metadata CSV"), (mask_dir, bool(masks), "mask folder")):
        if not found:
            raise DataError(f"HAM10000 {what} {path} not found; unpack the HAM10000 download into {storage.url}")
    needed = [lesion_class(c).code for c in require_classes] if require_classes is not None else None
    skips = _Skips(skip_bad)
    rows, present = _read_ham_csv(storage.read_bytes(HAM_CSV).decode("utf-8-sig"), csv_path, skips)
    _check_one_class_per_lesion(rows, csv_path)
    images = _index_images(storage, [n for n in names if not n.startswith(HAM_MASKS + "/")])
    pairs = []
    for row in rows:
        found, where = images.get(row["image_id"], []), row["where"]
        mask_path = storage.join(f"{HAM_MASKS}/{row['image_id']}{MASK_SUFFIX}")
        if len(found) > 1:
            raise DataError(f"image {row['image_id']} ({where}) is there twice: {' and '.join(found)}; delete one")
        if not found:
            skips.bad("missing_image", where, f"image {row['image_id']}.jpg ({where}) not found under {storage.url}; "
                      f"add it or delete its row, {_SKIP_HINT}")
        elif row["image_id"] + MASK_SUFFIX not in masks:
            skips.bad("missing_mask", mask_path, f"mask {mask_path} ({where}) not found; "
                      f"add it or delete its row, {_SKIP_HINT}")
        else:
            pairs.append(row | {"image_path": found[0], "mask_path": mask_path})
    rows = _check_pairs(pairs, skips, s3_endpoint) if check_files else pairs
    kept = Counter(r["class_code"] for r in rows)
    empty = [c for c in (present if needed is None else needed) if not kept[c]]
    if empty:
        detail = "; ".join(f"{c}: {present[c]} row(s) in the CSV, all skipped" if present[c]
                           else f"{c}: no rows in the CSV" for c in empty)
        raise DataError(f"{storage.url}: no usable images for class {', '.join(empty)} ({detail}); fix or add those "
                        "images, or pass require_classes listing only the classes you need")
    if not rows:
        raise DataError(f"{csv_path} gives no usable image/mask pairs; check the CSV and the image folders")
    for row in rows:
        row["prompt"] = build_prompt(row["class_code"], row["localization"], row["age"], row["sex"])
    return skips.report(rows)


def read_isic2018(root: str, *, skip_bad: bool = False, check_files: bool = True,
                  s3_endpoint: str | None = None) -> DataReport:
    """Read an ISIC 2018 Task 1 training folder (or s3:// prefix): masks only, no class (class_index -1),
    lesion = image."""
    storage = open_storage(root if is_remote(root) else os.path.abspath(root), s3_endpoint)
    names = storage.list()
    listed = {folder: sorted(n[len(folder) + 1:] for n in names if n.startswith(folder + "/"))
              for folder in (ISIC_IMAGES, ISIC_MASKS)}
    for folder, files in listed.items():
        if not files:
            raise DataError(f"ISIC 2018 folder {storage.join(folder)} not found; unpack the ISIC 2018 Task 1 "
                            f"training data into {storage.url}")
    skips = _Skips(skip_bad)
    masks = set(listed[ISIC_MASKS])
    pairs = []
    for name in listed[ISIC_IMAGES]:
        image_id, ext = os.path.splitext(name)
        if "/" in name or ext.lower() not in (".jpg", ".jpeg"):
            continue  # the folder also holds LICENSE and ATTRIBUTION files
        image_path = storage.join(f"{ISIC_IMAGES}/{name}")
        mask_path = storage.join(f"{ISIC_MASKS}/{image_id}{MASK_SUFFIX}")
        if image_id + MASK_SUFFIX not in masks:
            skips.bad("missing_mask", image_path, f"mask {mask_path} for image {image_path} not found; "
                      f"add it or remove the image, {_SKIP_HINT}")
            continue
        pairs.append({"image_id": image_id, "lesion_id": image_id, "source": "isic2018", "class_index": -1,
                      "image_path": image_path, "mask_path": mask_path})
    rows = _check_pairs(pairs, skips, s3_endpoint) if check_files else pairs
    if not rows:
        raise DataError(f"{storage.join(ISIC_IMAGES)} gives no usable image/mask pairs; check the folder")
    return skips.report(rows)


def training_table(
    ham10000: str | None = None, isic2018: str | None = None, *, val_fraction: float = 0.1,
    test_fraction: float = 0.2, seed: int = 0, skip_bad: bool = False, check_files: bool = True,
    require_classes: Sequence[str] | None = None, s3_endpoint: str | None = None,
) -> DataReport:
    """Both sources in one table (`TRAINING_TABLE_SCHEMA`) with a train/val/test split by lesion.

    Per class (ISIC's unclassed rows are one more group) the lesions are ordered by a hash of
    (seed, lesion_id) and cut: the first round(n·test_fraction) go to test, the next
    round(n·val_fraction) to val, the rest to train, which always keeps at least one lesion.
    Fractions count lesions, not images. The split depends only on the set of lesions and the
    seed, never on row order. Skip counts of both sources are summed.
    """
    if not (val_fraction >= 0 and test_fraction >= 0 and val_fraction + test_fraction < 1):
        raise UserError(f"val_fraction {val_fraction} and test_fraction {test_fraction}: "
                        "each must be >= 0 and together < 1")
    if ham10000 is None and isic2018 is None:
        raise UserError("no data: give a HAM10000 root, an ISIC 2018 root, or both")
    if ham10000 is None and require_classes:
        raise UserError(f"require_classes {list(require_classes)} needs a HAM10000 root: ISIC 2018 has no classes")
    reports = []
    if ham10000 is not None:
        reports.append(read_ham10000(ham10000, skip_bad=skip_bad, check_files=check_files,
                                     require_classes=require_classes, s3_endpoint=s3_endpoint))
    if isic2018 is not None:
        reports.append(read_isic2018(isic2018, skip_bad=skip_bad, check_files=check_files, s3_endpoint=s3_endpoint))
    table = pa.concat_tables([r.table for r in reports])
    twice = sorted(i for i, n in Counter(table.column("image_id").to_pylist()).items() if n > 1)
    if twice:
        raise DataError(f"image {twice[0]} is in both HAM10000 ({ham10000}) and ISIC 2018 ({isic2018}) "
                        f"({len(twice)} such images); remove them from one of the two")
    rows = table.to_pylist()
    _check_one_class_per_lesion(rows, "the combined table")
    split = _split_lesions(rows, val_fraction, test_fraction, seed)
    table = table.append_column("split", pa.array([split[r["lesion_id"]] for r in rows], pa.string()))
    skipped = sum((Counter(r.skipped) for r in reports), Counter[str]())
    return DataReport(table, dict(sorted(skipped.items())), [f for r in reports for f in r.skipped_files])


def load_pair(image_path: str, mask_path: str, size: int | None = None,
              s3_endpoint: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One (image, mask) pair from its files (local paths or s3:// URLs): uint8 RGB HxWx3 and uint8 HxW
    with values {0, 1}.  With `size`, resized by `resize_pair` (centre-cropped to a square first);
    with `size=None` as stored."""
    image, mask = decode_pair(read_file(image_path, s3_endpoint, "image"), read_file(mask_path, s3_endpoint, "mask"),
                              image_path, mask_path)
    if size is None:
        return np.array(image), mask.astype(np.uint8)
    return resize_pair(image, mask, size)


def decode_pair(image_bytes: bytes, mask_bytes: bytes, image_path: str, mask_path: str) -> tuple[Image.Image, np.ndarray]:
    """A pair's files decoded and checked: (RGB image, bool mask of the image's size).  A file that
    cannot be used raises a `DataError` naming it (its skip reason in ``.reason``).  Each file is opened as
    the format its extension names and its size checked before it is decoded (`images.open_image`)."""
    with _reading(image_path, "image"), open_image(image_bytes, image_path, what=f"image {image_path}") as im:
        image = im.convert("RGB")
    return image, _load_mask(mask_bytes, mask_path, image.size, image_path)


def read_file(location: str, s3_endpoint: str | None = None, kind: str = "file") -> bytes:
    """The bytes of a local path or s3:// URL; a missing or unreadable file is a `DataError` naming it."""
    parent, _, name = location.rpartition("/")
    with _reading(location, kind):
        return _storage_of(parent or ".", s3_endpoint).read_bytes(name)


_STORAGES: dict[tuple[str, str | None], Storage] = {}
_STORAGES_LOCK = threading.Lock()


def _storage_of(folder: str, s3_endpoint: str | None) -> Storage:
    """One `Storage` per folder and endpoint in this process (an S3 client is slow to make)."""
    with _STORAGES_LOCK:
        key = (folder, s3_endpoint)
        if key not in _STORAGES:
            _STORAGES[key] = open_storage(folder, s3_endpoint)
        return _STORAGES[key]


def resize_pair(image: np.ndarray | Image.Image, mask: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A pair at size × size, the one resize every stage uses: uint8 RGB size×size×3 and 0/1 size×size.

    A non-square pair is first centre-cropped to a square of its shorter side (a lesion is
    photographed centred); then the image is resized with Lanczos and the mask, as a 0/1 float, with
    a bilinear (area-like when shrinking) filter thresholded at 0.5, so it stays binary and follows
    the image's edges.  A pair already at size × size comes back as it is.
    """
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")
    image = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    width, height = image.size
    if (width, height) == (size, size):
        return np.array(image), (np.asarray(mask) > 0).astype(np.uint8)
    resized = image.resize((size, size), Image.Resampling.LANCZOS, box=_centre_square(width, height), reducing_gap=3.0)
    return np.array(resized), resize_mask(mask, size)


def _centre_square(width: int, height: int) -> tuple[int, int, int, int]:
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A 0/1 mask at size × size as `resize_pair` resizes its pair's: centre-cropped to a square, resized as a
    0/1 float with a bilinear filter and thresholded at 0.5 (uint8 0/1)."""
    height, width = np.asarray(mask).shape
    if (height, width) == (size, size):
        return (np.asarray(mask) > 0).astype(np.uint8)
    soft = Image.fromarray(np.asarray(mask).astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR,
                                                                        box=_centre_square(width, height))
    return (np.asarray(soft) >= 0.5).astype(np.uint8)


def resize_ignore(ignore: np.ndarray, size: int) -> np.ndarray:
    """An ignore map (H×W, nonzero: ignored) at size × size, cropped as `resize_pair` crops its pair; a
    pixel any ignored pixel reaches through the bilinear filter stays ignored (0/1 uint8)."""
    height, width = ignore.shape
    if (height, width) == (size, size):
        return (np.asarray(ignore) > 0).astype(np.uint8)
    soft = Image.fromarray((np.asarray(ignore) > 0).astype(np.float32)).resize(
        (size, size), Image.Resampling.BILINEAR, box=_centre_square(width, height))
    return (np.asarray(soft) > 0).astype(np.uint8)


# --- row selections -------------------------------------------------------------------------


def classed_rows(table: pa.Table, split: str = "all", max_per_class: int = 0) -> pa.Table:
    """The rows with a class (ISIC 2018's unclassed rows left out) of `split` ("all": every split), at
    most `max_per_class` of each class (the first ones; 0: all)."""
    classed = table.filter(np.asarray(table.column("class_index")) >= 0)
    if split != "all":
        classed = classed.filter(np.asarray(classed.column("split")) == split)
    if not max_per_class:
        return classed
    labels = np.asarray(classed.column("class_index"))
    keep = np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in range(len(CLASS_CODES))])
    return classed.take(np.sort(keep))


def balance_classes(table: pa.Table, seed: int) -> pa.Table:
    """Rare classes' rows repeated, drawn with replacement by a seeded generator, up to the largest
    class's count; rows stay in table order."""
    labels = np.asarray(table.column("class_index"))
    counts = np.bincount(labels)
    rng = np.random.default_rng(seed)
    index = []
    for c in np.flatnonzero(counts):
        rows = np.flatnonzero(labels == c)
        index.extend(rows)
        index.extend(rng.choice(rows, counts.max() - len(rows), replace=True))
    return table.take(np.sort(np.asarray(index)))


def fraction_per_class(rows: pa.Table, fraction: float, seed: int) -> pa.Table:
    """A seeded random `fraction` of each class's rows, rounded up (so at least one per class)."""
    if fraction >= 1:
        return rows
    labels = np.asarray(rows.column("class_index"))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), math.ceil(fraction * (labels == c).sum()), replace=False)
            for c in np.unique(labels)]
    return rows.take(np.sort(np.concatenate(keep)))


def low_data_table(table: pa.Table, fraction: float, seed: int = 0) -> pa.Table:
    """The low-data regime: the table with its train split cut to a seeded `fraction` of each class
    (`fraction_per_class`); val and test kept."""
    train = np.asarray(table.column("split")) == "train"
    return pa.concat_tables([fraction_per_class(table.filter(train), fraction, seed), table.filter(~train)])


# --- helpers ---------------------------------------------------------------------------------


def _read_ham_csv(text: str, csv_path: str, skips: _Skips) -> tuple[list[dict], Counter[str]]:
    """The CSV's good rows as dicts (`where` is their `csv:line`), and how many rows name each known dx."""
    with io.StringIO(text, newline="") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        for column in HAM_COLUMNS:
            if column not in header:
                raise DataError(f"{csv_path} has no column {column!r} (header: {','.join(header)}); "
                                f"HAM10000 metadata needs {','.join(HAM_COLUMNS)}")
        rows, seen, present = [], {}, Counter[str]()
        for raw in reader:
            where = f"{csv_path}:{reader.line_num}"
            values = {k: (v or "").strip() for k, v in raw.items() if k is not None}
            if values.get("dx") in CLASS_BY_CODE:
                present[values["dx"]] += 1
            if None in raw or any(raw[c] is None for c in HAM_COLUMNS):
                skips.bad("bad_row", where, f"{where}: the row does not have the header's {len(header)} fields; "
                          f"fix the row, {_SKIP_HINT}")
                continue
            if not values["image_id"] or not values["lesion_id"]:
                skips.bad("bad_row", where, f"{where}: empty image_id or lesion_id; fix the row, {_SKIP_HINT}")
                continue
            if values["image_id"] in (".", "..") or any(c in values["image_id"] for c in "/\\\0"):
                skips.bad("bad_row", where, f"{where}: image_id {values['image_id']!r} is not a plain file name (it "
                          f"names the image and mask files: no folders, '/' or '..'); fix the row, {_SKIP_HINT}")
                continue
            if values["dx"] not in CLASS_BY_CODE:
                skips.bad("unknown_dx", where, f"{where}: unknown dx {values['dx']!r} (image {values['image_id']}); "
                          f"known codes are {', '.join(CLASS_CODES)}; fix the row, {_SKIP_HINT}")
                continue
            try:
                age = float(values["age"]) if values["age"] else None
            except ValueError:
                skips.bad("bad_row", where, f"{where}: age {values['age']!r} is not a number; "
                          f"leave it empty if unknown, {_SKIP_HINT}")
                continue
            if values["image_id"] in seen:
                raise DataError(f"{where}: image {values['image_id']} is listed again (first at "
                                f"{seen[values['image_id']]}); delete the duplicate row")
            seen[values["image_id"]] = where
            code = values["dx"]
            rows.append({
                "image_id": values["image_id"], "lesion_id": values["lesion_id"], "source": "ham10000",
                "class_code": code, "class_index": CLASS_BY_CODE[code].index,
                "localization": values["localization"] or None,
                "age": None if age is None or math.isnan(age) else age,
                "sex": values["sex"] or None, "dx_type": values["dx_type"] or None,
                "dataset": values.get("dataset") or None, "where": where,
            })
    return rows, present


def _check_one_class_per_lesion(rows: Iterable[dict], where: str) -> None:
    """One lesion, one diagnosis: otherwise the split could not keep the lesion in one class's cut."""
    first: dict[str, dict] = {}
    for row in rows:
        other = first.setdefault(row["lesion_id"], row)
        if other.get("class_code") != row.get("class_code"):
            raise DataError(f"{where}: lesion {row['lesion_id']} has two diagnoses: {other['image_id']} is "
                            f"{other.get('class_code')}, {row['image_id']} is {row.get('class_code')}; "
                            "one lesion must have one dx, fix its rows")


def _index_images(storage: Storage, names: Iterable[str]) -> dict[str, list[str]]:
    """Every `*.jpg` of `names` (relative to `storage`) by image id, as full locations in name order."""
    found: dict[str, list[str]] = {}
    for name in sorted(names):
        stem, ext = os.path.splitext(name.rpartition("/")[2])
        if ext.lower() in (".jpg", ".jpeg"):
            found.setdefault(stem, []).append(storage.join(name))
    return found


def _check_pairs(pairs: list[dict], skips: _Skips, s3_endpoint: str | None = None) -> list[dict]:
    """The pairs whose image decodes and whose mask fits it; the others raise or are skipped, in order."""
    with ThreadPoolExecutor(max_workers=min(16, 4 * (os.cpu_count() or 1))) as pool:
        problems = list(pool.map(lambda pair: _check_pair(pair, s3_endpoint), pairs))
    kept = []
    for pair, problem in zip(pairs, problems):
        if problem is None:
            kept.append(pair)
        else:
            where = f"{pair['where']}: " if "where" in pair else ""
            skips.bad(problem.reason, problem.path, f"{where}{problem}, {_SKIP_HINT}")
    return kept


def _check_pair(pair: dict, s3_endpoint: str | None) -> _FileError | None:
    """The problem with one pair's files, if any."""
    try:
        size = _image_size(read_file(pair["image_path"], s3_endpoint, "image"), pair["image_path"])
        _load_mask(read_file(pair["mask_path"], s3_endpoint, "mask"), pair["mask_path"], size, pair["image_path"])
    except _FileError as e:
        return e
    return None


@contextmanager
def _reading(path: str, kind: str) -> Iterator[None]:
    """Turn a failure to read `path` (an image or a mask) into a `_FileError` naming it."""
    try:
        yield
    except _FileError:
        raise
    except DataError as e:  # refused by `images.open_image`: another format, too large
        raise _FileError(f"unreadable_{kind}", path, str(e)) from None
    except FileNotFoundError:
        raise _FileError(f"missing_{kind}", path, f"{kind} {path} not found") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        why = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e)) or type(e).__name__
        raise _FileError(f"unreadable_{kind}", path, f"{kind} {path} cannot be decoded ({why}); "
                         "replace it with an intact copy") from None


def _image_size(data: bytes, path: str) -> tuple[int, int]:
    """The image's size, after a quick decode (JPEG at 1/8 scale) that still reads every byte."""
    with _reading(path, "image"), open_image(data, path, what=f"image {path}") as im:
        size = im.size
        im.draft("RGB", (max(1, size[0] // 8), max(1, size[1] // 8)))
        im.load()
    return size


def _load_mask(data: bytes, path: str, image_size: tuple[int, int], image_path: str) -> np.ndarray:
    """The mask as a bool array, checked to be binary and of its image's size (read from its header, before
    it is decoded)."""
    with _reading(path, "mask"), open_image(data, path, what=f"mask {path}") as im:
        if im.size != tuple(image_size):
            raise _FileError("mask_size", path, f"mask {path} is {im.width}x{im.height} but its image "
                             f"{image_path} is {image_size[0]}x{image_size[1]}; use the mask made for this image")
        im.load()
        mask = np.asarray(im if im.mode in ("1", "L") else im.convert("L"))
    if mask.dtype == bool:
        return mask
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)).tolist()
    if not (set(values) <= {0, 255} or set(values) <= {0, 1}):
        shown = ", ".join(map(str, values[:6])) + (", ..." if len(values) > 6 else "")
        raise _FileError("nonbinary_mask", path, f"mask {path} is not binary: it holds {len(values)} values "
                         f"({shown}); masks must hold only 0 and 255 (or 0 and 1), saved as PNG without resampling")
    return mask > 0


def _split_lesions(rows: list[dict], val_fraction: float, test_fraction: float, seed: int) -> dict[str, str]:
    """lesion_id -> split, stratified by class_code (see `training_table`)."""
    by_class: dict[str | None, set[str]] = {}
    for row in rows:
        by_class.setdefault(row["class_code"], set()).add(row["lesion_id"])
    split: dict[str, str] = {}
    for lesions in by_class.values():
        order = sorted(lesions, key=lambda lesion: (_lesion_hash(seed, lesion), lesion))
        n = len(order)
        n_test = min(int(n * test_fraction + 0.5), n - 1)
        n_val = min(int(n * val_fraction + 0.5), n - 1 - n_test)
        for i, lesion in enumerate(order):
            split[lesion] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return split


def _lesion_hash(seed: int, lesion_id: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{lesion_id}".encode(), digest_size=8).digest(), "little")
