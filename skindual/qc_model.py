"""The consistency-QC segmenter: a small U-Net trained on the prepared real pairs, that generation uses to
check that each generated mask matches its image.

`plan_qc_model(config)` reads the training data's index and knows whether ``--output`` already holds the
segmenter of these settings; `run_qc_model(plan)` trains `downstream.SmallUNet` with Ray Train (one worker, CPU or GPU) on the
usable pairs of the real dataset's train split (ISIC 2018's unclassed pairs too: masks are what it
learns), read from storage by Ray Data at ``--size``, and writes ``segmenter.safetensors`` and
``segmenter.json`` (its settings, the training data, its Dice on the val split, the weights' sha256;
written last) to ``--output``, a folder or s3:// prefix.

`QCSegmenter.load(url)` reads it back (the sha256 checked) and `score(images, masks)` gives, per pair,
the Dice between the mask and the segmenter's mask of the image (at the image's size): generation's
``--qc-segmenter URL --min-consistency D`` redraws a pair that scores below D.  `judge(images, masks)`
adds, per pair, its ignore map (`ignore_maps`): the pixels where the segmenter confidently contradicts
the mask, and a thin band around them, which a downstream segmenter leaves out of its loss.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
import torch.nn.functional as F
from scipy import ndimage
from scipy.special import expit

from skindual import data, downstream, pairs
from skindual.cli import check_fields, check_interrupt, option, worker_setup
from skindual.cluster import ClusterShape, check_shared_paths
from skindual.errors import UserError
from skindual.quality import images_to_tensor
from skindual.shard_store import unfinished_part
from skindual.storage import file_sha256, finished, open_storage, output_storage

log = logging.getLogger(__name__)

WEIGHTS, CARD = "segmenter.safetensors", "segmenter.json"
FORMAT = "skindual-qc-segmenter/1"
IGNORE_CONFIDENCE = 0.9
"""An ignore map's pixels: where the segmenter gives the label the mask does not have a probability of at
least this (lesion ≥ 0.9 outside the mask, background ≥ 0.9 inside it) ..."""
IGNORE_BAND = 1 / 64
"""... and every pixel within this share of the image's side of one (at least one pixel: 8 px at 512², 1 at 64²):
the segmenter's own edge is uncertain by about that much."""


@dataclass(frozen=True)
class QCModelConfig:
    training_data: str = option("", "the prepared real dataset (jobs/prepare.py): a folder or s3:// prefix; empty "
                                    "(jobs/qc_model.py): the demo world's")
    partial: bool = option(False, "use the committed shards of a --training-data whose prepare run has not finished "
                                  "(the segmenter's fingerprint names them); without it such a dataset is refused")
    output: str = option("skindual-qc", "where the segmenter goes: a folder or s3://bucket/prefix")
    size: int = option(64, "the segmenter's input side (images and masks are resized to it)")
    width: int = option(16, "channels of the U-Net's first level")
    steps: int = option(600, "optimiser steps")
    batch_size: int = option(32, "pairs per step")
    lr: float = option(1e-3, "learning rate (AdamW, cosine decay)")
    real_fraction: float = option(1.0, "train on a seeded share of each class of the train split (the low-data "
                                       "regime: the same cut as the fine-tuning run's)")
    use_gpu: bool = option(False, "train on a GPU")
    cpus_per_worker: float = option(1.0, "CPUs of the training worker (its torch threads on CPU)")
    seed: int = option(0, "seed of the initialisation, the batches and the real-fraction cut")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("size", "width", "steps", "batch_size"))
        if self.size < 16 or self.size % 8:
            raise UserError(f"--size {self.size}: must be a multiple of 8, at least 16")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")


def _split_rows(training_data: str, split: str, s3_endpoint: str | None, partial: bool = False):
    index = pairs.read_index(training_data, s3_endpoint, "--training-data", partial)
    if "split" not in index.column_names:
        raise UserError(f"--training-data {training_data}: not a prepared real dataset (no split column); run "
                        "jobs/prepare.py on the real data")
    ok = pairs.usable_rows(index)
    return ok.filter(pc.equal(ok.column("split"), split))


def _loop(config: dict) -> None:
    """The Ray Train worker: train, score the val split, write the segmenter."""
    import ray.train
    import ray.train.torch

    worker_setup()
    plan: QCPlan = config["plan"]
    cfg = plan.config
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    torch.manual_seed(cfg.seed)
    shard = ray.train.get_dataset_shard("train")

    def batches():
        epoch = 0
        while True:
            for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                            local_shuffle_buffer_size=4 * cfg.batch_size,
                                            local_shuffle_seed=cfg.seed + epoch):
                yield batch["image"], batch["mask"], batch["class_index"]
            epoch += 1

    settings = downstream.BenchmarkSettings(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr)
    model = downstream.train_model(downstream.SmallUNet(cfg.width), batches(), "segmenter", settings, cfg.seed, device)
    val = plan.val
    figures = {"val_pairs": 0, "val_dice": None}
    if val:
        loaded = pairs.load_pairs(cfg.training_data, val, cfg.size, cfg.s3_endpoint or None)
        test = downstream.PairSet.of(loaded)
        figures = {"val_pairs": len(test), "val_dice": downstream.test_model(model, test, "segmenter", [], device)["dice"]}
    write_segmenter(cfg, model.cpu(), figures | {"train_pairs": plan.train_pairs, "fingerprint": plan.fingerprint})
    ray.train.report(figures)


def write_segmenter(cfg: QCModelConfig, model: torch.nn.Module, figures: dict) -> None:
    """`WEIGHTS`, then `CARD` (the weights' sha256 in it) under ``cfg.output``."""
    from safetensors.torch import save_file

    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        card = {"format": FORMAT, "size": cfg.size, "width": cfg.width, "depth": 3, "config": asdict(cfg),
                "sha256": file_sha256(path), **figures}
        storage.delete(CARD)
        storage.upload_file(path, WEIGHTS)
        storage.write_bytes(CARD, (json.dumps(card, indent=1, sort_keys=True) + "\n").encode())
    log.info("QC segmenter written to %s (val Dice %s)", storage.join(CARD), figures.get("val_dice"))


# settings that do not change what is trained (--partial enters through the shards it reads, `qc_fingerprint`)
REUSE_IGNORES = ("use_gpu", "cpus_per_worker", "s3_endpoint", "partial")


@dataclass(frozen=True)
class QCPlan:
    """A QC segmenter's training, resolved before any cluster work: its train and val pairs, the fingerprint of
    the settings that shape it, and whether ``--output`` already holds it (its card)."""

    config: QCModelConfig
    train: dict[int, dict[str, int]]  # shard → {key: count} of the train pairs
    val: dict[int, dict[str, int]]
    train_pairs: int
    fingerprint: str
    done: dict | None


def qc_fingerprint(cfg: QCModelConfig, data_shards: list[int] | None = None, data_fingerprint: str = "") -> str:
    """sha256 of the settings that change what is trained (not `REUSE_IGNORES`), of the training data's own
    fingerprint (its manifest's: another dataset prepared at the same URL is other data), and of the shards read
    when ``--partial`` reads the committed part of an unfinished dataset (`data_shards`): the segmenter of the
    finished dataset is not taken for that one's."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in REUSE_IGNORES}
    if data_fingerprint:
        settings["training_data_fingerprint"] = data_fingerprint
    if data_shards is not None:
        settings["training_data_shards"] = data_shards
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def plan_qc_model(cfg: QCModelConfig) -> QCPlan:
    """Read the training data's index and check it and the output (every problem one `UserError`)."""
    endpoint = cfg.s3_endpoint or None
    data_shards = unfinished_part(open_storage(cfg.training_data, endpoint)) if cfg.partial else None
    data_fingerprint = pairs.dataset_manifest(cfg.training_data, endpoint).get("fingerprint", "")
    fingerprint = qc_fingerprint(cfg, data_shards, data_fingerprint)
    done = finished(open_storage(cfg.output, endpoint), CARD, fingerprint)
    if done is not None:
        log.info("QC segmenter at %s already trained with these settings (val Dice %s): reusing it", cfg.output,
                 done.get("val_dice"))
        return QCPlan(cfg, {}, {}, done.get("train_pairs", 0), fingerprint, done)
    train = data.fraction_per_class(_split_rows(cfg.training_data, "train", endpoint, cfg.partial), cfg.real_fraction,
                                    cfg.seed)
    if not train.num_rows:
        raise UserError(f"--training-data {cfg.training_data} has no usable pairs in its train split")
    val = _split_rows(cfg.training_data, "val", endpoint, cfg.partial)
    output_storage(cfg.output, endpoint)
    return QCPlan(cfg, pairs.selection_of(train), pairs.selection_of(val), train.num_rows, fingerprint, None)


def run_qc_model(plan: QCPlan, shape: ClusterShape | None = None) -> dict:
    """Train the QC segmenter on the current Ray cluster (`shape`: what it has and can launch, read from it
    when not given); returns its card (``segmenter.json``, written last)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from skindual.cluster import cluster_shape

    cfg = plan.config
    shape = shape or cluster_shape()
    check_shared_paths({"--output": cfg.output, "--training-data": cfg.training_data}, shape)
    if cfg.use_gpu and shape.most("GPU") < 1 and shape.autoscaler != "unknown":
        raise UserError("--use-gpu: no node of this cluster has or can launch a GPU; train on a CPU without it")
    endpoint = cfg.s3_endpoint or None
    dataset = pairs.pair_dataset(cfg.training_data, plan.train, cfg.size, cfg.seed, endpoint)
    check_interrupt()  # a Ctrl-C that Ray's setup calls swallowed stops the run before it trains
    with tempfile.TemporaryDirectory(prefix="skindual-qc-") as runs:
        TorchTrainer(_loop, train_loop_config={"plan": plan},
                     scaling_config=ScalingConfig(num_workers=1, use_gpu=cfg.use_gpu,
                                                  resources_per_worker={"CPU": cfg.cpus_per_worker}),
                     datasets={"train": dataset}, run_config=RunConfig(name="qc", storage_path=runs)).fit()
    return json.loads(open_storage(cfg.output, endpoint).read_bytes(CARD))


class QCSegmenter:
    """A trained QC segmenter: `score` gives each generated pair's image–mask Dice."""

    def __init__(self, model: torch.nn.Module, size: int, sha256: str, device: str = "cpu"):
        self.model, self.size, self.sha256 = model.to(device).eval(), size, sha256
        self.device = torch.device(device)

    @classmethod
    def load(cls, url: str, s3_endpoint: str | None = None, device: str = "cpu",
             flag: str = "--qc-segmenter") -> QCSegmenter:
        """Read ``segmenter.json`` and ``segmenter.safetensors`` from `url` (folder or s3://), checking
        the weights' sha256; one clear `UserError` naming `flag` when it is not a segmenter of this tool."""
        from safetensors.torch import load_file

        storage = open_storage(url, s3_endpoint)
        redo = "give the output folder of jobs/qc_model.py, or train it again"
        try:
            card = json.loads(storage.read_bytes(CARD))
        except FileNotFoundError:
            raise UserError(f"{flag} {url}: no {CARD} there; {redo}") from None
        if card.get("format") != FORMAT:
            raise UserError(f"{flag} {url}: {CARD} is not a skindual QC segmenter; {redo}")
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / WEIGHTS
            try:
                path.write_bytes(storage.read_bytes(WEIGHTS))
            except FileNotFoundError:
                raise UserError(f"{flag} {url}: {WEIGHTS} is missing; {redo}") from None
            if file_sha256(path) != card["sha256"]:
                raise UserError(f"{flag} {url}: {WEIGHTS} does not match the sha256 in {CARD}; {redo}")
            model = downstream.SmallUNet(card["width"], card["depth"])
            model.load_state_dict(load_file(str(path)))
        return cls(model, card["size"], card["sha256"], device)

    @torch.no_grad()
    def logits(self, images: np.ndarray) -> np.ndarray:
        """The segmenter's lesion logits (float32 N×H×W) of uint8 N×H×W×3 images, at the images' size."""
        x = images_to_tensor(images, self.device)
        side = x.shape[-2:]
        if tuple(side) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        logits = self.model(x)
        if tuple(side) != (self.size, self.size):
            logits = F.interpolate(logits, size=tuple(side), mode="bilinear", align_corners=False)
        return logits[:, 0].float().cpu().numpy()

    def masks(self, images: np.ndarray) -> np.ndarray:
        """The segmenter's 0/1 masks of uint8 N×H×W×3 images, at the images' size."""
        return (self.logits(images) > 0).astype(np.uint8)

    def score(self, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
        """Per pair, Dice between its mask and the segmenter's mask of its image (1 when both are empty)."""
        return _dice(self.logits(images) > 0, masks)

    def judge(self, images: np.ndarray, masks: np.ndarray) -> Judgement:
        """Per pair, its consistency (`score`), its ignore map (`ignore_maps`) and that map's share of the pixels."""
        logits = self.logits(images)
        ignore = ignore_maps(expit(logits), masks)
        return Judgement(_dice(logits > 0, masks), ignore,
                         ignore.reshape(len(ignore), -1).mean(1) if len(ignore) else np.zeros(0))


def _dice(predicted: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per pair, Dice between two stacks of 0/1 masks (1 when both are empty)."""
    p = np.asarray(predicted).astype(bool).reshape(len(masks), -1)
    m = np.asarray(masks).astype(bool).reshape(len(masks), -1)
    total = p.sum(1) + m.sum(1)
    return np.where(total > 0, 2 * (p & m).sum(1) / np.maximum(total, 1), 1.0)


@dataclass(frozen=True)
class Judgement:
    """What the QC segmenter says of a batch of pairs."""

    consistency: np.ndarray  # N: Dice between each mask and the segmenter's mask of its image
    ignore: np.ndarray  # uint8 N×H×W, 0/1: `ignore_maps`
    disagreement: np.ndarray  # N: each ignore map's share of its pixels


def ignore_maps(probabilities: np.ndarray, masks: np.ndarray, confidence: float = IGNORE_CONFIDENCE,
                band: float = IGNORE_BAND) -> np.ndarray:
    """0/1 maps (uint8 N×H×W) of the pixels a segmenter trained on generated pairs should not learn from: where
    the QC segmenter's lesion probability confidently contradicts the mask (≥ `confidence` outside it, ≤
    1 − `confidence` inside it), and every pixel within ``band × side`` (at least 1 px) of one of those."""
    masks = np.asarray(masks).astype(bool)
    contradicted = np.where(masks, probabilities <= 1 - confidence, probabilities >= confidence)
    out = np.zeros(masks.shape, np.uint8)
    for i, wrong in enumerate(contradicted):
        if wrong.any():
            radius = max(1.0, band * min(wrong.shape))
            out[i] = ndimage.distance_transform_edt(~wrong) <= radius
    return out


def card_digest(url: str, s3_endpoint: str | None = None) -> str:
    """The identity of a QC segmenter for a run's fingerprint: sha256 of its card."""
    return hashlib.sha256(open_storage(url, s3_endpoint).read_bytes(CARD)).hexdigest()
