"""Pair quality ALONG fine-tuning: consistency, sane masks and class fidelity every K steps.

A plain single-process loop over `skindual.joint_trainer.JointTrainer` (the same model, loss and
optimiser step as the Ray Train job, without Ray's start-up), sampling `--per-class` pairs per
class from the EMA weights every `--every` steps (and at step 0 with `--step0`).  It is how
lab/notes/finetune-quality.md found out where class fidelity is lost.

    python lab/finetune_trajectory.py --steps 300 --every 100 --step0
    python lab/finetune_trajectory.py --steps 300 --set w_prior=10
    python lab/finetune_trajectory.py --steps 200 --set w_mask=0 w_geo=0    # the image branch alone
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import torch
from finetune_quality import parse_fields, sample_pairs

from skindual import quality
from skindual.demo.world import prepare_demo_world, split_pairs
from skindual.finetune import training_rows, training_selection
from skindual.finetune_config import FinetuneConfig
from skindual.joint_trainer import JointTrainer
from skindual.pairs import local_batches, read_index
from skindual.dual_pipeline import DualPipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100, help="measure every this many steps")
    parser.add_argument("--step0", action="store_true", help="also measure before the first step")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="FinetuneConfig fields (defaults: channels, LoRA r32, batch 16, lr 5e-4)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    world = prepare_demo_world("skindual-demo", measure=False)
    train = split_pairs(world.real, "train", 64)
    classifier = quality.train_classifier(train["image"], train["class_index"])
    cfg = FinetuneConfig(training_data=str(world.real), layout="channels", train="lora", lora_rank=32,
                         steps=args.steps, batch_size=16, lr=5e-4)
    cfg = replace(cfg, **parse_fields(args.set))
    print(json.dumps({"config": {k: getattr(cfg, k) for k in ("layout", "train", "lora_rank", "lr", "lr_schedule",
                                                                "ema_decay", "w_img", "w_mask", "w_geo", "w_prior",
                                                                "balance", "batch_size")}}), flush=True)
    trainer = JointTrainer(cfg, torch.device("cpu"))
    selection = training_selection(training_rows(read_index(cfg.training_data)), cfg.balance, cfg.seed)

    def measure() -> None:
        started = time.perf_counter()
        trainer.unet.eval()
        with trainer.ema_weights():
            pairs = sample_pairs(DualPipeline(trainer.pipe, cfg.layout), args.per_class, 25, 4.0, seed=1)
        trainer.unet.train()
        q = quality.pair_quality(*pairs, classifier)
        print(json.dumps({"step": trainer.step, "consistency": q["consistency_dice"], "sane": q["sane_mask_share"],
                          "fidelity": q["class_fidelity_mean"], "per_class": q["class_fidelity"],
                          "seconds": round(time.perf_counter() - started, 1)}), flush=True)

    if args.step0:
        measure()
    started, epoch = time.perf_counter(), 0
    while trainer.step < cfg.steps:
        epoch += 1
        for batch in local_batches(cfg.training_data, selection, 64, cfg.batch_size, cfg.seed + epoch):
            metrics = trainer.train_step(batch)
            if metrics is None:
                continue
            if trainer.step % 20 == 0:
                terms = " ".join(f"{k} {metrics[k]:.3f}" for k in ("total", "img", "mask", "geo", "prior"))
                print(f"step {trainer.step} {terms} {(time.perf_counter() - started) / trainer.step:.2f} s/step",
                      flush=True)
            if trainer.step % args.every == 0 or trainer.step == cfg.steps:
                measure()
            if trainer.step >= cfg.steps:
                break


if __name__ == "__main__":
    main()
