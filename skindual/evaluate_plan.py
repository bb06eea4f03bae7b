"""The evaluation's plan: its config, its inputs read and checked, and its fingerprint.

`plan_evaluate(config)` reads the three datasets' indexes (their parquets, no pixels), checks them (bad
input is one `UserError` before any cluster work), fingerprints what the figures depend on and knows
whether the output already holds this evaluation (`skindual.evaluate.run_evaluate` then runs it).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version

import numpy as np
import pyarrow as pa

from skindual import __version__, data, fidelity, pairs
from skindual.cli import check_fields, option
from skindual.downstream import CLASSIFIERS, HYBRIDS, SEGMENTERS
from skindual.errors import UserError
from skindual.prompts import CLASS_CODES
from skindual.qc_model import QCSegmenter
from skindual.shard_store import read_stats
from skindual.storage import finished, open_storage, output_storage

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "all")
METRICS = "metrics.json"  # written last: the evaluation's marker (`storage.finished`)
SETS = ("real", "synthetic", "real_test")  # the feature pass's sets: the --fid-split, the synthetic set, the test set


@dataclass(frozen=True)
class EvaluateConfig:
    real: str = option("", "the prepared real dataset (jobs/prepare.py): a folder or s3:// prefix; empty "
                           "(jobs/evaluate.py): the demo world's")
    synthetic: str = option("skindual-synthetic", "shard folder or s3:// prefix written by the generate job")
    output: str = option("skindual-eval", "report folder or s3://bucket/prefix")
    feature_extractor: str = option("inception", "feature space of the fidelity distances (only inception gives FID/KID)",
                                    choices=list(fidelity.EXTRACTORS))
    inception_weights: str = option("", f"clean-fid's {fidelity.INCEPTION_FILE}: a path on every node or an s3:// URL "
                                        f"(default: clean-fid's cache, {fidelity.CLEAN_FID_CACHE})")
    extractor_steps: int = option(300, "training steps of the lesion-cnn extractor")
    fid_split: str = option("train", "split of the real dataset the synthetic pairs are compared with", choices=list(SPLITS))
    max_per_class: int = option(0, "use at most this many pairs per class of each set (0: all)")
    kid_subsets: int = option(100, "KID: number of random subsets")
    kid_subset_size: int = option(1000, "KID and diversity: a seeded sample of at most this many pairs per class")
    cache_dir: str = option("", "cache of the extractor's weights and the real features (default: $SKINDUAL_CACHE/features)")
    size: int = option(64, "resolution of the downstream models and of the small feature extractors")
    downstream: bool = option(True, "run the downstream benchmark (real vs real+synthetic)")
    classifier: str = option("resnet18", "downstream classifier", choices=list(CLASSIFIERS))
    segmenter: str = option("unet", "downstream segmenter", choices=list(SEGMENTERS))
    steps: int = option(300, "optimiser steps of every downstream model's schedule (the same in both arms)")
    hybrid: str = option("pretrain", "how the real+synthetic arm uses the synthetic pairs: pretrain (a schedule on "
                                      "them, then one on the real pairs; the real arm runs both schedules on the "
                                      "real pairs) or mix (one schedule on the pool of both)", choices=list(HYBRIDS))
    batch_size: int = option(32, "downstream batch size")
    lr: float = option(1e-3, "downstream learning rate (AdamW, cosine decay)")
    ignore_maps: bool = option(True, "the downstream segmenter leaves the pixels of a synthetic pair's ignore map "
                                     "({key}.ignore.png, generate --qc-segmenter) out of its loss")
    seeds: int = option(3, "downstream seeds per (arm, model)")
    test_data: str = option("", "downstream test set: a separate prepared real dataset (all its classed pairs), e.g. "
                                "the ISIC 2018 test images through jobs/prepare.py; empty: --real's test split")
    real_fraction: float = option(1.0, "share of the real train split both downstream arms train on, per class "
                                       "(at least one image each; the test split is unchanged): below 1, the "
                                       "low-data regime where rare classes have a handful of images")
    actors: int = option(2, "feature-pass actors")
    num_gpus_per_actor: float = option(-1.0, "GPUs per feature-pass actor; -1: 1 if the cluster has or its autoscaler "
                                             "can launch GPU nodes, else 0")
    cpus_per_actor: float = option(1.0, "CPUs per feature-pass actor (also its torch threads on CPU)")
    cpus_per_task: float = option(1.0, "CPUs per downstream Ray task (also its torch threads)")
    num_gpus_per_task: float = option(-1.0, "GPUs per downstream task; -1: 1 if the cluster has or its autoscaler can "
                                            "launch GPU nodes, else 0 (a task without one computes on its CPUs)")
    qc_segmenter: str = option("", "a QC segmenter (jobs/qc_model.py): pair quality also scores each pair by the Dice "
                                   "between its mask and the segmenter's mask of its image")
    grid_per_class: int = option(4, "pairs of each set (synthetic, real test) on each class's sheet")
    seed: int = option(0, "seed of the extractor training and the KID samples (downstream seeds are seed..seed+seeds-1)")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")
    partial: bool = option(False, "use the committed shards of a dataset whose run has not finished (a run cut short); "
                                  "without it such a dataset is refused, naming the shards it lacks")
    recompute: bool = option(False, "evaluate again even when --output holds the report of the same inputs and "
                                    "settings (a rerun otherwise keeps it)")

    def __post_init__(self) -> None:
        check_fields(self, ("extractor_steps", "kid_subsets", "kid_subset_size", "steps", "batch_size", "seeds",
                            "actors"))
        if self.size < 16 or self.size % 8:
            raise UserError(f"--size {self.size}: must be a multiple of 8, at least 16")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if self.max_per_class < 0 or self.grid_per_class < 0 or self.cpus_per_task <= 0 or self.cpus_per_actor <= 0:
            raise UserError("--max-per-class and --grid-per-class must be >= 0, --cpus-per-task and "
                            "--cpus-per-actor > 0")


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Source:
    """A selection of one dataset's pairs: shard → {key: count}."""

    url: str
    selection: dict[int, dict[str, int]]

    def __len__(self) -> int:
        return sum(sum(keys.values()) for keys in self.selection.values())


@dataclass(frozen=True)
class EvaluatePlan:
    """An evaluation, resolved before any cluster work: its inputs read and checked, the fingerprint of what its
    figures depend on, and whether its output already holds them (the finished evaluation's metrics)."""

    config: EvaluateConfig
    sets: dict[str, Source]  # "real" (the --fid-split), "synthetic", "real_test" (downstream test, pair-quality reference)
    train: Source | None  # the downstream real arm's pairs (--real-fraction of the train split)
    counts: dict[str, dict[str, int]]  # set → class code → pairs
    image_size: int  # the synthetic pairs' side: every set is measured at it
    qc_sha256: str = ""  # the --qc-segmenter's weights, checked when the plan was made ("" without one)
    fingerprint: str = ""
    done: dict | None = None


def _usable(index: pa.Table, what: str, url: str) -> pa.Table:
    if "status" not in index.column_names:
        raise UserError(f"{what} {url}: not a dataset of this tool (its parquets have no status column)")
    return pairs.usable_rows(index)


def _real_rows(index: pa.Table, split: str, what: str, url: str) -> pa.Table:
    if "split" not in index.column_names:
        raise UserError(f"{what} {url}: not a prepared real dataset (no split column); run jobs/prepare.py on the "
                        "real data and pass its output")
    return data.classed_rows(index, split)


def _capped(rows: pa.Table, max_per_class: int) -> pa.Table:
    return data.classed_rows(rows.sort_by("key"), "all", max_per_class) if max_per_class else rows


def _class_counts(rows: pa.Table) -> dict[str, int]:
    counts = np.bincount(np.asarray(rows.column("class_index"), np.int64), minlength=len(CLASS_CODES))
    return {CLASS_CODES[c]: int(n) for c, n in enumerate(counts) if n}


def plan_evaluate(cfg: EvaluateConfig) -> EvaluatePlan:
    """Read the three datasets' indexes and check them, check the output, and fingerprint the evaluation
    (every problem one `UserError`, before any cluster work)."""
    plan = _inputs(cfg)  # the inputs first: a bad one leaves no output folder behind
    output_storage(cfg.output, cfg.s3_endpoint or None)
    fingerprint = evaluation_fingerprint(plan)
    done = None if cfg.recompute else finished(open_storage(cfg.output, cfg.s3_endpoint or None), METRICS, fingerprint)
    if done is not None:
        log.info("%s already holds the evaluation of these inputs and settings (metrics.json); kept "
                 "(--recompute evaluates again)", cfg.output)
    return replace(plan, fingerprint=fingerprint, done=done)


def _inputs(cfg: EvaluateConfig) -> EvaluatePlan:
    """The plan's inputs: the datasets' indexes read and checked."""
    endpoint = cfg.s3_endpoint or None
    synthetic = _usable(pairs.read_index(cfg.synthetic, endpoint, "--synthetic", cfg.partial), "--synthetic",
                        cfg.synthetic)
    if "split" in synthetic.column_names:
        raise UserError(f"--synthetic {cfg.synthetic}: a prepared real dataset (its pairs have splits), not the output "
                        "of jobs/generate.py; did you swap --real and --synthetic?")
    if not synthetic.num_rows:
        raise UserError(f"{cfg.synthetic}: the committed shards hold no pairs")
    labels = np.asarray(synthetic.column("class_index"))
    bad = np.flatnonzero((labels < 0) | (labels >= len(CLASS_CODES)))
    if len(bad):
        raise UserError(f"{cfg.synthetic}: sample {synthetic.column('key')[int(bad[0])]} has class index "
                        f"{labels[bad[0]]}; expected 0..{len(CLASS_CODES) - 1}")
    sizes = sorted({(w, h, k) for w, h, k in zip(synthetic.column("width").to_pylist(),
                                                 synthetic.column("height").to_pylist(),
                                                 synthetic.column("key").to_pylist())}, key=lambda x: x[2])
    first = sizes[0]
    for w, h, key in sizes:
        if (w, h) != first[:2]:
            raise UserError(f"{cfg.synthetic}: mismatched image sizes: sample {key} is {w}x{h}, sample {first[2]} is "
                            f"{first[0]}x{first[1]}; evaluate one generation run at a time")
    if first[0] != first[1]:
        raise UserError(f"{cfg.synthetic}: sample {first[2]} is {first[0]}x{first[1]}; the evaluation needs square pairs")
    real_index = _usable(pairs.read_index(cfg.real, endpoint, "--real", cfg.partial), "--real", cfg.real)
    if "split" not in real_index.column_names:
        raise UserError(f"--real {cfg.real}: not a prepared real dataset (no split column) but, by its layout, "
                        "generated pairs; did you swap --real and --synthetic? (the real data: jobs/prepare.py)")
    real = _capped(_real_rows(real_index, cfg.fid_split, "--real", cfg.real), cfg.max_per_class)
    present = _class_counts(real)
    missing = [CLASS_CODES[c] for c in np.unique(labels) if CLASS_CODES[c] not in present]
    if missing:
        raise UserError(f"class {', '.join(missing)} has synthetic pairs in {cfg.synthetic} but no real images in the "
                        f"{cfg.fid_split!r} split of {cfg.real}; add real images of it, choose another --fid-split, "
                        "or evaluate shards of the classes the dataset has")
    synthetic = _capped(synthetic, cfg.max_per_class)
    train_split = _real_rows(real_index, "train", "--real", cfg.real)
    test_url, test = cfg.real, _real_rows(real_index, "test", "--real", cfg.real)
    if cfg.test_data:
        test_url = cfg.test_data
        test = _real_rows(_usable(pairs.read_index(cfg.test_data, endpoint, "--test-data", cfg.partial), "--test-data",
                                  cfg.test_data), "all", "--test-data", cfg.test_data)
        if not test.num_rows:
            raise UserError(f"--test-data {cfg.test_data}: no pairs with a class; the downstream test set needs "
                            "labelled images")
        for column in ("image_id", "lesion_id"):
            shared = sorted(set(test.column(column).to_pylist()) & set(train_split.column(column).to_pylist()))
            if shared:
                raise UserError(f"--test-data {cfg.test_data}: {len(shared)} {column}(s) also in the train split of "
                                f"{cfg.real} (e.g. {shared[0]}); a test set must be held out from training")
    train = None
    if cfg.downstream:
        if not train_split.num_rows:
            raise UserError(f"{cfg.real} has no classed pairs in its train split, which the downstream benchmark "
                            "needs; prepare it again, or pass --no-downstream")
        if not test.num_rows:
            raise UserError(f"{cfg.real} has no classed pairs in its test split, which the downstream benchmark "
                            "needs; prepare it again, pass --test-data, or pass --no-downstream")
        train = data.fraction_per_class(train_split, cfg.real_fraction, cfg.seed)
    # a bad one is one line, before any work
    qc_sha256 = QCSegmenter.load(cfg.qc_segmenter, endpoint).sha256 if cfg.qc_segmenter else ""
    if cfg.feature_extractor == "inception":  # after the inputs: a typo in a path is reported as such first
        fidelity.find_inception_weights(cfg.inception_weights, endpoint)
    sets = {"real": Source(cfg.real, pairs.selection_of(real)), "synthetic": Source(cfg.synthetic, pairs.selection_of(synthetic)),
            "real_test": Source(test_url, pairs.selection_of(test))}
    counts = {"real": present, "synthetic": _class_counts(synthetic), "real_test": _class_counts(test)}
    if train is not None:
        counts["real_train"] = _class_counts(train)
    log.info("%d synthetic pairs at %dx%d, %d real (%s split), %d real test%s", synthetic.num_rows, first[0], first[0],
             real.num_rows, cfg.fid_split, test.num_rows,
             f", downstream {train.num_rows} real train pairs" if train is not None else "")
    return EvaluatePlan(cfg, sets, Source(cfg.real, pairs.selection_of(train)) if train is not None else None, counts,
                        first[0], qc_sha256)


# --------------------------------------------------------------------------- the fingerprint


def selection_digest(source: Source, s3_endpoint: str | None) -> str:
    """A content key of a selection without reading pixels: its keys and counts, and each shard's tar sha256."""
    storage = open_storage(source.url, s3_endpoint)
    digest = hashlib.sha256()
    for shard in sorted(source.selection):
        stats = read_stats(storage, shard)
        digest.update(f"{shard}:{stats.tar_sha256 if stats else ''}:".encode())
        digest.update(json.dumps(sorted(source.selection[shard].items())).encode())
    return digest.hexdigest()


# settings that change where and on how many workers the evaluation runs, not its figures
NOT_FINGERPRINTED = ("output", "actors", "num_gpus_per_actor", "cpus_per_actor", "cpus_per_task", "num_gpus_per_task",
                     "cache_dir", "s3_endpoint", "recompute", "partial")


def library_versions() -> dict[str, str]:
    """The versions of the libraries the figures depend on (part of the fingerprint and of metrics.json)."""
    return {"skindual": __version__, **{p: version(p) for p in ("torch", "torchvision", "clean-fid", "ray")}}


def evaluation_fingerprint(plan: EvaluatePlan) -> str:
    """What the figures depend on: the settings (not those in `NOT_FINGERPRINTED`), every selection with
    its shards' tar sha256 (`selection_digest`), the QC segmenter's weights and the library versions."""
    cfg = plan.config
    endpoint = cfg.s3_endpoint or None
    sources = {**plan.sets, "train": plan.train}
    key = {"settings": {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED},
           "inputs": {name: selection_digest(s, endpoint) for name, s in sorted(sources.items()) if s is not None},
           "qc_segmenter": plan.qc_sha256,
           "versions": library_versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()

