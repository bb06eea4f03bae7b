"""The shard format (docs/architecture.md, "Formats"): one shard is three files under an output root.

- ``{shard:05d}.tar``: per accepted sample, in key order, ``{key}.jpg`` (or ``.png``),
  ``{key}.seg.png`` (8-bit L, 0/255), ``{key}.cls`` (class index), ``{key}.txt`` (prompt),
  ``{key}.json`` (the sample's metadata) and, when a QC segmenter judged the pair, ``{key}.ignore.png``
  (8-bit L, 0/255: the pixels a segmenter trained on the pair should leave out of its loss,
  `skindual.qc_model.ignore_maps`).  Written with a fixed mtime, owner and mode, so the same samples
  give the same bytes.
- ``{shard:05d}.parquet``: every sample, rejected ones too (status, reason).
- ``{shard:05d}_stats.json``: counts, checksums, and what storage's listing said of the tar and parquet once
  uploaded; written last, it is the commit marker.

This module holds the samples, their checks and encoding, and the names; `skindual.shard_store` writes them.
"""

from __future__ import annotations

import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import pyarrow as pa
from PIL import Image

from skindual.prompts import MAX_SAMPLES_PER_SHARD

TAR_MTIME = 0  # fixed member mtime, owner and mode: the tar depends only on the samples
TAR_OWNER = "skindual"
TAR_MODE = 0o444
JPEG_QUALITY = 95
SAMPLE_META_FIELDS = ("base_model", "adapter_sha256", "layout", "scheduler", "steps", "guidance")
"""The run settings (keys of `write_shard`'s ``run_info``) copied into every ``{key}.json``."""
OPTIONAL_META_FIELDS = ("controlnet_sha256",)
"""Run settings copied into every ``{key}.json`` when the run has them: the ControlNet that drew the images
(generate --controlnet; its absence keeps the json of runs without one as it was)."""

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
RUN_FILE, SIZES_FILE, MANIFEST_FILE, CARD_FILE = "run.json", "sizes.json", "manifest.json", "README.md"
PREVIEW_FILE = "preview.png"  # a contact sheet of the output's pairs (`skindual.preview`)
SHARD_FILE = re.compile(r"^(\d{5,})(\.tar|\.parquet|_stats\.json)$")
"""A shard file's name: group 1 the shard number, group 2 the kind (``.tar``, ``.parquet``, ``_stats.json``)."""


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
    draws: int = 0  # every draw quality control judged, redraws included (real data: one per row); 0: not recorded
    tar_stamp: str = ""  # what storage's listing said of the tar and parquet once uploaded (`storage.Listed`)
    parquet_stamp: str = ""


LISTING_FIELDS = ("tar_stamp", "parquet_stamp")
"""`ShardStats` fields that record what storage's listing said of the shard's files at commit (S3's ETag, a
folder's mtime): a resume that lists the same ones skips the shard without reading its bytes.  They differ
between two runs of the same settings (a folder's mtimes), so they are not part of what is byte-reproducible."""


def validate_samples(shard: int, samples: Sequence[Sample], image_format: str = "jpg") -> list[Sample]:
    """`samples` in key order, after checking they fit `shard` and the format (a `ValueError`: the caller's bug)."""
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
    validate_samples(int(sample.key) // MAX_SAMPLES_PER_SHARD, [sample])
    height, width = sample.image.shape[:2]
    ignore = {} if sample.ignore is None else {"ignore": None, "ignore_bytes": encode_mask(sample.ignore)}
    return replace(sample, image=None, mask=None, image_bytes=encode_image(sample.image, image_format),
                   mask_bytes=encode_mask(sample.mask), encoded_format=image_format,
                   height=int(height), width=int(width), area=sample.mask_area, **ignore)


def parquet_row(s: Sample) -> dict[str, Any]:
    """The sample's parquet row (also the core of its ``{key}.json``)."""
    height, width = s.size
    return {"key": s.key, "row_id": s.row_id, "class_code": s.class_code, "class_index": s.class_index,
            "prompt": s.prompt, "seed": s.seed, "attempts": s.attempts, "status": s.status,
            "reason": s.reason, "mask_area": s.mask_area, "width": width, "height": height,
            "rejections": list(s.rejections), "consistency": s.consistency, "disagreement": s.disagreement,
            "mode": s.mode, "source_key": s.source_key, "augmentation_seed": s.augmentation_seed}
