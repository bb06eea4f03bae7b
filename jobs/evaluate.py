r"""Evaluate synthetic (image, mask) pairs against the real data: fidelity, mask statistics, downstream benefit.

    python jobs/evaluate.py --feature-extractor lesion-cnn          # the demo world's data, ./skindual-synthetic, local Ray
    ray job submit -- python jobs/evaluate.py --real s3://bucket/real --synthetic s3://bucket/synthetic \
        --inception-weights s3://bucket/models/inception-2015-12-05.pt --actors 8 --seeds 5 --output s3://bucket/eval

Streams every pair from storage: features and mask statistics in an actor pool, the downstream
models in Ray tasks that read their own pairs.  Writes report.md, metrics.json, PNGs and
features/*.parquet (every pair's features and figures) to --output; a rerun of the same inputs and
settings into it keeps them (--recompute evaluates again).  FID/KID need clean-fid's
Inception weights (--inception-weights, or clean-fid's cache); --feature-extractor lesion-cnn
measures offline, reported as FD_lesioncnn.
"""

from __future__ import annotations

import math
import sys

from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo.world import evaluate_defaults
from skindual.evaluate import run_evaluate
from skindual.evaluate_plan import EvaluateConfig, plan_evaluate


def main(cfg: EvaluateConfig) -> None:
    cfg = evaluate_defaults(cfg)  # the embedded default: the demo world
    plan = plan_evaluate(cfg)  # bad input fails here, before any cluster work
    metrics = plan.done  # a rerun of the same inputs and settings keeps the report
    if metrics is None:
        init_ray(min_cpus=max(2, math.ceil(cfg.actors * cfg.cpus_per_actor) + 1))
        metrics = run_evaluate(plan)
    fid = metrics["fidelity"]
    value = fid["overall"][fid["fd_name"]]
    line = f"{fid['fd_name']} {'n/a' if value is None else f'{value:.2f}'}"
    for model, metric in (("classifier", "macro_f1"), ("segmenter", "dice")):
        if "downstream" in metrics:
            e = metrics["downstream"]["summary"][model][metric]
            line += f", {model} {metric} {e['real']['mean']:.3f} -> {e['real+synthetic']['mean']:.3f}"
    if "downstream" in metrics:
        line += f" (hybrid: {metrics['downstream']['settings'].get('hybrid', 'mix')})"
    print(f"{'done' if plan.done is None else 'already done'}: {line}; report at {cfg.output.rstrip('/')}/report.md")


if __name__ == "__main__":
    sys.exit(run_job(main, EvaluateConfig, __doc__))
