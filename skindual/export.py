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
- ``msd``: a Medical Segmentation Decathlon-style dataset, ``{output}/Task{id:03d}_{name}/`` with
  ``imagesTr/{case}.png`` (RGB), ``labelsTr/{case}.png`` (8-bit, 0 background / 1 lesion) and, when the synthetic
  pairs carry ignore maps (``--ignore-maps``), ``ignoreTr/{case}.png`` (8-bit, 1: leave the pixel out of the
  loss; all 0 for a pair without a map, so that every item has the same keys); ``dataset.json`` lists them
  under ``training`` as ``{"image", "label", "ignore", "class"}`` (paths relative to it), which MONAI's
  ``load_decathlon_datalist`` and ``LoadImaged`` read.  With ``--with-real``, the real test split goes to
  ``imagesTs``/``labelsTs``, listed under ``test`` with its labels.
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
from skindual.errors import DataError, UserError
from skindual.pairs import read_index
from skindual.prompts import CLASS_CODES
from skindual.shard_format import MANIFEST_FILE
from skindual.shard_reader import check_shard
from skindual.shard_store import committed_shards, readable_shards, unfinished_part
from skindual.shards import read_shards
from skindual.storage import Storage, finished, open_storage, output_storage

log = logging.getLogger(__name__)
FORMATS = ("nnunet", "msd", "imagefolder")
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
    dataset_id: int = option(501, "nnU-Net / Decathlon dataset id (1-999)")
    dataset_name: str = option("SkinDualGen", "nnU-Net / Decathlon dataset name (letters, digits, - and _)")
    size: int = option(0, "resize every pair to size x size (real ones centre-cropped first); 0: as stored")
    overwrite: bool = option(False, "delete an existing export at --output first")
    partial: bool = option(False, "export the committed shards of an output whose run has not finished (a run cut "
                                  "short); without it such an output is refused, naming the shards it lacks")
    ignore_maps: bool = option(True, "nnunet: label the pixels of a synthetic pair's ignore map ({key}.ignore.png) "
                                     f"{NNUNET_IGNORE}, nnU-Net v2's ignore label, so its training leaves them out; "
                                     "msd: write the maps as each item's 'ignore' key (ignoreTr/)")
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
        prefix = "Task" if self.format == "msd" else "Dataset"
        return f"{prefix}{self.dataset_id:03d}_{self.dataset_name}"


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


Pair = tuple[str, int, np.ndarray, np.ndarray, np.ndarray, str]  # (case, class index or -1, image, mask, ignore, part)


def iter_pairs(cfg: ExportConfig) -> Iterator[Pair]:
    """Synthetic pairs, then (with --with-real) the real ones; ``part`` is "train" or "test".  Mask and ignore map
    are 0/1 (a pair without an ignore map, and every real pair: all 0)."""
    for sample in read_shards(cfg.synthetic, cfg.s3_endpoint or None, partial=cfg.partial):
        image, mask, ignore = _resize(sample["image"], sample["mask"], sample["ignore"], cfg.size)
        yield f"syn_{sample['key']}", int(sample["class_index"]), image, mask, ignore, "train"
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
        yield f"real_{sample['meta']['image_id']}", int(sample["class_index"]), image, mask, np.zeros_like(mask), part


def _ours(storage: Storage, cfg: ExportConfig) -> list[str]:
    """The files of an earlier export at the output."""
    if cfg.format in ("nnunet", "msd"):
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
        if url:  # checked before anything is written: every shard committed, whole (its sha256) and well formed
            source = open_storage(url, cfg.s3_endpoint or None)
            if not committed_shards(source):
                raise UserError(f"--{flag.replace('_', '-')} {url}: no committed shards (with a _stats.json) there; "
                                "give a dataset written by jobs/prepare.py or jobs/generate.py")
            shards = readable_shards(source, f"--{flag.replace('_', '-')}", cfg.partial)
            with ThreadPoolExecutor(8) as pool:  # every shard verified as the reader will: sha256 and members
                try:
                    list(pool.map(lambda shard: check_shard(source, shard), shards))
                except DataError as err:
                    raise DataError(f"--{flag.replace('_', '-')} {err}") from None
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


def _has_ignore_maps(cfg: ExportConfig) -> bool:
    """msd: whether the items get an ``ignore`` key, that is --ignore-maps and a synthetic pair with an ignore map
    (its index records the map's share of the pixels)."""
    if not cfg.ignore_maps:
        return False
    index = read_index(cfg.synthetic, cfg.s3_endpoint or None, "--synthetic", cfg.partial)
    return "disagreement" in index.column_names and index.column("disagreement").null_count < index.num_rows


def _pair_files(cfg: ExportConfig, root: str, pair: Pair, with_ignore: bool) -> tuple[dict[str, np.ndarray], dict]:
    """The files one pair becomes in the export (name → array to write as PNG), and its msd datalist item."""
    case, label, image, mask, ignore, part = pair
    if cfg.format == "nnunet":
        labels = np.where(ignore > 0, NNUNET_IGNORE, mask).astype(np.uint8) if cfg.ignore_maps else mask
        images, masks = ("imagesTr", "labelsTr") if part == "train" else ("imagesTs", "labelsTs")
        return {f"{root}{images}/{case}_0000.png": image, f"{root}{masks}/{case}.png": labels.astype(np.uint8)}, {}
    if cfg.format == "msd":
        tr = "Tr" if part == "train" else "Ts"
        item = {"image": f"./images{tr}/{case}.png", "label": f"./labels{tr}/{case}.png"}
        if with_ignore and part == "train":
            item["ignore"] = f"./ignoreTr/{case}.png"
        files = {root + item[k][2:]: a.astype(np.uint8) if k != "image" else a
                 for k, a in (("image", image), ("label", mask), ("ignore", ignore)) if k in item}
        return files, item | {"class": label}
    if part == "train" and label >= 0:  # ImageFolder: classed training pairs only
        return {f"{CLASS_CODES[label]}/{case.split('_', 1)[1]}.png": image}, {}
    return {}, {}


def _msd_dataset(cfg: ExportConfig, datalist: dict[str, list[dict]]) -> dict:
    """The Decathlon ``dataset.json`` of an msd export (its licence: the synthetic output's, from its manifest)."""
    try:
        manifest = json.loads(open_storage(cfg.synthetic, cfg.s3_endpoint or None).read_bytes(MANIFEST_FILE))
    except FileNotFoundError:
        manifest = {}
    return {"name": cfg.dataset_name, "description": "SkinDualGen synthetic lesion image/mask pairs"
            + (" merged with real pairs" if cfg.with_real else ""), "reference": "skindual",
            "licence": manifest.get("config", {}).get("license") or "unknown", "tensorImageSize": "2D",
            "modality": NNUNET_CHANNELS, "labels": {"0": "background", "1": "lesion"},
            "numTraining": len(datalist["training"]), "numTest": len(datalist["test"]), **datalist}


def run_export(plan: ExportPlan) -> dict:
    """Write the dataset (an earlier export at the output deleted first); returns the summary, also written to
    ``export.json`` last."""
    cfg, storage = plan.config, plan.storage
    for name in _ours(storage, cfg):
        storage.delete(name)
    root = cfg.dataset_folder() + "/" if cfg.format in ("nnunet", "msd") else ""
    with_ignore = cfg.format == "msd" and _has_ignore_maps(cfg)
    counts: Counter[str] = Counter()
    per_class: Counter[str] = Counter()
    datalist: dict[str, list[dict]] = {"training": [], "test": []}
    ignored = 0  # pairs with an ignored pixel
    with ThreadPoolExecutor(8) as pool:
        pending = []
        for pair in iter_pairs(cfg):
            case, label, _, _, ignore, part = pair
            files, item = _pair_files(cfg, root, pair, with_ignore)
            if not files:
                continue
            source = "synthetic" if case.startswith("syn_") else "real"
            counts[f"{source}_{part}"] += 1
            ignored += bool(cfg.ignore_maps and cfg.format != "imagefolder" and ignore.any())
            if item:
                datalist["training" if part == "train" else "test"].append(item)
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
    elif cfg.format == "msd":
        dataset = _msd_dataset(cfg, datalist)
    else:
        classes = sorted(c for c in per_class if c != "unclassed")
        summary["class_to_idx"] = {c: i for i, c in enumerate(classes)}  # what ImageFolder will number them
    if cfg.format != "imagefolder":
        storage.write_bytes(f"{root}dataset.json", (json.dumps(dataset, indent=1) + "\n").encode())
        summary["dataset"] = storage.join(cfg.dataset_folder())
    storage.write_bytes(EXPORT_FILE, (json.dumps(summary, indent=1, sort_keys=True) + "\n").encode())
    log.info("exported %s to %s", dict(counts), storage.url)
    return summary
