"""A dataset's preview: a contact sheet of its pairs, a row per class, each image with its mask's outline
drawn on it and its ignore map tinted where it has one (`report.contact_sheet`), from any dataset the
jobs write (real or synthetic, a folder or s3://).

`run_preview` is ``jobs/preview.py``: any dataset to any PNG.  `write_preview` puts ``preview.png`` into
a dataset's own root: generation with its first committed shard and, when that shard lacks classes or
pairs, again from all its shards at the end; preparation once its shards are written.  A preview never
fails the run that draws it: a failure there is a warning.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping
from dataclasses import dataclass

import pyarrow as pa

from skindual import pairs, report
from skindual.cli import check_fields, option
from skindual.errors import UserError
from skindual.prompts import CLASS_CODES
from skindual.shard_format import PREVIEW_FILE
from skindual.shard_store import committed_shards
from skindual.storage import Storage, open_storage

log = logging.getLogger(__name__)

PER_CLASS = 6
"""Pairs per class (a row) on a preview."""
CELL = 128
"""Side in pixels of each pair's picture on a preview."""


@dataclass(frozen=True)
class PreviewConfig:
    data: str = option("", "the dataset to draw: the output of jobs/prepare.py or jobs/generate.py, a folder or "
                           "s3:// prefix")
    output: str = option("preview.png", "the PNG to write: a path or an s3:// URL")
    per_class: int = option(PER_CLASS, "pairs per class (a row each, the first of each class in key order)")
    cell: int = option(CELL, "side in pixels of each pair's picture")
    partial: bool = option(False, "draw from the committed shards of a dataset whose sizes.json names more (a run cut "
                                  "short); without it such a dataset is refused, naming the shards it lacks")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("per_class",))
        if not self.data:
            raise UserError("--data is missing: give the dataset to draw (a folder or s3:// prefix written by "
                            "jobs/prepare.py or jobs/generate.py)")
        if self.cell < 32:
            raise UserError(f"--cell {self.cell}: must be at least 32 (pixels)")
        if not self.output.lower().endswith(".png"):
            raise UserError(f"--output {self.output}: the sheet is a PNG; give a name ending in .png")


@dataclass(frozen=True)
class Preview:
    """A drawn preview: the sheet, its rows (the label and the keys of its pairs, in order) and each pair's image
    box on the sheet (per row, per pair)."""

    image: object  # PIL.Image.Image
    rows: tuple[tuple[str, tuple[str, ...]], ...]
    boxes: tuple[tuple[report.Box, ...], ...]

    def png(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG", optimize=True)
        return buffer.getvalue()

    def covers(self, asked: Mapping[str, int], per_class: int = PER_CLASS) -> bool:
        """Whether every class of `asked` (class code → pairs) has its full row: ``min(per_class, asked)`` pairs."""
        shown = {label: len(keys) for label, keys in self.rows}
        return all(shown.get(code, 0) >= min(per_class, n) for code, n in asked.items() if n)


def row_label(class_index: int) -> str:
    """A row's label: the class code, or ``unclassed`` (ISIC 2018's pairs have no class)."""
    return CLASS_CODES[class_index] if 0 <= class_index < len(CLASS_CODES) else "unclassed"


def chosen_keys(index: pa.Table, per_class: int) -> dict[int, list[str]]:
    """Class index → the keys of its first `per_class` usable pairs in key order (status ``ok``), classes in
    their order and the unclassed last."""
    rows = pairs.usable_rows(index).sort_by("key")
    chosen: dict[int, list[str]] = {}
    for key, class_index in zip(rows.column("key").to_pylist(), rows.column("class_index").to_pylist()):
        keys = chosen.setdefault(int(class_index), [])
        if len(keys) < per_class:
            keys.append(key)
    return dict(sorted(chosen.items(), key=lambda item: (item[0] < 0, item[0])))


def draw_preview(storage: Storage, index: pa.Table, per_class: int = PER_CLASS, cell: int = CELL) -> Preview:
    """The preview of the dataset in `storage` from its `index` (`pairs.read_index`, or some of its shards'
    rows): the chosen pairs (`chosen_keys`) read from their shards (only those shards are streamed)."""
    chosen = chosen_keys(index, per_class)
    if not chosen:
        raise UserError(f"{storage.url}: no usable pairs to draw (every pair there was rejected)")
    shard_of = dict(zip(index.column("key").to_pylist(), index.column("shard").to_pylist()))
    selection: dict[int, set[str]] = {}
    for keys in chosen.values():
        for key in keys:
            selection.setdefault(int(shard_of[key]), set()).add(key)
    pictures, ignored = {}, False
    for shard in sorted(selection):
        for sample in pairs.iter_shard(storage, shard, selection[shard]):
            pair = pairs.decode_sample(sample)
            ignored |= bool(pair["ignore"].any())
            pictures[pair["key"]] = report.sheet_panel(pair["image"], pair["mask"], cell, pair["ignore"])
    rows = [(row_label(c), [k for k in keys if k in pictures]) for c, keys in chosen.items()]
    title = "green: each pair's mask outline" + ("; magenta: its ignore map" if ignored else "")
    sheet, boxes = report.contact_sheet([(label, [[pictures[k]] for k in keys]) for label, keys in rows], title)
    return Preview(sheet, tuple((label, tuple(keys)) for label, keys in rows),
                   tuple(tuple(group[0] for group in row) for row in boxes))


def shards_index(storage: Storage, shards: list[int] | None = None) -> pa.Table:
    """The parquet rows of `shards` (default: every committed shard) of the dataset in `storage`, with a
    ``shard`` column, as `pairs.read_index` gives them (`pairs.shard_rows`: each parquet checked by its sha256;
    the shards' tars are checked as they stream)."""
    shards = committed_shards(storage) if shards is None else shards
    return pa.concat_tables([pairs.shard_rows(storage, shard) for shard in shards], promote_options="default")


def write_preview(storage: Storage, shards: list[int] | None = None, index: pa.Table | None = None,
                  per_class: int = PER_CLASS) -> Preview | None:
    """Draw the preview of the dataset in `storage` (from its `index`, else from `shards`' rows, else from every
    committed shard's) into its root as ``preview.png``.  Never raises: a preview is not worth a run, so a
    failure is logged as a warning and gives None."""
    try:
        preview = draw_preview(storage, index if index is not None else shards_index(storage, shards), per_class)
        storage.write_bytes(PREVIEW_FILE, preview.png())
    except Exception as exc:  # noqa: BLE001 - a preview never fails the run that draws it
        log.warning("%s not written to %s: %s", PREVIEW_FILE, storage.url, exc)
        return None
    log.info("%s written (%s)", storage.join(PREVIEW_FILE),
             ", ".join(f"{label} {len(keys)}" for label, keys in preview.rows))
    return preview


def run_preview(cfg: PreviewConfig) -> Preview:
    """Draw the preview of ``--data`` and write it to ``--output`` (a path or an s3:// URL)."""
    endpoint = cfg.s3_endpoint or None
    index = pairs.read_index(cfg.data, endpoint, "--data", cfg.partial)
    if "status" not in index.column_names:
        raise UserError(f"--data {cfg.data}: not a dataset of this tool (its parquets have no status column)")
    preview = draw_preview(open_storage(cfg.data, endpoint), index, cfg.per_class, cfg.cell)
    parent, _, name = cfg.output.rpartition("/")
    open_storage(parent or ".", endpoint).write_bytes(name, preview.png())
    return preview

