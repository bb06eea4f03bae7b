"""Mask-conditioned sampling (generate --mask-source) against joint sampling: the model's pairs/s, one process.

The same pipeline (the shipped demo adapter on its base unless ``--base``/``--adapter``), prompts, seeds, steps
and batch; joint draws the image and the mask, mask mode draws the image for given masks (discs at seeded
places and sizes, augmented as --mask-source augments a real mask), holding the mask latents at every step
and decoding only the image.  The two alternate ``--repeats`` times and the median batch time is taken, so
both see the same machine state.  Model time only: the job around it (shards, QC, Ray) is the same for both.

    python bench/mask_mode_throughput.py [--batch-size 7] [--batches 2] [--steps 25] [--repeats 3]

The last line is one JSON object: ``pairs_per_s`` of ``joint`` and ``mask``, and ``ratio`` (mask ÷ joint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from skindual.mask_source import augment_mask
from skindual.model import DualPipeline
from skindual.prompts import CLASS_CODES, build_prompt


def discs(count: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    out = []
    for i in range(count):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        radius = rng.uniform(0.12, 0.3) * size
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2).astype(np.uint8)
        out.append(augment_mask(disc, seed * 1000 + i))
    return np.stack(out)


def main() -> None:
    from skindual.demo.world import DEMO_ADAPTER  # the embedded default, as the jobs use it

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="demo")
    parser.add_argument("--adapter", default=str(DEMO_ADAPTER))
    parser.add_argument("--batch-size", type=int, default=7)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    pipe = DualPipeline.from_pretrained(args.base, args.adapter)
    n = args.batch_size
    prompts = [build_prompt(CLASS_CODES[i % len(CLASS_CODES)]) for i in range(n)]
    masks = [discs(n, pipe.resolution, b) for b in range(args.batches)]
    times: dict[str, list[float]] = {"joint": [], "mask": []}
    pipe(prompts, list(range(n)), steps=2)  # warm-up, not timed
    for _ in range(args.repeats):
        for mode in ("joint", "mask"):
            for b in range(args.batches):
                seeds = list(range(b * n, (b + 1) * n))
                start = time.perf_counter()
                sample = pipe(prompts, seeds, steps=args.steps, masks=masks[b] if mode == "mask" else None)
                times[mode].append(time.perf_counter() - start)
                if mode == "mask":
                    assert np.array_equal(sample.masks, masks[b])  # the given masks come back exact
    rates = {mode: round(n / statistics.median(t), 3) for mode, t in times.items()}
    print(f"joint {rates['joint']} pairs/s, mask mode {rates['mask']} pairs/s (batch {n}, {args.steps} steps, "
          f"{args.threads} thread(s), median of {len(times['joint'])} batches each)")
    print(json.dumps({"pairs_per_s": rates, "ratio": round(rates["mask"] / rates["joint"], 3), "batch": n,
                      "steps": args.steps, "threads": args.threads, "resolution": pipe.resolution,
                      "baseline": "joint"}))


if __name__ == "__main__":
    main()
