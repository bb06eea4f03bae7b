"""How hard a demo world is, and where its demo base loses the classes.

On a demo world built by ``python jobs/build_demo.py [--difficulty hard] --output WORLD``:

1. headroom: a small U-Net segmenter and the small classifier trained on the low-data regime's real train
   pairs (``--real-fraction``, default 0.2; 150 steps, batch 32, as the demo's downstream arms), tested
   on the world's balanced test set (all of ``WORLD/real-test``), ``--seeds`` seeds;
2. the demo base: a lesion-cnn classifier trained on the real train split, its accuracy on the real test
   images (the baseline) and on the same images after a round trip through the base's VAE, and the
   class confusion of the base's own samples (24 a class, 25 steps, guidance 4).

    python bench/hard_world.py --world WORLD [--base demo-hard] [--real-fraction 0.2] [--seeds 2]

The last line is one JSON object: ``segmenter_dice`` and ``macro_f1`` (mean over seeds), the classifier's
``real_accuracy`` and ``vae_round_trip_accuracy``, their ratio, and ``base_fidelity`` per class.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from skindual import data, downstream, pairs
from skindual.base_models import resolve_base_model
from skindual.demo_world import measure_base, split_pairs
from skindual.prompts import CLASS_CODES


def headroom(world: str, fraction: float, seeds: int) -> dict:
    index = pairs.read_index(f"{world}/real")
    ok = pairs.usable_rows(index)
    rows = data.fraction_per_class(data.classed_rows(ok, "train"), fraction, 0)
    train = pairs.load_pairs(f"{world}/real", pairs.selection_of(rows), 64)
    test = split_pairs(f"{world}/real-test", "all", 64)  # the demo's balanced test set: all of it
    train_set = downstream.PairSet(train["image"], train["mask"], train["class_index"])
    test_set = downstream.PairSet(test["image"], test["mask"], test["class_index"])
    settings = downstream.BenchmarkSettings("small", "unet", 150, 32, 1e-3)
    dice, f1 = [], []
    for seed in range(seeds):
        for kind, model, out in (("segmenter", "unet", dice), ("classifier", "small", f1)):
            torch.manual_seed(seed)
            trained = downstream.train_model(downstream.build_model(model),
                                             downstream.uniform_batches(train_set, 32, seed), kind, settings, seed,
                                             torch.device("cpu"))
            result = downstream.test_model(trained, test_set, kind, CLASS_CODES, torch.device("cpu"))
            out.append(result["dice" if kind == "segmenter" else "macro_f1"])
    return {"train_pairs": len(train_set), "test_pairs": len(test_set), "segmenter_dice_per_seed": dice,
            "macro_f1_per_seed": f1, "segmenter_dice": float(np.mean(dice)), "macro_f1": float(np.mean(f1))}


def base_losses(world: str, base: str) -> dict:
    """The demo base's figures as `jobs/build_demo.py` measures them (`demo_world.measure_base`: 24 samples a
    class, 25 steps, guidance 4), under this bench's names."""
    m = measure_base(resolve_base_model(base), Path(world, "real"), 24, 25, 4.0, 0)
    return {"real_accuracy": m["classifier_real_accuracy"], "vae_round_trip_accuracy": m["vae_round_trip_accuracy"],
            "ratio_round_trip_over_real": m["vae_round_trip_accuracy"] / m["classifier_real_accuracy"],
            **{k: m[k] for k in ("vae_round_trip_class_recall", "vae_round_trip_class_recall_mean",
                                 "base_confusion_rows_prompted_cols_predicted")},
            "base_fidelity": m["base_class_fidelity"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a folder written by jobs/build_demo.py")
    parser.add_argument("--base", default="", help="demo base alias (default: the world's: demo or demo-hard)")
    parser.add_argument("--real-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    world = json.loads(open(f"{args.world}/demo_world.json").read())
    base = args.base or ("demo-hard" if world.get("difficulty") == "hard" else "demo")
    figures = {"difficulty": world.get("difficulty", "easy"), "base": base, "real_fraction": args.real_fraction,
               **headroom(args.world, args.real_fraction, args.seeds), **base_losses(args.world, base)}
    print(json.dumps(figures, indent=1))
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in figures.items()
                      if k in ("difficulty", "segmenter_dice", "macro_f1", "real_accuracy", "vae_round_trip_accuracy",
                               "ratio_round_trip_over_real", "vae_round_trip_class_recall_mean", "base_fidelity")}))


if __name__ == "__main__":
    main()
