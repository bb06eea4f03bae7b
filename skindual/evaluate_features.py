"""The evaluation's feature pass: the feature extractor, the actors that measure each shard, and the
groups the driver combines.

`extractor_spec` trains the lesion-cnn in one Ray task (cached by the content of its training set;
Inception and the random CNN need no training); `feature_pass` runs `FeatureActor` (an actor pool, a GPU
each when the cluster has them) over every shard of the plan's sets and `summarise_group` per (set,
class); `combine` turns the groups into FD/KD overall and per class, the mask-statistic distances and
the pair quality.
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from skindual import fidelity, mask_stats, pairs, quality
from skindual.cli import worker_setup
from skindual.evaluate_plan import SETS, EvaluateConfig, EvaluatePlan, selection_digest
from skindual.prompts import CLASS_CODES
from skindual.qc_model import QCSegmenter
from skindual.shard_store import read_stats
from skindual.storage import open_storage

# --------------------------------------------------------------------------- the feature extractor


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


def extractor_spec(cfg: EvaluateConfig, plan: EvaluatePlan,
                   meanwhile: Callable[[], None] = lambda: None) -> tuple[ExtractorSpec, bool]:
    """The extractor of the run, and whether the lesion-cnn's weights came from the cache; `meanwhile` is called once
    its training (one Ray task) is submitted, before waiting for it, or at once when there is none."""
    if cfg.feature_extractor == "inception":
        meanwhile()
        return ExtractorSpec("inception", cfg.size, inception=str(fidelity.find_inception_weights(
            cfg.inception_weights, cfg.s3_endpoint or None))), False
    if cfg.feature_extractor == "random-cnn":
        meanwhile()
        return ExtractorSpec("random-cnn", cfg.size, seed=cfg.seed), False
    import ray

    real = plan.sets["real"]
    key = hashlib.sha256(f"lesioncnn-v2:{cfg.extractor_steps}:{cfg.seed}:{cfg.size}:"
                         f"{selection_digest(real, cfg.s3_endpoint or None)}".encode()).hexdigest()[:32]
    path = fidelity.feature_cache(cfg.cache_dir or None) / f"lesioncnn-{key}.npz"
    if path.is_file():
        meanwhile()
        with np.load(path) as weights:
            return ExtractorSpec("lesion-cnn", cfg.size, weights=dict(weights)), True
    task = ray.remote(train_extractor).options(num_cpus=cfg.cpus_per_task, max_retries=1)
    training = task.remote(real.url, real.selection, cfg.size, cfg.extractor_steps, cfg.seed, cfg.s3_endpoint or None)
    meanwhile()
    weights = ray.get(training)
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
        if not np.isnan(scored).any():  # agreement with the QC segmenter, overall and per class
            figures["qc_consistency_dice"] = round(float(scored.mean()), 4)
            figures["qc_consistency_per_class"] = {CLASS_CODES[c]: round(float(g["qc_consistency"].mean()), 4)
                                                   for c, g in sorted(parts.items())}
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
