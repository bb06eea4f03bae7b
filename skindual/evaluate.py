"""The evaluation job: are the synthetic pairs like the real ones, and do they help?

Everything streams from storage; the driver plans from the datasets' indexes (their parquets, no
pixels) and combines small statistics.  `plan_evaluate(config)` reads and checks the inputs first
(bad input is one `UserError` before any cluster work) and knows whether the output already holds this
evaluation; `run_evaluate(plan)` then, on the current Ray cluster:

1. trains the lesion-cnn feature extractor in one Ray task from the real train images at ``--size``
   (cached by the content of its training set; Inception needs no training);
2. feature pass (`FeatureActor`, an actor pool, a GPU each when the cluster has them): per shard of
   the real ``--fid-split``, the synthetic set and the real test set, each pair's features, mask
   statistics, image–mask consistency, mask sanity and (lesion-cnn) predicted class, written to
   ``{output}/features/{set}-{shard}.parquet``;
3. a group per (set, class) (`summarise_group`) gives the features' `Moments` (FD) and a seeded sample
   of at most ``--kid-subset-size`` (KD, diversity) and the per-pair figures; the driver combines them
   into FD/KD overall and per class, the mask-statistic distances and the pair quality;
4. the downstream benchmark (`run_task`): one Ray task per (arm, model, seed), each streaming its pairs
   from the real dataset (and the synthetic shards) at ``--size``, tested on the real test split
   (or ``--test-data``);

and writes ``metrics.json``, ``report.md`` and PNGs to ``--output`` (a folder or s3://).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from skindual import __version__, data, downstream, fidelity, mask_stats, pairs, quality, report
from skindual.cli import check_fields, check_interrupt, option, worker_setup
from skindual.cluster import ClusterShape, check_shared_paths, reserved_device, resolve_gpus
from skindual.downstream import ARMS, CLASSIFIERS, HYBRIDS, SEGMENTERS, PairSet, arm_stages
from skindual.errors import UserError
from skindual.prompts import CLASS_CODES
from skindual.qc_model import QCSegmenter
from skindual.shards import read_stats
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
    grid_per_class: int = option(4, "pairs per class in the sample grids")
    seed: int = option(0, "seed of the extractor training and the KID samples (downstream seeds are seed..seed+seeds-1)")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")
    partial: bool = option(False, "use the committed shards of a dataset whose sizes.json names more (a run cut short); "
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
    if cfg.qc_segmenter:
        QCSegmenter.load(cfg.qc_segmenter, endpoint)  # a bad one is one line, before any work
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
                        first[0])


# --------------------------------------------------------------------------- the feature extractor


def _selection_digest(source: Source, s3_endpoint: str | None) -> str:
    """A content key of a selection without reading pixels: its keys and counts, and each shard's tar sha256."""
    storage = open_storage(source.url, s3_endpoint)
    digest = hashlib.sha256()
    for shard in sorted(source.selection):
        stats = read_stats(storage, shard)
        digest.update(f"{shard}:{stats.tar_sha256 if stats else ''}:".encode())
        digest.update(json.dumps(sorted(source.selection[shard].items())).encode())
    return digest.hexdigest()


def train_extractor(url: str, selection: dict[int, dict[str, int]], size: int, steps: int, seed: int,
                    s3_endpoint: str | None) -> dict[str, np.ndarray]:
    """Ray task: the lesion-cnn (`quality.train_classifier`) trained on the selected real pairs at `size`;
    its weights as numpy arrays."""
    worker_setup()
    chosen = pairs.load_pairs(url, selection, size, s3_endpoint)
    model = quality.train_classifier(chosen["image"], chosen["class_index"], steps=steps, seed=seed,
                                     batch_size=min(64, max(8, len(chosen["image"]))))
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


@dataclass(frozen=True)
class ExtractorSpec:
    """How a worker builds the extractor: its kind, and the lesion-cnn's weights or Inception's file."""

    kind: str
    size: int
    weights: dict[str, np.ndarray] | None = None  # lesion-cnn
    inception: str = ""  # a path on the node or an s3:// URL
    seed: int = 0

    def build(self, device: str, s3_endpoint: str | None = None):
        import torch

        if self.kind == "inception":  # an s3:// copy fetched once per node, cached by its sha256
            return fidelity.InceptionExtractor(fidelity.fetch_inception(self.inception, s3_endpoint), device)
        model = quality.LesionClassifier()
        if self.kind == "random-cnn":
            torch.manual_seed(self.seed)
            model = quality.LesionClassifier()
        else:
            model.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in self.weights.items()})
        return fidelity.CNNExtractor("lesioncnn" if self.kind == "lesion-cnn" else "randomcnn", model, self.size, device)


def extractor_spec(cfg: EvaluateConfig, plan: EvaluatePlan) -> tuple[ExtractorSpec, bool]:
    """The extractor of the run, and whether the lesion-cnn's weights came from the cache."""
    if cfg.feature_extractor == "inception":
        return ExtractorSpec("inception", cfg.size, inception=str(fidelity.find_inception_weights(
            cfg.inception_weights, cfg.s3_endpoint or None))), False
    if cfg.feature_extractor == "random-cnn":
        return ExtractorSpec("random-cnn", cfg.size, seed=cfg.seed), False
    import ray

    real = plan.sets["real"]
    key = hashlib.sha256(f"lesioncnn-v2:{cfg.extractor_steps}:{cfg.seed}:{cfg.size}:"
                         f"{_selection_digest(real, cfg.s3_endpoint or None)}".encode()).hexdigest()[:32]
    path = fidelity.feature_cache(cfg.cache_dir or None) / f"lesioncnn-{key}.npz"
    if path.is_file():
        with np.load(path) as weights:
            return ExtractorSpec("lesion-cnn", cfg.size, weights=dict(weights)), True
    task = ray.remote(train_extractor).options(num_cpus=cfg.cpus_per_task, max_retries=1)
    weights = ray.get(task.remote(real.url, real.selection, cfg.size, cfg.extractor_steps, cfg.seed,
                                  cfg.s3_endpoint or None))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, **weights)
    Path(tmp.name).replace(path)
    return ExtractorSpec("lesion-cnn", cfg.size, weights=weights), False


# --------------------------------------------------------------------------- the feature pass


class FeatureActor:
    """Per unit (one shard of one set): each selected pair's features, mask statistics, consistency
    (Dice of its mask and `quality.segment_lesion` of its image), sanity (`quality.mask_check`) and,
    for lesion-cnn, predicted class; written to ``{output}/features/{set}-{shard:05d}.parquet`` and
    returned as rows.  A real unit's features are cached on the node by extractor and content."""

    def __init__(self, spec: ExtractorSpec, image_size: int, output: str, num_gpus: float, cpus: float,
                 s3_endpoint: str | None, cache_dir: str | None, qc_segmenter: str = ""):
        import torch

        worker_setup()
        device = "cuda" if num_gpus > 0 else "cpu"
        if device == "cpu":
            torch.set_num_threads(max(1, int(cpus)))
        self.extractor, self.spec = spec.build(device, s3_endpoint), spec
        self.image_size, self.s3_endpoint, self.cache_dir = image_size, s3_endpoint, cache_dir
        self.output = open_storage(output, s3_endpoint)
        self.qc = QCSegmenter.load(qc_segmenter, s3_endpoint, device) if qc_segmenter else None

    def _compute(self, url: str, shard: int, keys: dict[str, int]) -> pa.Table:
        chosen = pairs.load_pairs(url, {shard: keys}, self.image_size, self.s3_endpoint)
        features = self.extractor(chosen["image"]).astype(np.float32)
        stats = mask_stats.statistics_table(chosen["mask"])
        columns = {"key": chosen["key"].tolist(), "class_index": chosen["class_index"],
                   "features": list(features) if len(features) else [],
                   "consistency": quality.consistency(chosen["image"], chosen["mask"]),
                   "sane": np.asarray([quality.mask_check(m) is None for m in chosen["mask"]], bool),
                   "qc_consistency": (self.qc.score(chosen["image"], chosen["mask"]) if self.qc is not None
                                      else np.full(len(chosen["key"]), np.nan)),
                   **{name: stats[name] for name in mask_stats.STATISTICS}}
        columns["predicted"] = (self.extractor.classify_features(features) if self.spec.kind == "lesion-cnn"
                                else np.full(len(chosen["key"]), -1))
        return pa.table({k: pa.array(list(v) if k == "features" else v) for k, v in columns.items()})

    def __call__(self, batch: dict) -> dict[str, np.ndarray]:
        (name,), (url,), (shard,), (selected,) = (batch[k].tolist() for k in ("set", "url", "shard", "keys"))
        keys = json.loads(selected)
        cache = None
        if name != "synthetic":  # real features: cached by extractor, pixels' content and selection
            stats = read_stats(open_storage(url, self.s3_endpoint), int(shard))
            digest = hashlib.sha256(f"{self.extractor.fingerprint}:{self.image_size}:{stats.tar_sha256}:"
                                    f"{self.qc.sha256 if self.qc else ''}:{json.dumps(sorted(keys))}".encode()).hexdigest()[:32]
            cache = fidelity.feature_cache(self.cache_dir) / f"pairs-{digest}.parquet"
        cached = cache is not None and cache.is_file()
        if cached:
            table = pq.read_table(cache)
        else:
            table = self._compute(url, int(shard), keys)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                pq.write_table(table, f"{cache}.tmp")
                Path(f"{cache}.tmp").replace(cache)
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.output.write_bytes(f"features/{name}-{int(shard):05d}.parquet", buffer.getvalue())
        n = table.num_rows
        out = {column: table.column(column).to_numpy(zero_copy_only=False) for column in table.column_names
               if column != "features"}
        out["features"] = np.stack(table.column("features").to_numpy(zero_copy_only=False)) if n else np.zeros((0, 1), np.float32)
        out["set"] = np.asarray([name] * n, dtype=object)
        out["cached"] = np.full(n, cached)
        return out


def summarise_group(batch: dict, seed: int, k: int) -> dict[str, np.ndarray]:
    """Ray Data group (one set, one class): its `FeatureSummary` and per-pair figures, packed as one row
    (``summary``: an ``.npz`` of the arrays)."""
    keys = [str(x) for x in batch["key"]]
    summary = fidelity.FeatureSummary.of(np.asarray(batch["features"], np.float64), keys, seed, k)
    arrays = {"count": np.asarray(summary.moments.count), "total": summary.moments.total,
              "outer": summary.moments.outer, "sample": summary.sample, "ranks": summary.ranks,
              **{name: np.asarray(batch[name]) for name in (*mask_stats.STATISTICS, "consistency", "sane",
                                                            "qc_consistency", "predicted", "cached")}}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return {"set": np.asarray([batch["set"][0]], dtype=object), "class_index": np.asarray([batch["class_index"][0]]),
            "summary": np.asarray([buffer.getvalue()], dtype=object)}


def feature_pass(cfg: EvaluateConfig, plan: EvaluatePlan, spec: ExtractorSpec, gpus: float = 0.0) -> dict[tuple[str, int], dict]:
    """(set, class index) → the group's arrays (see `summarise_group`), from the actor pool's pass (`gpus` per actor)."""
    import ray

    units = [{"set": name, "url": source.url, "shard": shard, "keys": json.dumps(dict(sorted(keys.items())))}
             for name, source in plan.sets.items() for shard, keys in sorted(source.selection.items())]
    dataset = (ray.data.from_items(units, override_num_blocks=len(units))
               .map_batches(FeatureActor, batch_size=1, batch_format="numpy",
                            compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=1),
                            num_gpus=gpus, num_cpus=cfg.cpus_per_actor,
                            fn_constructor_kwargs={"spec": spec, "image_size": plan.image_size, "output": cfg.output,
                                                   "num_gpus": gpus, "cpus": cfg.cpus_per_actor,
                                                   "s3_endpoint": cfg.s3_endpoint or None,
                                                   "cache_dir": cfg.cache_dir or None,
                                                   "qc_segmenter": cfg.qc_segmenter})
               .groupby(["set", "class_index"], num_partitions=min(8, len(units)))
               .map_groups(summarise_group, batch_format="numpy",
                           fn_kwargs={"seed": cfg.seed, "k": cfg.kid_subset_size}))
    groups = {}
    for row in dataset.iter_rows():
        with np.load(io.BytesIO(row["summary"])) as arrays:
            groups[(str(row["set"]), int(row["class_index"]))] = {k: arrays[k] for k in arrays.files}
    return groups


def _summary(group: dict, k: int) -> fidelity.FeatureSummary:
    moments = fidelity.Moments(int(group["count"]), group["total"], group["outer"])
    return fidelity.FeatureSummary(moments, group["sample"], group["ranks"], k)


def combine(groups: dict[tuple[str, int], dict], spec_name: str, cfg: EvaluateConfig) -> dict[str, Any]:
    """fidelity, mask statistics and pair quality from the groups of `feature_pass`."""
    by_set = {name: {c: g for (s, c), g in groups.items() if s == name} for name in SETS}
    classes = sorted(by_set["synthetic"])
    out_fidelity = fidelity.fidelity_from_summaries(
        spec_name, {c: _summary(g, cfg.kid_subset_size) for c, g in by_set["real"].items()},
        {c: _summary(g, cfg.kid_subset_size) for c, g in by_set["synthetic"].items()},
        CLASS_CODES, num_subsets=cfg.kid_subsets, max_subset_size=cfg.kid_subset_size, seed=cfg.seed)

    def stats(name: str, only: list[int] | None = None) -> dict[str, np.ndarray]:
        parts = [g for c, g in by_set[name].items() if only is None or c in only]
        return {s: np.concatenate([g[s] for g in parts]) if parts else np.zeros(0) for s in mask_stats.STATISTICS}

    masks = {"overall": mask_stats.compare_statistics(stats("real"), stats("synthetic")),
             "per_class": {CLASS_CODES[c]: mask_stats.compare_statistics(stats("real", [c]), stats("synthetic", [c]))
                           for c in classes}}
    quality_of = {}
    for name in ("synthetic", "real_test"):
        parts = by_set[name]
        if not parts:
            continue
        consistency = np.concatenate([g["consistency"] for g in parts.values()])
        sane = np.concatenate([g["sane"] for g in parts.values()])
        figures = {"pairs": int(len(consistency)), "consistency_dice": round(float(consistency.mean()), 4),
                   "sane_mask_share": round(float(sane.mean()), 4)}
        scored = np.concatenate([g["qc_consistency"] for g in parts.values()])
        if not np.isnan(scored).any():
            figures["qc_consistency_dice"] = round(float(scored.mean()), 4)
        if all((g["predicted"] >= 0).all() for g in parts.values()):
            per_class = {CLASS_CODES[c]: round(float((g["predicted"] == c).mean()), 3) for c, g in sorted(parts.items())}
            figures["class_fidelity"] = per_class
            figures["class_fidelity_mean"] = round(float(np.mean(list(per_class.values()))), 4)
            correct = sum(int((g["predicted"] == c).sum()) for c, g in parts.items())
            figures["classifier_accuracy"] = round(correct / len(consistency), 4)
        quality_of[name] = figures
    cached = [bool(g["cached"].all()) for (s, _), g in groups.items() if s != "synthetic"]
    return {"fidelity": out_fidelity | {"real_features_cached": bool(cached) and all(cached)},
            "mask_statistics": masks, "mask_tables": {"real": stats("real"), "synthetic": stats("synthetic")},
            "pair_quality": quality_of}


# --------------------------------------------------------------------------- the downstream benchmark


def run_task(arm: str, task: str, seed: int, stages: list[list[Source]], test: Source,
             settings: downstream.BenchmarkSettings, size: int, s3_endpoint: str | None,
             threads: int = 1) -> dict[str, Any]:
    """Ray task: train one model of one arm with one seed, a schedule per stage (`downstream.arm_stages`) on a
    stream of the stage's pairs from storage, and test it on the (small) test set: a row of the results table."""
    import torch

    started = time.perf_counter()
    worker_setup()
    torch.set_num_threads(max(1, threads))
    device = torch.device(reserved_device())  # a GPU node's CUDA is visible to tasks that reserved none

    def batches(pool: list[Source], stage: int):
        stream = pairs.stream_pairs([(s.url, s.selection) for s in pool], size, seed + 1000 * stage,
                                    s3_endpoint=s3_endpoint)
        while True:
            picked = [next(stream) for _ in range(settings.batch_size)]
            yield (np.stack([p["image"] for p in picked]), np.stack([p["mask"] for p in picked]),
                   np.asarray([p["class_index"] for p in picked], np.int64), np.stack([p["ignore"] for p in picked]))

    torch.manual_seed(seed)  # the same initialisation in both arms
    kind = settings.classifier if task == "classifier" else settings.segmenter
    model = downstream.train_schedules(downstream.build_model(kind, settings.num_classes),
                                       (batches(pool, k) for k, pool in enumerate(stages)), task, settings, seed,
                                       device)
    loaded = pairs.load_pairs(test.url, test.selection, size, s3_endpoint)
    metrics = downstream.test_model(model, PairSet(loaded["image"], loaded["mask"], loaded["class_index"]), task,
                                    CLASS_CODES, device)
    used = {id(s): s for pool in stages for s in pool}.values()
    return {"arm": arm, "model": task, "architecture": kind, "seed": seed, "train_pairs": sum(len(s) for s in used),
            "schedules": len(stages),
            "test_pairs": len(loaded["key"]), "seconds": round(time.perf_counter() - started, 1), **metrics}


def run_benchmark(cfg: EvaluateConfig, plan: EvaluatePlan, gpus: float = 0.0) -> dict[str, Any]:
    """Every (arm, model, seed) as one Ray task (`gpus` each) on the current cluster; results in that order, and
    their summary."""
    import ray

    settings = downstream.BenchmarkSettings(cfg.classifier, cfg.segmenter, cfg.steps, cfg.batch_size, cfg.lr,
                                            ignore_maps=cfg.ignore_maps)
    seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
    stages = {arm: arm_stages(arm, cfg.hybrid, plan.train, plan.sets["synthetic"]) for arm in ARMS}
    remote = ray.remote(run_task).options(num_cpus=cfg.cpus_per_task, num_gpus=gpus, max_retries=1)
    log.info("downstream: %d Ray tasks (%s, %s, hybrid %s, %d steps a schedule)", 4 * len(seeds), cfg.classifier,
             cfg.segmenter, cfg.hybrid, cfg.steps)
    futures = [remote.remote(arm, task, seed, stages[arm], plan.sets["real_test"], settings, cfg.size,
                             cfg.s3_endpoint or None, max(1, int(cfg.cpus_per_task)))
               for task in ("classifier", "segmenter") for arm in ARMS for seed in seeds]
    results = ray.get(futures)
    return {"settings": asdict(settings) | {"size": cfg.size, "num_gpus_per_task": gpus, "hybrid": cfg.hybrid,
                                            "schedules": len(stages["real"])}, "results": results,
            "summary": downstream.summarise(results)}


# --------------------------------------------------------------------------- the job


def sample_grids(cfg: EvaluateConfig, plan: EvaluatePlan) -> dict[str, list[list[tuple[np.ndarray, np.ndarray]]]]:
    """Up to ``--grid-per-class`` pairs of each synthetic class from the synthetic and the real set (read
    from the first shards that hold them), for the report's sample grids."""
    if not cfg.grid_per_class:
        return {}
    classes = sorted({CLASS_CODES.index(c) for c in plan.counts["synthetic"]})
    grids = {}
    for name, file in (("synthetic", "samples_synthetic.png"), ("real", "samples_real.png")):
        source, rows = plan.sets[name], {c: [] for c in classes}
        storage = open_storage(source.url, cfg.s3_endpoint or None)
        for shard in sorted(source.selection):
            for sample in pairs.iter_shard(storage, shard, source.selection[shard]):
                pair = pairs.decode_sample(sample, plan.image_size)
                if len(rows.get(pair["class_index"], [None] * cfg.grid_per_class)) < cfg.grid_per_class:
                    rows[pair["class_index"]].append((pair["image"], pair["mask"]))
            if all(len(r) >= cfg.grid_per_class for r in rows.values()):
                break
        grids[file] = [r for r in rows.values() if r]
    return grids


# settings that change where and on how many workers the evaluation runs, not its figures
NOT_FINGERPRINTED = ("output", "actors", "num_gpus_per_actor", "cpus_per_actor", "cpus_per_task", "num_gpus_per_task",
                     "cache_dir", "s3_endpoint", "recompute", "partial")


def _versions() -> dict[str, str]:
    return {"skindual": __version__, **{p: version(p) for p in ("torch", "torchvision", "clean-fid", "ray")}}


def evaluation_fingerprint(plan: EvaluatePlan) -> str:
    """What the figures depend on: the settings (not those in `NOT_FINGERPRINTED`), every selection with
    its shards' tar sha256 (`_selection_digest`), the QC segmenter's weights and the library versions."""
    cfg = plan.config
    endpoint = cfg.s3_endpoint or None
    sources = {**plan.sets, "train": plan.train}
    key = {"settings": {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED},
           "inputs": {name: _selection_digest(s, endpoint) for name, s in sorted(sources.items()) if s is not None},
           "qc_segmenter": QCSegmenter.load(cfg.qc_segmenter, endpoint).sha256 if cfg.qc_segmenter else "",
           "versions": _versions()}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def run_evaluate(plan: EvaluatePlan, shape: ClusterShape | None = None) -> dict:
    """Measure everything and write the report on the current Ray cluster (`shape`: what it has and can launch,
    read from it when not given); returns the metrics (also in ``metrics.json``, written last)."""
    from skindual.cluster import cluster_shape

    cfg = plan.config
    started = time.perf_counter()
    shape = shape or cluster_shape()
    check_shared_paths({"--output": cfg.output, "--real": cfg.real, "--synthetic": cfg.synthetic,
                        "--test-data": cfg.test_data, "--qc-segmenter": cfg.qc_segmenter}, shape)
    actor_gpus = resolve_gpus(cfg.num_gpus_per_actor, "--num-gpus-per-actor", shape)
    task_gpus = resolve_gpus(cfg.num_gpus_per_task, "--num-gpus-per-task", shape) if cfg.downstream else 0.0
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    fingerprint = plan.fingerprint
    # the old marker goes first: its features and figures are about to be replaced, so an interrupted
    # run must not leave it standing beside them
    storage.delete(METRICS)
    stages: dict[str, float] = {}
    clock = time.perf_counter()
    check_interrupt()  # a Ctrl-C that Ray's setup calls swallowed stops the run before each phase
    spec, extractor_cached = extractor_spec(cfg, plan)
    stages["extractor"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()
    groups = feature_pass(cfg, plan, spec, actor_gpus)
    name = "inception" if spec.kind == "inception" else spec.kind.replace("-", "")
    measured = combine(groups, name, cfg)
    stages["features"], clock = round(time.perf_counter() - clock, 2), time.perf_counter()
    fid = measured["fidelity"]
    fd, kd = (fid["overall"][fid[k]] for k in ("fd_name", "kd_name"))
    log.info("%s %s, %s %s (real features %s)", fid["fd_name"], fd, fid["kd_name"], kd,
             "cached" if fid["real_features_cached"] else "computed")
    metrics: dict = {"config": asdict(cfg), "image_size": plan.image_size, "counts": plan.counts,
                     "fidelity": fid | {"extractor_cached": extractor_cached},
                     "mask_statistics": measured["mask_statistics"], "pair_quality": measured["pair_quality"]}
    if cfg.downstream:
        check_interrupt()
        metrics["downstream"] = run_benchmark(cfg, plan, task_gpus)
        stages["downstream"] = round(time.perf_counter() - clock, 2)
    check_interrupt()  # and before the report: its metrics.json marks the run done
    metrics["stage_seconds"] = stages
    metrics["versions"], metrics["fingerprint"] = _versions(), fingerprint
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    with tempfile.TemporaryDirectory(prefix="skindual-eval-") as tmp:
        figures = report.write_figures(Path(tmp), metrics, measured["mask_tables"], grids=sample_grids(cfg, plan))
        for file in figures:
            storage.upload_file(Path(tmp) / file, file)
    storage.write_bytes("report.md", report.render_report(metrics, figures).encode())
    # last: a metrics.json of these inputs marks the evaluation finished (`storage.finished`)
    storage.write_bytes(METRICS, (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    log.info("report written to %s", storage.join("report.md"))
    return metrics
