"""How much could any synthetic set add downstream at the demo's equal steps?  The ceiling of issue 36's targets.

On a finished demo run with ``--real-fraction`` below 1 (``python jobs/demo.py --difficulty hard --real-fraction
0.2 --output RUN``), trains the evaluation's models (`skindual.downstream`: the small classifier, the small U-Net,
its settings, the pretrain recipe: a schedule on the extra set, then one on the real cut; the real arm runs both on
the real cut) in this process, on pools held in memory, with these extra sets:

- ``synthetic``: the run's synthetic pairs (the generator's, as evaluated);
- ``oracle``: real train pairs the cut left out, class-balanced to the synthetic set's counts (drawn with
  replacement, seeded): what a perfect generator would add, new lesions with exact masks;
- ``oracle through the VAE``: the same pairs, each image encoded and decoded by the world's base VAE (the decoder's
  look, the masks exact): a perfect generator of this base.

Each is tested on the run's balanced test set, mean ± std over ``--seeds``; the real arm's figures beside them.
No ignore maps in any arm (the evaluation's synthetic arm uses them), so the rows compare with each other.

    python lab/downstream_ceiling.py --run RUN --real-fraction 0.2 --difficulty hard --seeds 3
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from skindual.demo.world import split_pairs, vae_round_trip, world_base
from skindual.downstream import (BenchmarkSettings, PairSet, arm_stages, build_model, test_model, train_schedules,
                                 uniform_batches)
from skindual.finetune import training_rows
from skindual.model import load_pipeline
from skindual.pairs import load_pairs, read_index, selection_of, usable_rows
from skindual.prompts import CLASS_CODES


def pair_set(url: str, rows, size: int) -> PairSet:
    loaded = load_pairs(url, selection_of(rows), size)
    return PairSet.of(loaded)


def balanced_like(pool: PairSet, counts: np.ndarray, seed: int) -> PairSet:
    """`counts[c]` pairs of each class c drawn with replacement from `pool` (seeded)."""
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(pool.labels == c), n) for c, n in enumerate(counts) if n])
    return PairSet(pool.images[idx], pool.masks[idx], pool.labels[idx])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output folder of jobs/demo.py")
    parser.add_argument("--real-fraction", type=float, required=True, help="the demo run's --real-fraction (< 1)")
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"], help="the run's world")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=150, help="steps per schedule (the demo's --eval-steps)")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    started = time.perf_counter()
    run, suffix = Path(args.run), f"-real{args.real_fraction:g}"
    index = read_index(str(run / "real"))
    cut = training_rows(index, args.real_fraction)
    whole = training_rows(index, 1.0)
    left_out = whole.filter(pc.invert(pc.is_in(whole.column("key"), cut.column("key"))))
    real = pair_set(str(run / "real"), cut, args.size)
    spare = pair_set(str(run / "real"), left_out, args.size)
    test = PairSet.of(split_pairs(run / "real-test", "all", args.size))
    synthetic_url = str(run / f"synthetic{suffix}")
    synthetic = pair_set(synthetic_url, usable_rows(read_index(synthetic_url)), args.size)
    counts = np.bincount(synthetic.labels, minlength=len(CLASS_CODES))
    oracle = balanced_like(spare, counts, 0)
    vae = load_pipeline(world_base(args.difficulty)).vae.eval()
    decoded = PairSet(vae_round_trip(vae, oracle.images), oracle.masks, oracle.labels)
    print(f"real cut {len(real)} pairs {np.bincount(real.labels, minlength=len(CLASS_CODES)).tolist()}, left out {len(spare)} "
          f"{np.bincount(spare.labels, minlength=len(CLASS_CODES)).tolist()}, synthetic {len(synthetic)} {counts.tolist()}, "
          f"test {len(test)}", flush=True)
    settings = BenchmarkSettings("small", "unet", args.steps, 32, 1e-3, ignore_maps=False)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows: dict[str, dict[str, list]] = {}
    for name, extra in {"real only (both schedules)": None, "+ synthetic (the run's)": synthetic,
                        "+ oracle (left-out real, balanced)": oracle, "+ oracle through the VAE": decoded}.items():
        stages = arm_stages("real" if extra is None else "real+synthetic", "pretrain", real, extra)
        figures: dict[str, list] = {"macro_f1": [], "dice": [], "recall_df": [], "recall_akiec": []}
        for seed in range(args.seeds):
            for task in ("classifier", "segmenter"):
                torch.manual_seed(seed)
                kind = settings.classifier if task == "classifier" else settings.segmenter
                schedules = (uniform_batches(PairSet.concat(pool), 32, seed + 1000 * k) for k, pool in enumerate(stages))
                model = train_schedules(build_model(kind), schedules, task, settings, seed, device)
                got = test_model(model, test, task, CLASS_CODES, device)
                if task == "classifier":
                    figures["macro_f1"].append(got["macro_f1"])
                    figures["recall_df"].append(got["per_class_recall"]["df"])
                    figures["recall_akiec"].append(got["per_class_recall"]["akiec"])
                else:
                    figures["dice"].append(got["dice"])
        rows[name] = figures
        line = "  ".join(f"{k} {np.mean(v):.3f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.3f}" for k, v in figures.items())
        print(f"{name:38s} {line}", flush=True)
    print(f"{time.perf_counter() - started:.0f} s")
    print(json.dumps({name: {k: [round(x, 4) for x in v] for k, v in f.items()} for name, f in rows.items()}))


if __name__ == "__main__":
    main()
