"""Diversity vs classifier-free guidance on a finished demo run.

Per class, the synthetic/real feature spread (`skindual.fidelity.feature_spread` in the lesion-cnn
space the evaluation uses, trained on the run's real train split) and class fidelity of
``--per-class`` samples, drawn with the run's adapter at each ``--guidance`` (4 is generation's
default).

    python jobs/demo.py --output RUN
    python lab/diversity_guidance.py --run RUN
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from skindual import fidelity, quality
from skindual.base_models import demo_base_path
from skindual.demo.world import split_pairs
from skindual.dual_pipeline import DualPipeline
from skindual.prompts import CLASSES, build_prompt

SITES = ("back", "lower extremity", "trunk", "face", "upper extremity", "abdomen")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output folder of jobs/demo.py")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.5, 4.0])
    parser.add_argument("--per-class", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    real = split_pairs(f"{args.run}/real", "train", 64)
    real_images, real_labels = real["image"], real["class_index"]
    extractor = fidelity.build_extractor("lesion-cnn", size=64, train=lambda: (real_images, real_labels), steps=300,
                                         seed=0)
    real = extractor(real_images)
    pipe = DualPipeline.from_pretrained(demo_base_path(), f"{args.run}/runs/demo/adapter")
    prompts, seeds, labels = [], [], []
    for c in CLASSES:
        for i in range(args.per_class):
            prompts.append(build_prompt(c.code, SITES[i % len(SITES)], 30 + 5 * (i % 9), ("male", "female")[i % 2]))
            seeds.append(7000 + 100 * c.index + i)
            labels.append(c.index)
    labels = np.array(labels)
    for guidance in args.guidance:
        images = np.concatenate([pipe(prompts[i:i + 42], seeds[i:i + 42], steps=25, guidance=guidance).images
                                 for i in range(0, len(prompts), 42)])
        synthetic = extractor(images)
        ratios = {c.code: fidelity.feature_spread(synthetic[labels == c.index])
                  / fidelity.feature_spread(real[real_labels == c.index]) for c in CLASSES}
        fid = quality.class_fidelity(extractor.model, images, labels)
        print(f"guidance {guidance}: spread ratio " + " ".join(f"{c} {r:.2f}" for c, r in ratios.items())
              + f", mean {np.mean(list(ratios.values())):.2f}; class fidelity {np.mean(list(fid.values())):.3f}",
              flush=True)


if __name__ == "__main__":
    main()
