"""Does the image follow a given mask?  Mask mode (generate --mask-source) against the fine-tune that made the model.

A plain single-process fine-tune (`JointTrainer`, as lab/finetune_trajectory.py) of the demo chain's settings with
`--set` changes (e.g. ``mask_condition_rate=0.5``), measured before training (the step-0 model: the widened base,
its mask inputs zero), every `--every` steps, and for the shipped demo adapter: images sampled for the real test
split's masks, each augmented as generate --mask-source does, scored by the Dice between the given mask and an
independent segmentation of the image (`quality.consistency`), and, as the control, the same images against the
masks of other images (a model that ignores the mask scores alike on both).

    python lab/mask_following.py --steps 300 --every 100 --set mask_condition_rate=0.5
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace

import numpy as np
import torch
from finetune_quality import parse_fields

from skindual import quality
from skindual.demo.chain import DEMO_FINETUNE
from skindual.demo.world import DEMO_ADAPTER, prepare_demo_world, split_pairs, world_base
from skindual.finetune import training_rows, training_selection
from skindual.finetune_config import FinetuneConfig
from skindual.joint_trainer import JointTrainer
from skindual.mask_source import augment_mask
from skindual.dual_pipeline import DualPipeline
from skindual.pairs import local_batches, read_index
from skindual.prompts import CLASS_CODES, build_prompt


def following(pipe: DualPipeline, masks: np.ndarray, labels: np.ndarray, steps: int = 25) -> dict:
    prompts = [build_prompt(CLASS_CODES[c]) for c in labels]
    images = np.concatenate([pipe(prompts[i:i + 16], list(range(i, min(i + 16, len(prompts)))), steps=steps,
                                  masks=masks[i:i + 16]).images for i in range(0, len(prompts), 16)])
    given = quality.consistency(images, masks)
    others = quality.consistency(images, np.roll(masks, 1, axis=0))
    return {"given_mask": round(float(given.mean()), 4), "other_mask": round(float(others.mean()), 4),
            "mask_hold": pipe.mask_hold}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=100)
    parser.add_argument("--pairs", type=int, default=48, help="test masks sampled for")
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    parser.add_argument("--output", default="skindual-demo")
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args()
    torch.set_num_threads(2)
    world = prepare_demo_world(args.output, measure=False, difficulty=args.difficulty)
    test = split_pairs(world.real, "test", 64)
    pick = np.random.default_rng(0).choice(len(test["mask"]), min(args.pairs, len(test["mask"])), replace=False)
    masks = np.stack([augment_mask(test["mask"][i], 1000 + int(i)) for i in pick])
    labels = test["class_index"][pick]
    if args.difficulty == "easy":
        shipped = DualPipeline.from_pretrained(world.base_model, DEMO_ADAPTER)
        print(json.dumps({"model": "shipped demo adapter", **following(shipped, masks, labels)}), flush=True)
    cfg = FinetuneConfig(training_data=str(world.real), base_model=world_base(args.difficulty),
                         **{**DEMO_FINETUNE, "steps": args.steps})
    cfg = replace(cfg, **parse_fields(args.set))
    trainer = JointTrainer(cfg, torch.device("cpu"))
    selection = training_selection(training_rows(read_index(cfg.training_data)), cfg.balance, cfg.seed)

    def measure() -> None:
        started = time.perf_counter()
        trainer.unet.eval()
        with trainer.ema_weights():
            pipe = DualPipeline(trainer.pipe, cfg.layout)
            pipe.mask_hold = "clean" if cfg.mask_condition_rate else "noised"
            figures = following(pipe, masks, labels)
        trainer.unet.train()
        print(json.dumps({"step": trainer.step, **figures, "seconds": round(time.perf_counter() - started, 1)}),
              flush=True)

    measure()
    epoch = 0
    while trainer.step < cfg.steps:
        epoch += 1
        for batch in local_batches(cfg.training_data, selection, 64, cfg.batch_size, cfg.seed + epoch):
            if trainer.train_step(batch) is not None and (trainer.step % args.every == 0 or trainer.step == cfg.steps):
                measure()
            if trainer.step >= cfg.steps:
                break


if __name__ == "__main__":
    main()
