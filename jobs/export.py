"""Export synthetic shards (optionally merged with the real pairs) as an nnU-Net v2 raw dataset, a Decathlon-style
dataset for MONAI or an ImageFolder tree.

    python jobs/export.py --synthetic skindual-synthetic --output nnUNet_raw                # Dataset501_SkinDualGen
    python jobs/export.py --format msd --synthetic skindual-synthetic --output skindual-msd  # Task501_SkinDualGen
    python jobs/export.py --format imagefolder --with-real s3://bucket/real --synthetic s3://bucket/synthetic \
        --output s3://bucket/imagefolder

Plain I/O, no cluster needed: shards are read through skindual.shards.read_shards (local or s3://), each
verified against its _stats.json first.
"""

from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.export import ExportConfig, plan_export, run_export


def main(cfg: ExportConfig) -> None:
    plan = plan_export(cfg)
    summary = plan.done or run_export(plan)
    where = summary.get("dataset", cfg.output.rstrip("/"))
    print(f"{'done' if plan.done is None else 'already done'}: {summary['format']} export of {summary['counts']} at {where}")


if __name__ == "__main__":
    sys.exit(run_job(main, ExportConfig, __doc__))
