"""Ray Train overhead: steps/s of the fine-tuning job with 1 worker vs a plain single-process loop.

Both run `skindual.finetune.JointTrainer` on the same demo base, demo data, batch size and
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

from skindual import data
from skindual.cli import init_ray
from skindual.demo_world import prepare_demo_world
from skindual.finetune import FinetuneConfig, JointTrainer, load_batch, run_finetune, training_rows


def steady_rate(history: list[dict], warmup: int) -> float:
    times = [h["time"] for h in history[warmup:]]
    return (len(times) - 1) / (times[-1] - times[0])


def plain_loop(cfg: FinetuneConfig, rows, size: int, steps: int, warmup: int) -> float:
    torch.set_num_threads(1)  # what a Ray worker with 1 CPU gets (OMP_NUM_THREADS=1)
    trainer = JointTrainer(cfg, torch.device("cpu"))
    start = 0
    while trainer.step < steps:  # the same rows, read and decoded in-line as a plain loop does
        if start + cfg.batch_size > rows.num_rows:
            start = 0
        trainer.train_step(load_batch(rows.slice(start, cfg.batch_size).to_pydict(), size))
        start += cfg.batch_size
    return steady_rate(trainer.history, warmup)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    world = prepare_demo_world("skindual-demo", measure=False)
    with tempfile.TemporaryDirectory() as out:
        cfg = FinetuneConfig(training_table=str(world.training_table), output=out, name="bench", steps=args.steps,
                             batch_size=args.batch_size, checkpoint_every=args.steps, validation_per_class=1,
                             validation_steps=1)
        rows = training_rows(data.read_training_table(cfg.training_table), cfg.balance, cfg.seed)
        plain = plain_loop(cfg, rows, 64, args.steps, args.warmup)
        init_ray(min_cpus=2)
        started = time.time()
        result = run_finetune(cfg)
        with result.checkpoint.as_directory() as folder:
            history = json.loads(Path(folder, "progress.json").read_text())["history"]
    ray_rate = steady_rate(history, args.warmup)
    print(json.dumps({"plain_steps_per_s": round(plain, 3), "ray_steps_per_s": round(ray_rate, 3),
                      "ratio_ray_over_plain": round(ray_rate / plain, 3),
                      "ray_startup_s": round(history[0]["time"] - started, 1),
                      "steps": args.steps, "warmup_steps": args.warmup, "batch_size": args.batch_size}, indent=2))


if __name__ == "__main__":
    main()
