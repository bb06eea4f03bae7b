r"""Fine-tune the joint image–mask model with Ray Train (LoRA on SD-2 attention + widened convs).

    python jobs/finetune.py                                   # demo data + demo base, local Ray, ./skindual-runs
    ray job submit -- python jobs/finetune.py --training-data s3://bucket/real \
        --base-model s3://bucket/models/sd2-base --num-workers 8 --use-gpu --output s3://bucket/runs

Re-running with the same --output and --name resumes from the last checkpoint, as Ray Train does by itself
after a lost worker (--max-failures).  Stage the base model once with jobs/stage_base.py.
"""

from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo_world import finetune_defaults
from skindual.finetune import FinetuneConfig, base_geometry, run_finetune


def main(cfg: FinetuneConfig) -> None:
    cfg = finetune_defaults(cfg)  # the embedded default: the demo world
    base_geometry(cfg.base_model, cfg.s3_endpoint or None)  # a base model that is not there: one line, before Ray
    init_ray(min_cpus=int(cfg.num_workers * cfg.cpus_per_worker) + 1)
    result = run_finetune(cfg)
    print(f"done: step {result.metrics.get('step')}, adapter at {cfg.output.rstrip('/')}/{cfg.name}/adapter")


if __name__ == "__main__":
    sys.exit(run_job(main, FinetuneConfig, __doc__))
