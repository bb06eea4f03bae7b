r"""Fine-tune the joint image–mask model with Ray Train (LoRA on SD-2 attention + widened convs).

    python jobs/finetune.py                                   # demo data + demo base, local Ray, ./skindual-runs
    ray job submit -- python jobs/finetune.py --training-table s3://.../table.parquet \
        --base-model stabilityai/stable-diffusion-2-base --num-workers 8 --use-gpu --output s3://bucket/runs

Re-running with the same --output and --name resumes from the last checkpoint.
"""

from __future__ import annotations

import sys

from skindual.cli import init_ray, run_job
from skindual.demo_world import finetune_defaults
from skindual.finetune import FinetuneConfig, run_finetune


def main(cfg: FinetuneConfig) -> None:
    cfg = finetune_defaults(cfg)  # the embedded default: the demo world
    init_ray(min_cpus=int(cfg.num_workers * cfg.cpus_per_worker) + 1)
    result = run_finetune(cfg)
    print(f"done: step {result.metrics.get('step')}, adapter at {cfg.output.rstrip('/')}/{cfg.name}/adapter")


if __name__ == "__main__":
    sys.exit(run_job(main, FinetuneConfig, __doc__))
