"""Why does real+synthetic not beat real on segmentation Dice? The segmenter arm with other synthetic masks.

On a finished demo run (``python jobs/demo.py --output RUN``), trains the evaluation's segmenter
(`skindual.downstream.train_model`, same settings as the demo's evaluation, here on pools held in
memory with uniform batches) on

- ``real``: the real train split alone (the baseline);
- ``real+synthetic`` with the synthetic masks as generated;
- ``real+synthetic`` with each synthetic mask replaced by `skindual.quality.segment_lesion` of its
  image: masks from an independent segmenter, aligned to the image by construction (its own Dice
  on the real test pairs is printed first, the quality of such labels);
- ``real+synthetic`` with the synthetic masks replaced by a disk (the masks' area, centred on their
  centroid): labels that only get position and size right;

and tests each on the run's downstream test set, mean ± std over ``--seeds``.

    python lab/downstream_masks.py --run skindual-demo-run --seeds 2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from skindual import quality
from skindual.demo.world import split_pairs
from skindual.downstream import (
    BenchmarkSettings,
    PairSet,
    build_model,
    test_model,
    train_model,
    uniform_batches,
)
from skindual.finetune import training_rows
from skindual.pairs import load_pairs, read_index, selection_of, usable_rows
from skindual.prompts import CLASS_CODES


def disk_like(mask: np.ndarray) -> np.ndarray:
    """A disk with the mask's area at its centroid."""
    ys, xs = np.nonzero(mask)
    if not len(ys):
        return mask
    yy, xx = np.mgrid[:mask.shape[0], :mask.shape[1]]
    return ((yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= len(ys) / np.pi).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output folder of jobs/demo.py")
    parser.add_argument("--real-fraction", type=float, default=1.0, help="the demo run's --real-fraction")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150, help="segmenter steps (the demo's --eval-steps)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    run = Path(args.run)
    suffix = "" if args.real_fraction >= 1 else f"-real{args.real_fraction:g}"
    rows = training_rows(read_index(str(run / "real")), args.real_fraction)
    loaded = load_pairs(str(run / "real"), selection_of(rows), args.size)
    train = PairSet.of(loaded)
    loaded = split_pairs(run / "real-test", "all", args.size)
    test = PairSet.of(loaded)
    index = read_index(str(run / f"synthetic{suffix}"))
    loaded = load_pairs(str(run / f"synthetic{suffix}"), selection_of(usable_rows(index)),
                        args.size)
    synthetic = PairSet.of(loaded)
    print(f"{len(train)} real train pairs, {len(synthetic)} synthetic, {len(test)} test")
    own = [quality.dice(quality.segment_lesion(i), m) for i, m in zip(test.images, test.masks)]
    print(f"segment_lesion on the real test pairs: Dice {np.mean(own):.3f}")
    variants = {
        "real": None,
        "real+synthetic, generated masks": synthetic,
        "real+synthetic, segment_lesion masks": PairSet(
            synthetic.images, np.stack([quality.segment_lesion(i) for i in synthetic.images]), synthetic.labels),
        "real+synthetic, disk masks": PairSet(
            synthetic.images, np.stack([disk_like(m) for m in synthetic.masks]), synthetic.labels),
    }
    settings = BenchmarkSettings("small", "unet", args.steps, 32, 1e-3)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    for name, extra in variants.items():
        pool = train if extra is None else PairSet.concat([train, extra])
        dice = []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            model = train_model(build_model("unet"), uniform_batches(pool, 32, seed), "segmenter", settings, seed, device)
            dice.append(test_model(model, test, "segmenter", CLASS_CODES, device)["dice"])
        print(f"{name:40s} Dice {np.mean(dice):.4f} ± {np.std(dice, ddof=1) if len(dice) > 1 else 0:.4f}",
              flush=True)


if __name__ == "__main__":
    main()
