r"""Evaluate synthetic (image, mask) pairs against the real data: fidelity, mask statistics, downstream benefit.

    python jobs/evaluate.py --feature-extractor lesion-cnn          # demo table, ./skindual-synthetic, local Ray
    ray job submit -- python jobs/evaluate.py --real s3://bucket/table.parquet --synthetic s3://bucket/synthetic \
        --inception-weights /models/inception-2015-12-05.pt --seeds 5 --output s3://bucket/eval

Writes report.md, metrics.json and PNGs to --output.  FID/KID need clean-fid's Inception weights
(--inception-weights, or clean-fid's cache); --feature-extractor lesion-cnn measures offline, reported as FD_lesioncnn.
"""

from __future__ import annotations

import sys

from skindual.cli import init_ray, run_job
from skindual.demo_world import evaluate_defaults
from skindual.evaluate import EvaluateConfig, load_inputs, run_evaluate


def main(cfg: EvaluateConfig) -> None:
    cfg = evaluate_defaults(cfg)  # the embedded default: the demo world
    inputs = load_inputs(cfg)  # bad input fails here, before any cluster work
    if cfg.downstream:
        init_ray(min_cpus=2)
    metrics = run_evaluate(cfg, inputs)
    fid = metrics["fidelity"]
    value = fid["overall"][fid["fd_name"]]
    line = f"{fid['fd_name']} {'n/a' if value is None else f'{value:.2f}'}"
    for model, metric in (("classifier", "macro_f1"), ("segmenter", "dice")):
        if "downstream" in metrics:
            e = metrics["downstream"]["summary"][model][metric]
            line += f", {model} {metric} {e['real']['mean']:.3f} -> {e['real+synthetic']['mean']:.3f}"
    print(f"done: {line}; report at {cfg.output.rstrip('/')}/report.md")


if __name__ == "__main__":
    sys.exit(run_job(main, EvaluateConfig, __doc__))
