"""The evaluation job: are the synthetic pairs like the real ones, and do they help?

`load_inputs(config)` reads and checks everything first (bad input is one `UserError` before any
cluster work): the synthetic shards through `skindual.shards.read_shards` (all images one square
size S), and the real pairs of the training table, centre-cropped and resized to S as fine-tuning
saw them.  `run_evaluate(config, inputs)` then measures, on the current Ray cluster:

1. fidelity (`skindual.fidelity`): FID/KID with clean-fid's Inception, or FD/KD in the space of
   another extractor under that name; overall and per class; real features cached;
2. mask statistics (`skindual.mask_stats`), real vs synthetic, overall and per class;
3. the downstream benchmark (`skindual.downstream`): real vs real+synthetic, one Ray task per
   (arm, model, seed), tested on the table's held-out ``test`` split;

and writes ``metrics.json``, ``report.md`` and PNGs to ``--output`` (a folder or s3://).
Everything holds the pairs in memory at S (about 0.8 MB per pair at 512²): cap a large
synthetic set with ``--max-per-class``.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa

from skindual import __version__, data, downstream, fidelity, mask_stats, report
from skindual.cli import check_fields, option
from skindual.downstream import CLASSIFIERS, SEGMENTERS, PairSet
from skindual.errors import UserError
from skindual.prompts import CLASS_CODES
from skindual.shards import read_shards
from skindual.storage import open_storage

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "all")


@dataclass
class EvaluateConfig:
    real: str = option("", "training table parquet from the data stage; empty: the demo world's (built if missing)")
    synthetic: str = option("skindual-synthetic", "shard folder or s3:// prefix written by the generate job")
    output: str = option("skindual-eval", "report folder or s3://bucket/prefix")
    feature_extractor: str = option("inception", "feature space of the fidelity distances (only inception gives FID/KID)",
                                    choices=list(fidelity.EXTRACTORS))
    inception_weights: str = option("", f"path to clean-fid's {fidelity.INCEPTION_FILE} (default: clean-fid's cache, "
                                        f"{fidelity.CLEAN_FID_CACHE})")
    extractor_steps: int = option(300, "training steps of the lesion-cnn extractor")
    fid_split: str = option("train", "split of the real table the synthetic pairs are compared with", choices=list(SPLITS))
    max_per_class: int = option(0, "use at most this many pairs per class of each set (0: all)")
    kid_subsets: int = option(100, "KID: number of random subsets")
    kid_subset_size: int = option(1000, "KID: largest subset size")
    cache_dir: str = option("", "real-feature cache (default: $SKINDUAL_CACHE/features)")
    size: int = option(64, "resolution of the downstream models and of the small feature extractors")
    downstream: bool = option(True, "run the downstream benchmark (real vs real+synthetic)")
    classifier: str = option("resnet18", "downstream classifier", choices=list(CLASSIFIERS))
    segmenter: str = option("unet", "downstream segmenter", choices=list(SEGMENTERS))
    steps: int = option(300, "optimiser steps of every downstream model (the same in both arms)")
    batch_size: int = option(32, "downstream batch size")
    lr: float = option(1e-3, "downstream learning rate (AdamW, cosine decay)")
    seeds: int = option(3, "downstream seeds per (arm, model)")
    test_table: str = option("", "downstream test set: a separate real table (all its classed rows), e.g. the "
                                 "ISIC 2018 test images through the data stage; empty: the --real table's test split")
    real_fraction: float = option(1.0, "share of the real train split both downstream arms train on, per class "
                                       "(at least one image each; the test split is unchanged): below 1, the "
                                       "low-data regime where rare classes have a handful of images")
    cpus_per_task: float = option(1.0, "CPUs per downstream Ray task (also its torch threads)")
    num_gpus_per_task: float = option(-1.0, "GPUs per downstream task; -1: 1 if the cluster has GPUs, else 0")
    grid_per_class: int = option(4, "pairs per class in the sample grids")
    seed: int = option(0, "seed of the extractor training and the KID subsets (downstream seeds are seed..seed+seeds-1)")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("extractor_steps", "kid_subsets", "kid_subset_size", "steps", "batch_size", "seeds"))
        if self.size < 16 or self.size % 8:
            raise UserError(f"--size {self.size}: must be a multiple of 8, at least 16")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if self.max_per_class < 0 or self.grid_per_class < 0 or self.cpus_per_task <= 0:
            raise UserError("--max-per-class and --grid-per-class must be >= 0, --cpus-per-task > 0")


@dataclass
class EvalInputs:
    synthetic: PairSet  # at size × size
    real: PairSet  # the --fid-split rows, at size × size
    train: PairSet | None  # downstream: real train split at --size
    test: PairSet | None  # downstream: real test split (or --test-table) at --size
    size: int


def read_synthetic(url: str, s3_endpoint: str | None = None, max_per_class: int = 0) -> tuple[PairSet, list[str]]:
    """All pairs of the committed shards under `url` (keys too); one square size or a `UserError`."""
    images, masks, labels, keys, first = [], [], [], [], None
    taken = np.zeros(len(CLASS_CODES), int)
    for sample in read_shards(url, s3_endpoint):
        label = int(sample["class_index"])
        if not 0 <= label < len(CLASS_CODES):
            raise UserError(f"{url}: sample {sample['key']} has class index {label}; expected 0..{len(CLASS_CODES) - 1}")
        shape = sample["image"].shape[:2]
        first = first or (sample["key"], shape)
        if shape != first[1] or sample["mask"].shape != shape:
            raise UserError(f"{url}: mismatched image sizes: sample {sample['key']} is {shape[1]}x{shape[0]} "
                            f"(mask {sample['mask'].shape[1]}x{sample['mask'].shape[0]}), sample {first[0]} is "
                            f"{first[1][1]}x{first[1][0]}; evaluate one generation run at a time")
        if shape[0] != shape[1]:
            raise UserError(f"{url}: sample {sample['key']} is {shape[1]}x{shape[0]}; the evaluation needs square pairs")
        if max_per_class and taken[label] >= max_per_class:
            continue
        taken[label] += 1
        images.append(sample["image"])
        masks.append(sample["mask"])
        labels.append(label)
        keys.append(sample["key"])
    if not images:
        raise UserError(f"{url}: the committed shards hold no pairs")
    return PairSet(np.stack(images), np.stack(masks), np.asarray(labels, np.int64)), keys


def resize_pairs(pairs: PairSet, size: int) -> PairSet:
    """Square pairs resized by `data.resize_pair` (image Lanczos, mask bilinear thresholded at 0.5)."""
    if pairs.images.shape[1] == size:
        return pairs
    resized = [data.resize_pair(i, m, size) for i, m in zip(pairs.images, pairs.masks)]
    return PairSet(np.stack([r[0] for r in resized]), np.stack([r[1] for r in resized]), pairs.labels)


def load_inputs(cfg: EvaluateConfig) -> EvalInputs:
    """Read and check the synthetic shards and the real table (see the module docstring)."""
    if cfg.feature_extractor == "inception":
        fidelity.find_inception_weights(cfg.inception_weights)  # missing weights: say so before any work
    table = data.read_training_table(cfg.real)
    synthetic, _ = read_synthetic(cfg.synthetic, cfg.s3_endpoint or None, cfg.max_per_class)
    size = synthetic.images.shape[1]
    rows = data.classed_rows(table, cfg.fid_split, cfg.max_per_class)
    real_counts = np.bincount(np.asarray(rows.column("class_index"), np.int64), minlength=len(CLASS_CODES))
    missing = [CLASS_CODES[c] for c in np.unique(synthetic.labels) if real_counts[c] == 0]
    if missing:
        raise UserError(f"class {', '.join(missing)} has synthetic pairs in {cfg.synthetic} but no real images in the "
                        f"{cfg.fid_split!r} split of {cfg.real}; add real images of it, choose another --fid-split, "
                        "or evaluate shards of the classes the table has")
    real = PairSet(*data.load_arrays(rows, size))
    train = test = None
    if cfg.downstream:
        train_split = data.classed_rows(table, "train")
        train_rows = data.fraction_per_class(train_split, cfg.real_fraction, cfg.seed)
        test_rows = _test_rows(cfg, table, train_split)
        train, test = (PairSet(*data.load_arrays(t, cfg.size)) for t in (train_rows, test_rows))
        if not len(train):
            raise UserError(f"{cfg.real} has no classed rows in its train split, which the downstream benchmark "
                            "needs; rebuild the table, or pass --no-downstream")
    log.info("%d synthetic pairs at %dx%d, %d real (%s split)%s", len(synthetic), size, size, len(real), cfg.fid_split,
             f", downstream {len(train)} train / {len(test)} test" if train is not None else "")
    return EvalInputs(synthetic, real, train, test, size)


def _test_rows(cfg: EvaluateConfig, table: pa.Table, train: pa.Table) -> pa.Table:
    """The downstream test rows: the table's test split, or every classed row of --test-table, which
    must share no image and no lesion with `train`, the whole train split (before --real-fraction)."""
    if not cfg.test_table:
        rows = data.classed_rows(table, "test")
        if not len(rows):
            raise UserError(f"{cfg.real} has no classed rows in its test split, which the downstream benchmark "
                            "needs; rebuild the table, pass --test-table, or pass --no-downstream")
        return rows
    rows = data.classed_rows(data.read_training_table(cfg.test_table))
    if not len(rows):
        raise UserError(f"--test-table {cfg.test_table}: no rows with a class; the downstream test set needs "
                        "labelled images")
    for column in ("image_id", "lesion_id"):
        shared = sorted(set(rows.column(column).to_pylist()) & set(train.column(column).to_pylist()))
        if shared:
            raise UserError(f"--test-table {cfg.test_table}: {len(shared)} {column}(s) also in the train split of "
                            f"{cfg.real} (e.g. {shared[0]}); a test set must be held out from training")
    return rows


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_fidelity(cfg: EvaluateConfig, inputs: EvalInputs) -> dict:
    kind = cfg.feature_extractor
    real_small = resize_pairs(inputs.real, cfg.size) if kind != "inception" else inputs.real
    extractor = fidelity.build_extractor(kind, size=cfg.size, device=_device(), inception_weights=cfg.inception_weights,
                                         train=lambda: (real_small.images, real_small.labels),
                                         steps=cfg.extractor_steps, seed=cfg.seed, cache_dir=cfg.cache_dir or None)
    synthetic = resize_pairs(inputs.synthetic, cfg.size) if kind != "inception" else inputs.synthetic
    real_feats, cached = fidelity.cached_features(extractor, real_small.images, cfg.cache_dir or None)
    out = fidelity.fidelity_metrics(extractor.name, real_feats, real_small.labels, extractor(synthetic.images),
                                    synthetic.labels, CLASS_CODES, num_subsets=cfg.kid_subsets,
                                    max_subset_size=cfg.kid_subset_size, seed=cfg.seed)
    fd, kd = (out["overall"][out[k]] for k in ("fd_name", "kd_name"))
    log.info("%s %s, %s %s (real features %s)", out["fd_name"], fd, out["kd_name"], kd, "cached" if cached else "computed")
    return out | {"real_features_cached": cached, "extractor_fingerprint": extractor.fingerprint}


def measure_masks(inputs: EvalInputs) -> tuple[dict, dict]:
    """(comparison overall and per class, the raw statistic tables for the histograms)."""
    real, synthetic = (mask_stats.statistics_table(s.masks) for s in (inputs.real, inputs.synthetic))
    per_class = {}
    for c in np.unique(inputs.synthetic.labels):
        pick = lambda t, labels: {k: v[labels == c] for k, v in t.items()}  # noqa: E731
        per_class[CLASS_CODES[c]] = mask_stats.compare_statistics(pick(real, inputs.real.labels),
                                                                  pick(synthetic, inputs.synthetic.labels))
    return {"overall": mask_stats.compare_statistics(real, synthetic), "per_class": per_class}, {
        "real": real, "synthetic": synthetic}


def run_evaluate(cfg: EvaluateConfig, inputs: EvalInputs | None = None) -> dict:
    """Measure everything and write the report; returns the metrics (also in ``metrics.json``)."""
    started = time.perf_counter()
    inputs = inputs or load_inputs(cfg)
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    storage.check()
    metrics: dict = {"config": asdict(cfg), "image_size": inputs.size, "counts": {
        name: {CLASS_CODES[c]: int(n) for c, n in enumerate(np.bincount(s.labels, minlength=7)) if n}
        for name, s in (("real", inputs.real), ("synthetic", inputs.synthetic), ("real_train", inputs.train),
                        ("real_test", inputs.test)) if s is not None}}
    metrics["fidelity"] = measure_fidelity(cfg, inputs)
    metrics["mask_statistics"], tables = measure_masks(inputs)
    if cfg.downstream:
        import ray

        gpus = cfg.num_gpus_per_task if cfg.num_gpus_per_task >= 0 else float(ray.cluster_resources().get("GPU", 0) > 0)
        settings = downstream.BenchmarkSettings(cfg.classifier, cfg.segmenter, cfg.steps, cfg.batch_size, cfg.lr)
        seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
        log.info("downstream: %d Ray tasks (%s, %s, %d steps)", 4 * len(seeds), cfg.classifier, cfg.segmenter, cfg.steps)
        results = downstream.run_benchmark(inputs.train, resize_pairs(inputs.synthetic, cfg.size), inputs.test,
                                           settings, CLASS_CODES, seeds, cfg.cpus_per_task, gpus)
        metrics["downstream"] = {"settings": asdict(settings) | {"size": cfg.size, "num_gpus_per_task": gpus},
                                 "results": results, "summary": downstream.summarise(results)}
    metrics["versions"] = {"skindual": __version__, **{p: version(p) for p in ("torch", "torchvision", "clean-fid", "ray")}}
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    with tempfile.TemporaryDirectory(prefix="skindual-eval-") as tmp:
        figures = report.write_figures(Path(tmp), metrics, tables, grids=sample_grids(inputs, cfg.grid_per_class))
        for name in figures:
            storage.upload_file(Path(tmp) / name, name)
    storage.write_bytes("metrics.json", (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    storage.write_bytes("report.md", report.render_report(metrics, figures).encode())
    log.info("report written to %s", storage.join("report.md"))
    return metrics


def sample_grids(inputs: EvalInputs, per_class: int) -> dict[str, list[list[tuple[np.ndarray, np.ndarray]]]]:
    """Up to `per_class` pairs of each synthetic class from each set, for the report's sample grids
    (none when `per_class` is 0)."""
    if not per_class:
        return {}
    grids = {}
    for name, pairs in (("samples_synthetic.png", inputs.synthetic), ("samples_real.png", inputs.real)):
        rows = [[(pairs.images[i], pairs.masks[i]) for i in np.flatnonzero(pairs.labels == c)[:per_class]]
                for c in np.unique(inputs.synthetic.labels)]
        grids[name] = [r for r in rows if r]
    return grids
