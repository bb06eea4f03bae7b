"""Ray Train overhead: steps/s of the fine-tuning job with 1 worker vs a plain single-process loop.

Both run `skindual.joint_trainer.JointTrainer` on the same demo base, demo data, batch size and
settings, in the same process run; the Ray figure is the job's own per-step timestamps after
warm-up, start-up (Ray init, worker start, model load, first step) reported apart.

    python bench/finetune_overhead.py [--steps 60] [--warmup 10] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from skindual.cluster import init_ray
from skindual.demo.world import prepare_demo_world
from skindual.finetune import plan_finetune, run_finetune, training_rows, training_selection
from skindual.finetune_config import FinetuneConfig
from skindual.joint_trainer import JointTrainer
from skindual.pairs import local_batches, read_index


def steady_rate(history: list[dict], warmup: int) -> float:
    times = [h["time"] for h in history[warmup:]]
    return (len(times) - 1) / (times[-1] - times[0])


def plain_loop(cfg: FinetuneConfig, selection, size: int, steps: int, warmup: int) -> float:
    torch.set_num_threads(1)  # what a Ray worker with 1 CPU gets (OMP_NUM_THREADS=1)
    trainer = JointTrainer(cfg, torch.device("cpu"))
    while trainer.step < steps:  # the same pairs, read and decoded in-line as a plain loop does
        for batch in local_batches(cfg.training_data, selection, size, cfg.batch_size, cfg.seed):
            trainer.train_step(batch)
            if trainer.step >= steps:
                break
    return steady_rate(trainer.history, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    world = prepare_demo_world("skindual-demo", measure=False)
    with tempfile.TemporaryDirectory() as out:
        cfg = FinetuneConfig(training_data=str(world.real), output=out, name="bench", steps=args.steps,
                             batch_size=args.batch_size, checkpoint_every=args.steps, validation_per_class=1,
                             validation_steps=1)
        rows = training_rows(read_index(cfg.training_data))
        plain = plain_loop(cfg, training_selection(rows, cfg.balance, cfg.seed), 64, args.steps, args.warmup)
        init_ray(min_cpus=2)
        started = time.time()
        result = run_finetune(plan_finetune(cfg))
        with result.checkpoint.as_directory() as folder:
            history = json.loads(Path(folder, "progress.json").read_text())["history"]
    ray_rate = steady_rate(history, args.warmup)
    print(json.dumps({"plain_steps_per_s": round(plain, 3), "ray_steps_per_s": round(ray_rate, 3),
                      "ratio_ray_over_plain": round(ray_rate / plain, 3),
                      "ray_startup_s": round(history[0]["time"] - started, 1),
                      "steps": args.steps, "warmup_steps": args.warmup, "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    main()
