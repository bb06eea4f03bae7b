"""The evaluation job: are the synthetic pairs like the real ones, and do they help?

Everything streams from storage; the driver plans from the datasets' indexes (their parquets, no
pixels) and combines small statistics.  `evaluate_plan.plan_evaluate(config)` reads and checks the
inputs first (bad input is one `UserError` before any cluster work) and knows whether the output
already holds this evaluation; `run_evaluate(plan)` then, on the current Ray cluster:

1. trains the lesion-cnn feature extractor (`evaluate_features.extractor_spec`) in one Ray task from
   the real train images at ``--size`` (cached by the content of its training set; Inception needs no
   training);
2. feature pass (`evaluate_features.FeatureActor`, an actor pool, a GPU each when the cluster has
   them): per shard of the real ``--fid-split``, the synthetic set and the real test set, each pair's
   features, mask statistics, image–mask consistency, mask sanity and (lesion-cnn) predicted class,
   written to ``{output}/features/{set}-{shard}.parquet``;
3. a group per (set, class) (`summarise_group`) gives the features' `Moments` (FD) and a seeded sample
   of at most ``--kid-subset-size`` (KD, diversity) and the per-pair figures; the driver combines them
   into FD/KD overall and per class, the mask-statistic distances and the pair quality (with
   ``--qc-segmenter``, each class's agreement with it);
4. the downstream benchmark (`evaluate_downstream.run_task`): one Ray task per (arm, model, seed),
   each streaming its pairs from the real dataset (and the synthetic shards) at ``--size``, tested on
   the real test split (or ``--test-data``); it needs no features, so its tasks are submitted right
   after the extractor's and run beside steps 1–3 on what those leave free;

and writes ``metrics.json``, ``report.md`` and PNGs (among them a sheet per class: its synthetic and real
test pairs, each image with its mask's outline and the QC segmenter's beside it) to ``--output`` (a folder
or s3://).
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from skindual import pairs, report
from skindual.card import add_evaluation
from skindual.cli import check_interrupt
from skindual.cluster import ClusterShape, check_shared_paths, resolve_gpus
from skindual.evaluate_downstream import PendingBenchmark, finish_benchmark, start_benchmark
from skindual.evaluate_features import combine, extractor_spec, feature_pass
from skindual.evaluate_plan import METRICS, EvaluateConfig, EvaluatePlan, library_versions
from skindual.prompts import CLASS_CODES
from skindual.errors import StorageError
from skindual.qc_model import QCSegmenter
from skindual.storage import open_storage

log = logging.getLogger(__name__)


SHEET_SETS = {"synthetic": "synthetic", "real_test": "real (test)"}
"""The sets on the per-class sheets, and their rows' labels: the real pairs are the test split's, held out
from the QC segmenter's training, like the real agreement figure."""


def class_sheet_pairs(cfg: EvaluateConfig, plan: EvaluatePlan) -> dict[str, dict[str, list[dict]]]:
    """Class code → row label → up to ``--grid-per-class`` pairs of the class from the synthetic set and the real
    test set (read from the first shards that hold them) at the evaluation's size: ``image``, ``mask``, ``ignore``
    and, with ``--qc-segmenter``, ``qc`` (the segmenter's mask of the image, as pair quality scores it); for
    the report's per-class sheets."""
    if not cfg.grid_per_class:
        return {}
    classes = sorted({CLASS_CODES.index(c) for c in plan.counts["synthetic"]})
    qc = QCSegmenter.load(cfg.qc_segmenter, cfg.s3_endpoint or None) if cfg.qc_segmenter else None
    sheets: dict[str, dict[str, list[dict]]] = {CLASS_CODES[c]: {} for c in classes}
    for name, label in SHEET_SETS.items():
        source, rows = plan.sets[name], {c: [] for c in classes}
        storage = open_storage(source.url, cfg.s3_endpoint or None)
        for shard in sorted(source.selection):
            for sample in pairs.iter_shard(storage, shard, source.selection[shard]):
                pair = pairs.decode_sample(sample, plan.image_size)
                if len(rows.get(pair["class_index"], [None] * cfg.grid_per_class)) < cfg.grid_per_class:
                    rows[pair["class_index"]].append(pair)
            if all(len(r) >= cfg.grid_per_class for r in rows.values()):
                break
        for c, row in rows.items():
            if row and qc is not None:
                for pair, predicted in zip(row, qc.masks(np.stack([p["image"] for p in row]))):
                    pair["qc"] = predicted
            if row:
                sheets[CLASS_CODES[c]][label] = row
    return sheets


def guided_by_qc_segmenter(plan: EvaluatePlan) -> bool:
    """Whether the synthetic images were nudged towards their masks (generate --segmenter-guidance) by the very QC
    segmenter that scores them here: its agreement figures are then no independent check."""
    if not plan.qc_sha256:
        return False
    made = pairs.dataset_manifest(plan.config.synthetic, plan.config.s3_endpoint or None)
    return bool(made.get("config", {}).get("segmenter_guidance")) and (
        made.get("resolved", {}).get("qc_segmenter") == f"sha256:{plan.qc_sha256}")


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
    benchmark: list[PendingBenchmark] = []  # its tasks need no features: submitted behind the extractor's, they
    # run beside it and the feature pass, on what those leave free
    spec, extractor_cached = extractor_spec(cfg, plan, meanwhile=lambda: benchmark.extend(
        [start_benchmark(cfg, plan, task_gpus)] if cfg.downstream else []))
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
                     "mask_statistics": measured["mask_statistics"], "pair_quality": measured["pair_quality"],
                     "synthetic_guided_by_qc_segmenter": guided_by_qc_segmenter(plan)}
    if benchmark:
        check_interrupt()
        metrics["downstream"] = finish_benchmark(benchmark[0])
        stages["downstream"] = round(time.perf_counter() - clock, 2)  # the wait for it after the feature pass
    check_interrupt()  # and before the report: its metrics.json marks the run done
    metrics["stage_seconds"] = stages
    metrics["versions"], metrics["fingerprint"] = library_versions(), fingerprint
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    with tempfile.TemporaryDirectory(prefix="skindual-eval-") as tmp:
        figures = report.write_figures(Path(tmp), metrics, measured["mask_tables"], class_sheet_pairs(cfg, plan))
        for file in figures:
            storage.upload_file(Path(tmp) / file, file)
    storage.write_bytes("report.md", report.render_report(metrics, figures).encode())
    # last: a metrics.json of these inputs marks the evaluation finished (`storage.finished`)
    storage.write_bytes(METRICS, (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    log.info("report written to %s", storage.join("report.md"))
    add_to_card(cfg, metrics, storage.join("report.md"))
    return metrics


def add_to_card(cfg: EvaluateConfig, metrics: dict, report_url: str) -> None:
    """The evaluation's headline figures into the dataset card of the synthetic output it evaluated; where that
    output cannot be written (read-only storage, no permission), a warning line, as the evaluation itself is whole."""
    lines = report.headline_lines(metrics)
    try:
        added = add_evaluation(open_storage(cfg.synthetic, cfg.s3_endpoint or None), lines, report_url)
    except (OSError, StorageError) as exc:
        log.warning("the dataset card of %s is unchanged, as it cannot be written there: %s", cfg.synthetic, exc)
        return
    if added:
        log.info("headline figures added to %s/README.md", cfg.synthetic.rstrip("/"))
