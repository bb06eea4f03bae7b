r"""Generate a class-balanced synthetic set of (image, mask) pairs as WebDataset shards.

    python jobs/generate.py --per-class 20                 # the demo: its ControlNet and QC segmenter, its world's masks
    ray job submit -- python jobs/generate.py --per-class 5000 --adapter s3://bucket/runs/finetune/adapter \
        --actors 8 --num-gpus-per-actor 1 --accelerator-type A10G --output s3://bucket/synthetic
    python jobs/generate.py --per-class df=5000,vasc=4000 ...  # top up only the rare classes
    python jobs/generate.py --per-class 20 --mask-source REAL --controlnet runs/cn/adapter   # images for real masks
    python jobs/generate.py --per-class 20 --adapter JOINT --controlnet runs/cn/adapter       # the joint model's masks
    python jobs/generate.py --per-class 20 --mask-source REAL --controlnet runs/cn/adapter --qc-segmenter QC \
        --segmenter-guidance 5                             # each image nudged towards its mask by the QC segmenter

Re-running into the same --output skips the committed shards; other settings need --overwrite.
Ray workers read S3 credentials from their own environment (instance role or AWS_* variables); on a
cluster of several nodes the outputs go to s3://.  The adapter names its base model (stage it once with
jobs/stage_base.py); --num-gpus-per-actor -1 resolves from the GPU nodes the autoscaler can launch.
"""

from __future__ import annotations

import math
import sys

from skindual.card import update_license
from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo.world import generate_defaults
from skindual.generate import plan_generate, run_generate
from skindual.generate_config import GenerateConfig


def main(cfg: GenerateConfig) -> None:
    cfg = generate_defaults(cfg)  # the embedded default: the shipped demo ControlNet and QC segmenter, the world's masks
    plan = plan_generate(cfg)  # the model, the adapter, the QC segmenter and the output checked before Ray starts
    manifest = plan.done
    if manifest is not None:  # done; a new --license still reaches its manifest and card
        manifest = update_license(plan.storage, manifest, cfg.license)
    else:
        init_ray(min_cpus=math.ceil(cfg.actors * cfg.cpus_per_actor) + 1)
        manifest = run_generate(plan)
    totals = manifest["totals"]
    per_class = ", ".join(f"{c}={n['ok']}" for c, n in sorted(totals["per_class"].items()))
    print(f"{'done' if plan.done is None else 'already done'}: {totals['successes']} pairs in {totals['shards']} "
          f"shards ({per_class}) at {cfg.output.rstrip('/')}")


if __name__ == "__main__":
    sys.exit(run_job(main, GenerateConfig, __doc__))
