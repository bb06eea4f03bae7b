"""Exporters: synthetic shards (optionally merged with the real pairs) as datasets other tools read.

- ``nnunet``: an nnU-Net v2 raw dataset, ``{output}/Dataset{id:03d}_{name}/`` with ``imagesTr/{case}_0000.png``
  (one RGB PNG: nnU-Net's NaturalImage2DIO reads it as three channels, which ``dataset.json`` names
  ``{"0": "R", "1": "G", "2": "B"}``, as nnU-Net's own 2D RGB example Dataset120_RoadSegmentation does),
  ``labelsTr/{case}.png`` (8-bit, 0 background / 1 lesion; 2 where a synthetic pair's ignore map
  ``{key}.ignore.png`` says to leave the pixel out, nnU-Net v2's ``ignore`` label, declared in
  ``dataset.json`` as the highest label when any pair has one; ``--no-ignore-maps``: never) and
  ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``, ``file_ending: ".png"``).  Lossless PNG
  throughout, as nnU-Net requires.
  With ``--with-real``, real pairs of ``--real-splits`` join imagesTr and the real ``test`` split goes
  to ``imagesTs``/``labelsTs``, so a model trained on the export can be scored on held-out real lesions.
- ``imagefolder``: a torchvision ``ImageFolder`` tree ``{output}/{class_code}/{key}.png`` (real pairs:
  ``{image_id}.png``).  ImageFolder numbers the class folders alphabetically, which is the
  project's class order when all seven classes are there (``export.json`` records the mapping).

Case names: synthetic ``syn_{key}``, real ``real_{image_id}``.  Files go through `skindual.storage`
(a folder or s3://), written by a small thread pool; ``export.json`` (counts, sources) is written last.
An output that already holds such a dataset is refused unless ``--overwrite`` (which deletes it first).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Iterator

import numpy as np
from PIL import Image

from skindual import data
from skindual.cli import check_fields, option
from skindual.errors import UserError
from skindual.prompts import CLASS_CODES
from skindual.shard_format import MANIFEST_FILE
from skindual.shard_store import committed_shards, damaged_shards, readable_shards, unfinished_part
from skindual.shards import read_shards
from skindual.storage import Storage, finished, open_storage, output_storage

log = logging.getLogger(__name__)
FORMATS = ("nnunet", "imagefolder")
EXPORT_FILE = "export.json"
NNUNET_CHANNELS = {"0": "R", "1": "G", "2": "B"}
NNUNET_LABELS = {"background": 0, "lesion": 1}
NNUNET_IGNORE = 2  # nnU-Net v2's ignore label must be the highest label


@dataclass
class ExportConfig:
    synthetic: str = option("skindual-synthetic", "shard folder or s3:// prefix written by the generate job")
    output: str = option("skindual-export", "folder or s3://bucket/prefix to write the dataset under")
    format: str = option("nnunet", "dataset layout", choices=list(FORMATS))
    with_real: str = option("", "the prepared real dataset (jobs/prepare.py), a folder or s3:// prefix: merge its "
                                "pairs (see --real-splits)")
    real_splits: str = option("train", "comma-separated splits of --with-real that join the training set")
    dataset_id: int = option(501, "nnU-Net dataset id (1-999)")
    dataset_name: str = option("SkinDualGen", "nnU-Net dataset name (letters, digits, - and _)")
    size: int = option(0, "resize every pair to size x size (real ones centre-cropped first); 0: as stored")
    overwrite: bool = option(False, "delete an existing export at --output first")
    partial: bool = option(False, "export the committed shards of an output whose run has not finished (a run cut "
                                  "short); without it such an output is refused, naming the shards it lacks")
    ignore_maps: bool = option(True, "nnunet: label the pixels of a synthetic pair's ignore map ({key}.ignore.png) "
                                     f"{NNUNET_IGNORE}, nnU-Net v2's ignore label, so its training leaves them out")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not 1 <= self.dataset_id <= 999 or not re.fullmatch(r"[A-Za-z0-9_-]+", self.dataset_name):
            raise UserError(f"--dataset-id {self.dataset_id} / --dataset-name {self.dataset_name!r}: "
                            "need an id 1-999 and a name of letters, digits, - and _")
        if self.size < 0:
            raise UserError(f"--size {self.size}: must be 0 (keep) or positive")
        bad = [s for s in self.splits() if s not in ("train", "val", "test")]
        if bad or not self.splits():
            raise UserError(f"--real-splits {self.real_splits!r}: use train, val and/or test, comma-separated")

    def splits(self) -> list[str]:
        return [s.strip() for s in self.real_splits.split(",") if s.strip()]

    def dataset_folder(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.dataset_name}"


def png_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def _resize(image: np.ndarray, mask: np.ndarray, ignore: np.ndarray, size: int) -> tuple[np.ndarray, ...]:
    if not size:
        return image, mask, ignore
    if image.shape[0] != image.shape[1]:
        raise UserError(f"--size needs square synthetic pairs, got {image.shape[1]}x{image.shape[0]}")
    return (*data.resize_pair(image, mask, size), data.resize_ignore(ignore, size))


Pair = tuple[str, int, np.ndarray, np.ndarray, str]  # (case name, class index or -1, image, labels, part)


def iter_pairs(cfg: ExportConfig) -> Iterator[Pair]:
    """Synthetic pairs, then (with --with-real) the real ones; ``part`` is "train" or "test".  The labels are the
    mask's 0/1, and `NNUNET_IGNORE` where a synthetic pair's ignore map is set (``--ignore-maps``)."""
    for sample in read_shards(cfg.synthetic, cfg.s3_endpoint or None, partial=cfg.partial):
        image, mask, ignore = _resize(sample["image"], sample["mask"], sample["ignore"], cfg.size)
        labels = np.where(ignore > 0, NNUNET_IGNORE, mask).astype(np.uint8) if cfg.ignore_maps else mask
        yield f"syn_{sample['key']}", int(sample["class_index"]), image, labels, "train"
    if not cfg.with_real:
        return
    for sample in read_shards(cfg.with_real, cfg.s3_endpoint or None, partial=cfg.partial):
        split = sample["meta"].get("split")
        part = "train" if split in cfg.splits() else "test" if split == "test" else None
        if part is None:
            continue
        image, mask = sample["image"], sample["mask"]
        if cfg.size:
            image, mask = data.resize_pair(image, mask, cfg.size)
        yield f"real_{sample['meta']['image_id']}", int(sample["class_index"]), image, mask, part


def _ours(storage: Storage, cfg: ExportConfig) -> list[str]:
    """The files of an earlier export at the output."""
    if cfg.format == "nnunet":
        ours = storage.list(cfg.dataset_folder() + "/")
    else:
        ours = [n for n in storage.list() if "/" in n and n.split("/")[0] in CLASS_CODES]
    return ours + ([EXPORT_FILE] if storage.exists(EXPORT_FILE) else [])


@dataclass(frozen=True)
class ExportPlan:
    """An export, checked before it writes: the output, the fingerprint of its settings and inputs (the
    datasets' manifests), and whether the output already holds it (its export.json)."""

    config: ExportConfig
    storage: Storage
    fingerprint: str
    done: dict | None


def plan_export(cfg: ExportConfig) -> ExportPlan:
    """Check the output (an earlier export of other settings or inputs is refused unless --overwrite)."""
    inputs = {}
    for flag, url in (("synthetic", cfg.synthetic), ("with_real", cfg.with_real)):
        if url:  # checked before anything is written: every shard whole (its sha256) and all committed
            source = open_storage(url, cfg.s3_endpoint or None)
            if not committed_shards(source):
                raise UserError(f"--{flag.replace('_', '-')} {url}: no committed shards (with a _stats.json) there; "
                                "give a dataset written by jobs/prepare.py or jobs/generate.py")
            readable_shards(source, f"--{flag.replace('_', '-')}", cfg.partial)
            damaged = damaged_shards(source, verify=True)
            if damaged:
                shard, why = next(iter(damaged.items()))
                raise UserError(f"--{flag.replace('_', '-')} {url}: shard {shard:05d} does not match its _stats.json "
                                f"({why}); run the job that wrote it again")
            try:
                inputs[flag] = json.loads(open_storage(url, cfg.s3_endpoint or None).read_bytes(MANIFEST_FILE)).get(
                    "fingerprint", "")
            except FileNotFoundError:
                inputs[flag] = ""
            part = unfinished_part(source) if cfg.partial else None
            if part is not None:  # the committed part of an unfinished output: not the export of the whole one
                inputs[f"{flag}_shards"] = part
    storage = output_storage(cfg.output, cfg.s3_endpoint or None)
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("output", "overwrite", "s3_endpoint")} | inputs
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    done = None if cfg.overwrite else finished(storage, EXPORT_FILE, fingerprint)
    if done is None and not cfg.overwrite and _ours(storage, cfg):
        raise UserError(f"{storage.url} already holds an export ({len(_ours(storage, cfg))} files); "
                        "pass --overwrite to replace it, or choose another --output")
    return ExportPlan(cfg, storage, fingerprint, done)


def run_export(plan: ExportPlan) -> dict:
    """Write the dataset (an earlier export at the output deleted first); returns the summary, also written to
    ``export.json`` last."""
    cfg, storage = plan.config, plan.storage
    for name in _ours(storage, cfg):
        storage.delete(name)
    root = cfg.dataset_folder() + "/" if cfg.format == "nnunet" else ""
    counts: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    ignored = 0  # pairs with an ignored pixel
    with ThreadPoolExecutor(8) as pool:
        pending = []
        for case, label, image, mask, part in iter_pairs(cfg):
            source = "synthetic" if case.startswith("syn_") else "real"
            if cfg.format == "nnunet":
                images, labels = ("imagesTr", "labelsTr") if part == "train" else ("imagesTs", "labelsTs")
                files = {f"{root}{images}/{case}_0000.png": image, f"{root}{labels}/{case}.png": mask.astype(np.uint8)}
                ignored += bool((mask == NNUNET_IGNORE).any())
            elif part == "train" and label >= 0:  # ImageFolder: classed training pairs only
                files = {f"{CLASS_CODES[label]}/{case.split('_', 1)[1]}.png": image}
            else:
                continue
            counts[f"{source}_{part}"] += 1
            if part == "train":
                per_class[CLASS_CODES[label] if label >= 0 else "unclassed"] += 1
            pending += [pool.submit(lambda n=n, a=a: storage.write_bytes(n, png_bytes(a))) for n, a in files.items()]
            if len(pending) > 256:
                for f in pending:
                    f.result()
                pending = []
        for f in pending:
            f.result()
    trained = counts["synthetic_train"] + counts["real_train"]
    if not trained:
        raise UserError(f"{cfg.synthetic}: nothing to export")
    summary = {"config": asdict(cfg), "format": cfg.format, "counts": dict(counts), "train_per_class": dict(per_class),
               "pairs_with_ignored_pixels": ignored, "fingerprint": plan.fingerprint}
    if cfg.format == "nnunet":
        labels = NNUNET_LABELS | ({"ignore": NNUNET_IGNORE} if ignored else {})
        dataset = {"channel_names": NNUNET_CHANNELS, "labels": labels, "numTraining": trained,
                   "file_ending": ".png", "overwrite_image_reader_writer": "NaturalImage2DIO",
                   "name": cfg.dataset_name, "description": "SkinDualGen synthetic lesion image/mask pairs"
                   + (" merged with real pairs" if cfg.with_real else "")}
        storage.write_bytes(f"{root}dataset.json", (json.dumps(dataset, indent=1) + "\n").encode())
        summary["dataset"] = storage.join(cfg.dataset_folder())
    else:
        classes = sorted(c for c in per_class if c != "unclassed")
        summary["class_to_idx"] = {c: i for i, c in enumerate(classes)}  # what ImageFolder will number them
    storage.write_bytes(EXPORT_FILE, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    log.info("exported %s to %s", dict(counts), storage.url)
    return summary
