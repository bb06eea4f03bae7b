"""Mask-conditioned sampling (generate --mask-source) against joint sampling: the model's pairs/s, one process.

The same pipeline (the shipped demo adapter on its base unless ``--base``/``--adapter``), prompts, seeds, steps
and batch; joint draws the image and the mask, mask mode draws the image for given masks (discs at seeded
places and sizes, augmented as --mask-source augments a real mask), holding the mask latents at every step
and decoding only the image.  The two alternate ``--repeats`` times and the median batch time is taken, so
both see the same machine state.  Model time only: the job around it (shards, QC, Ray) is the same for both.

    python bench/mask_mode_throughput.py [--batch-size 7] [--batches 2] [--steps 25] [--repeats 3]
    python bench/mask_mode_throughput.py --sd2-width 1 --dtype bf16 --batch-size 8   # SD-2-base's size, on a GPU

``--sd2-width W`` samples with SD-2-base's architecture built in code at 1/W width (random weights, the bare
base widened for the mask: throughput does not depend on the weights) at 512², on the GPU when there is one.

The last line is one JSON object: ``pairs_per_s`` of ``joint`` and ``mask``, and ``ratio`` (mask ÷ joint).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from skindual.mask_source import augment_mask
from skindual.dual_pipeline import DualPipeline
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
    parser.add_argument("--sd2-width", type=int, default=0,
                        help="SD-2-base's architecture at 1/W width instead of --base/--adapter (1: its real size)")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]

    if args.sd2_width:
        import tempfile

        from skindual.sd2 import save_sd2_pipeline

        tmp = tempfile.TemporaryDirectory(prefix="skindual-sd2-")
        base = save_sd2_pipeline(Path(tmp.name) / "sd2-base", "base", width=args.sd2_width)
        pipe = DualPipeline.from_pretrained(base, device=device, dtype=dtype)
    else:
        pipe = DualPipeline.from_pretrained(args.base, args.adapter, device=device, dtype=dtype)
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
                if device == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - start)
                if mode == "mask":
                    assert np.array_equal(sample.masks, masks[b])  # the given masks come back exact
    rates = {mode: round(n / statistics.median(t), 3) for mode, t in times.items()}
    print(f"joint {rates['joint']} pairs/s, mask mode {rates['mask']} pairs/s (batch {n}, {args.steps} steps, "
          f"{args.threads} thread(s), median of {len(times['joint'])} batches each)")
    print(json.dumps({"pairs_per_s": rates, "ratio": round(rates["mask"] / rates["joint"], 3), "batch": n,
                      "steps": args.steps, "threads": args.threads, "resolution": pipe.resolution,
                      "model": f"sd2-base/{args.sd2_width}" if args.sd2_width else args.base, "dtype": args.dtype,
                      "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "baseline": "joint"}))


if __name__ == "__main__":
    main()
