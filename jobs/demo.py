r"""The whole chain on one machine: demo data → fine-tune → QC segmenter → generate → evaluate, with embedded defaults.

    python jobs/demo.py                                    # local Ray, demo data and base, ./skindual-demo-run
    python jobs/demo.py --finetune-steps 50 --per-class 10 --eval-steps 50 --seeds 1 --output /tmp/quick

By default a ControlNet is fine-tuned on the real pairs and draws each synthetic image for a real train mask,
augmented, so that every image follows its mask; --pairs joint fine-tunes LoRA to sample image and mask
together instead (the shipped demo adapter's recipe).  The fine-tuning settings are
skindual.demo.chain.DEMO_CONTROLNET and DEMO_FINETUNE.

Everything goes under --output: data/ and real/ (the procedural data and its prepared dataset), data-test/
and real-test/ (a separate balanced test set), runs/demo/ (checkpoints, adapter/), qc/ (the QC segmenter),
qc-pilot/ (the scored pilot draw that sets the automatic --min-consistency), synthetic/ (shards), eval/
(report.md, metrics.json), demo_summary.json; with --real-fraction F below 1, the chain's own
runs/demo-realF/, qc-realF/, synthetic-realF/, eval-realF/, demo_summary-realF.json; with --pairs joint,
runs/demo-joint/, synthetic-joint/, eval-joint/, demo_summary-joint.json.  Re-running into the same --output
keeps what each stage finished with the same settings and inputs, and resumes an unfinished fine-tune and
unfinished shards.
"""
from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.demo.chain import DemoConfig, format_summary, run_demo


def main(cfg: DemoConfig) -> None:
    # the local cluster starts with the first stage that has work left: a finished demo's rerun starts none
    summary = run_demo(cfg, progress=lambda line: print(line, flush=True),
                       start_ray=lambda: init_ray(min_cpus=cfg.min_cpus()))
    print(format_summary(summary), flush=True)


if __name__ == "__main__":
    sys.exit(run_job(main, DemoConfig, __doc__))
