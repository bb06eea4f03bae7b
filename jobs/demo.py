r"""The whole chain on one machine: demo data → fine-tune → generate → evaluate, with embedded defaults.

    python jobs/demo.py                                    # local Ray, demo data and base, ./skindual-demo-run
    python jobs/demo.py --finetune-steps 50 --per-class 10 --eval-steps 50 --seeds 1 --output /tmp/quick

Everything goes under --output: data/ (and training_table.parquet), data-test/ (a separate balanced
test set, test_table.parquet), runs/demo/ (checkpoints, adapter/), synthetic/ (shards), eval/
(report.md, metrics.json), demo_summary.json; with --real-fraction F below 1, the chain's own
training_table-realF.parquet, runs/demo-realF/, synthetic-realF/, eval-realF/, demo_summary-realF.json.
The fine-tuning settings are skindual.demo.DEMO_FINETUNE.  Re-running into the same --output reuses the data, resumes (or just
finishes) the fine-tuning run and skips committed shards; the evaluation runs again.
"""

from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo import DemoConfig, format_summary, run_demo


def main(cfg: DemoConfig) -> None:
    init_ray(min_cpus=cfg.min_cpus())
    summary = run_demo(cfg, progress=lambda line: print(line, flush=True))
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    sys.exit(run_job(main, DemoConfig, __doc__))
