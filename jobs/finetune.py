r"""Fine-tune the joint image–mask model with Ray Train (LoRA on SD-2 attention + widened convs).

    python jobs/finetune.py                                   # demo data + demo base, local Ray, ./skindual-runs
    python jobs/finetune.py --train controlnet --name cn      # a ControlNet that draws the image for a given mask
    ray job submit -- python jobs/finetune.py --training-data s3://bucket/real \
        --base-model s3://bucket/models/sd2-base --num-workers 8 --use-gpu --output s3://bucket/runs

Re-running with the same --output and --name resumes from the last checkpoint, as Ray Train does by itself
after a lost worker (--max-failures).  Stage the base model once with jobs/stage_base.py.
"""

from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo.world import finetune_defaults
from skindual.finetune import plan_finetune, run_finetune
from skindual.finetune_config import FinetuneConfig


def main(cfg: FinetuneConfig) -> None:
    cfg = finetune_defaults(cfg)  # the embedded default: the demo world
    plan = plan_finetune(cfg)  # the data, the base model, the output and the run's settings checked before Ray
    adapter = f"{cfg.output.rstrip('/')}/{cfg.name}/adapter"
    if plan.done is not None:
        print(f"already done: step {plan.done['training_config']['steps']}, adapter at {adapter}")
        return
    init_ray(min_cpus=int(cfg.num_workers * cfg.cpus_per_worker) + 1)
    result = run_finetune(plan)
    print(f"done: step {result.metrics.get('step')}, adapter at {adapter}")


if __name__ == "__main__":
    sys.exit(run_job(main, FinetuneConfig, __doc__))
