"""Quality of fine-tuned joint models on the demo: consistency, sane masks, class fidelity, wall time.

For each variant (layout × LoRA rank or full UNet) the real fine-tuning job runs on the demo
data (embedded local Ray, CPU), then `--per-class` pairs per class are sampled from the adapter
and measured with `skindual.quality.pair_quality`: Dice between each generated mask and an
independent segmentation of its image, the share of sane masks, and the accuracy of a classifier
trained on real demo images on the samples of each class.

    python lab/finetune_quality.py --steps 400 --variants channels:lora:32 channels:full
    python lab/finetune_quality.py --steps 300 --lr 5e-4 --variants channels:lora:32 --set w_prior=10
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import fields
from pathlib import Path

import numpy as np

from skindual import quality
from skindual.cluster import init_ray
from skindual.demo.world import prepare_demo_world, split_pairs
from skindual.finetune import plan_finetune, run_finetune
from skindual.finetune_config import FinetuneConfig
from skindual.dual_pipeline import DualPipeline
from skindual.prompts import CLASSES, build_prompt, row_seed


def sample_pairs(dual: DualPipeline, per_class: int, steps: int, guidance: float, seed: int, batch: int = 28):
    prompts = [build_prompt(c.code) for c in CLASSES for _ in range(per_class)]
    labels = np.repeat([c.index for c in CLASSES], per_class)
    seeds = [row_seed(seed, i) for i in range(len(prompts))]
    images, masks = [], []
    for i in range(0, len(prompts), batch):
        out = dual(prompts[i:i + batch], seeds[i:i + batch], steps=steps, guidance=guidance)
        images.append(out.images)
        masks.append(out.masks)
    return np.concatenate(images), np.concatenate(masks), labels


def parse_fields(pairs: list[str]) -> dict:
    """["w_prior=10", "lr_schedule=constant"] → FinetuneConfig keyword arguments, typed by the field's default."""
    defaults = {f.name: f.default for f in fields(FinetuneConfig)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in defaults:
            raise SystemExit(f"--set {pair}: FinetuneConfig has no field {name!r}")
        kind = type(defaults[name])
        out[name] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--variants", nargs="+", default=["channels:lora:32", "side-by-side:lora:32"],
                        help="layout:train[:rank]")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE",
                        help="other FinetuneConfig fields for every variant, e.g. w_prior=10 ema_decay=0 lr_schedule=constant")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--sample-steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--output", default="", help="keep runs here (default: a temp folder)")
    args = parser.parse_args()

    extra = parse_fields(args.set)
    world = prepare_demo_world("skindual-demo", measure=False)
    train = split_pairs(world.real, "train", 64)
    classifier = quality.train_classifier(train["image"], train["class_index"])
    results = {"real_train_pairs": quality.pair_quality(train["image"], train["mask"], train["class_index"], classifier)}
    init_ray(min_cpus=3)  # the worker's 2 CPUs (torch threads) + 1 for Ray Data's loading tasks
    out = args.output or tempfile.mkdtemp()
    for variant in args.variants:
        layout, train, *rank = variant.split(":")
        cfg = FinetuneConfig(training_data=str(world.real), output=out, name=variant.replace(":", "_"),
                             layout=layout, train=train, lora_rank=int(rank[0]) if rank else 16, steps=args.steps,
                             batch_size=args.batch_size, lr=args.lr, checkpoint_every=args.steps, **extra,
                             validation_per_class=1, validation_steps=2, cpus_per_worker=2)
        started = time.time()
        run_finetune(plan_finetune(cfg))
        wall = time.time() - started
        dual = DualPipeline.from_pretrained("demo", adapter=Path(out, cfg.name, "adapter"))
        images, masks, labels = sample_pairs(dual, args.per_class, args.sample_steps, args.guidance, seed=1)
        results[variant] = quality.pair_quality(images, masks, labels, classifier) | {
            "finetune_wall_s": round(wall, 1), "steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
            **extra}
        print(json.dumps({variant: results[variant]}), flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
