r"""Train the consistency-QC segmenter on the real data: generation's --qc-segmenter.

    python jobs/qc_model.py                                              # the demo world's real data, ./skindual-qc
    ray job submit --working-dir . -- python jobs/qc_model.py --training-data s3://bucket/real \
        --size 128 --steps 3000 --use-gpu --output s3://bucket/qc/v1
    ray job submit --working-dir . -- python jobs/generate.py ... --qc-segmenter s3://bucket/qc/v1 --min-consistency 0.85

A small U-Net (Ray Train, one worker) on the usable pairs of the train split; writes
segmenter.safetensors and segmenter.json (settings, Dice on the val split, the weights' sha256).
"""

from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo.world import qc_defaults
from skindual.qc_model import QCModelConfig, plan_qc_model, run_qc_model


def main(cfg: QCModelConfig) -> None:
    cfg = qc_defaults(cfg)  # the embedded default: the demo world
    plan = plan_qc_model(cfg)  # the training data and the output checked before Ray starts
    card = plan.done
    if card is None:
        init_ray(min_cpus=int(cfg.cpus_per_worker) + 1)
        card = run_qc_model(plan)
    dice = card["val_dice"]
    print(f"{'done' if plan.done is None else 'already done'}: QC segmenter at {cfg.output.rstrip('/')} "
          f"({card['train_pairs']} train pairs, val Dice {'n/a' if dice is None else f'{dice:.3f}'} on "
          f"{card['val_pairs']} pairs)")


if __name__ == "__main__":
    sys.exit(run_job(main, QCModelConfig, __doc__))
