"""The evaluation's downstream benchmark: one Ray task per (arm, model, seed), each streaming its pairs
from the real dataset (and the synthetic shards) at ``--size`` and tested on the real test split (or
``--test-data``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from skindual import downstream, pairs
from skindual.cli import worker_setup
from skindual.cluster import reserved_device
from skindual.downstream import ARMS, PairSet, arm_stages
from skindual.evaluate_plan import EvaluateConfig, EvaluatePlan, Source
from skindual.prompts import CLASS_CODES

log = logging.getLogger(__name__)


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
    metrics = downstream.test_model(model, PairSet.of(loaded), task, CLASS_CODES, device)
    used = {id(s): s for pool in stages for s in pool}.values()
    return {"arm": arm, "model": task, "architecture": kind, "seed": seed, "train_pairs": sum(len(s) for s in used),
            "schedules": len(stages),
            "test_pairs": len(loaded["key"]), "seconds": round(time.perf_counter() - started, 1), **metrics}


@dataclass(frozen=True)
class PendingBenchmark:
    """The benchmark's tasks, submitted (`start_benchmark`): `finish_benchmark` waits for their rows."""

    settings: downstream.BenchmarkSettings
    hybrid: str
    size: int
    gpus: float
    schedules: int
    futures: list


def start_benchmark(cfg: EvaluateConfig, plan: EvaluatePlan, gpus: float = 0.0) -> PendingBenchmark:
    """Submit every (arm, model, seed) as one Ray task (`gpus` each) on the current cluster, and return at once:
    they need neither the feature extractor nor the feature pass, so they run beside them."""
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
    return PendingBenchmark(settings, cfg.hybrid, cfg.size, gpus, len(stages["real"]), futures)


def finish_benchmark(pending: PendingBenchmark) -> dict[str, Any]:
    """The submitted tasks' rows, in (model, arm, seed) order, and their summary."""
    import ray

    results = ray.get(pending.futures)
    return {"settings": asdict(pending.settings) | {"size": pending.size, "num_gpus_per_task": pending.gpus,
                                                    "hybrid": pending.hybrid, "schedules": pending.schedules},
            "results": results, "summary": downstream.summarise(results)}

