"""How much of a demo world's classes its demo base's VAE keeps, and whether more VAE training keeps more.

A lesion-cnn classifier is trained on the world's real train split (as the class-fidelity figure's); its
mean per-class recall on the world's balanced test set (``WORLD/real-test``) is measured on the real
images (the baseline), after a round trip through the base's VAE, and after the same round trip once the
VAE is trained further on the base's pretraining images (``jobs/build_demo.py``'s recipe: lesions of
``--difficulty``, 300 a class, images and masks alike, L1 + MSE), in two arms from the same start:

- ``plain``: the recipe's loss, ``--steps`` more steps;
- ``colour``: the same plus ``--colour-weight`` × L1 between the images average-pooled ``--pool`` ×
  ``--pool`` (their low frequencies: the lesion's colour, which tells the classes apart, rather than the
  hair, which dominates a pixel loss);
- ``wide`` (with ``--arms``): a VAE of the base's config with wider blocks (``--wide-channels``), freshly
  initialised (with ``--wide-groups``, another GroupNorm group count), trained as ``colour`` with
  ``--wide-lr``: what more capacity buys;
- ``lesion`` (with ``--arms``): the same fresh VAE trained as ``wide`` plus ``--lesion-weight`` × the colour
  term restricted to the lesion (``lesion_colour_loss``): whether a loss that weighs the lesion's colour
  rather than the whole image's keeps the classes (``--lesion-smooth``: on a Gaussian low band rather
  than on the latent's 4 × 4 cells, ``low_band``).

    python bench/vae_round_trip.py --world WORLD [--base demo-hard] [--steps 1500] [--colour-weight 4] [--pool 4]
    python bench/vae_round_trip.py --world WORLD --arms wide --wide-channels 64,64,128
    python bench/vae_round_trip.py --world WORLD --arms lesion --wide-channels 32,32,64 --lesion-weight 8

Before any training it also measures where the class information sits, against the same classifier:
the real images average-pooled to the latent's grid (``--pool``, the VAE's downsampling) and scaled back
(``pooled_recall``: what a latent that kept only each cell's mean colour could give), and the shipped
VAE's round trip with its low frequencies (the same pooling, bilinear back) swapped for the real image's
(``swap_low_recall``) and the other way round (``swap_high_recall``): which band the round trip loses.

What a round trip costs the rest of the image is measured too, for the shipped VAE and each arm
(``image_quality``): PSNR, the energy of the high band (image minus its Gaussian low band: hair, marks,
borders) over the real images' (``high_band_energy``, 1: as sharp) and its correlation with theirs
(``high_band_corr``), and ``blockiness``, the mean jump between neighbouring pixels across the latent
cells' borders over the same inside the cells (real images: 1.0; above 1: a grid shows).

Progress lines every ``--every`` steps; the last line is one JSON object: the recall on real images, the
shipped VAE's, each arm's after its steps (and its best on the way), each over the real images' recall
(``ratio_*``), the image-quality figures, the seconds per VAE step and the VAE's parameters.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from skindual import quality
from skindual.base_models import resolve_base_model
from skindual.demo_data import render_batch
from skindual.demo_model import (DEMO_RESOLUTION, PretrainRecipe, fresh_vae, lesion_colour_loss, low_band,
                                 vae_batch_loss, vae_round_trip, warmup_cosine)
from skindual.demo_world import split_pairs
from skindual.model import load_pipeline, mask_to_image


def recall(classifier, images: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(list(quality.class_fidelity(classifier, images, labels).values())))


def band_swaps(real: np.ndarray, round_trip: np.ndarray, pool: int) -> dict[str, np.ndarray]:
    """uint8 images: `real` pooled `pool` × `pool` and scaled back (nearest); `round_trip` with the low band
    (pooled, bilinear back) of `real`; `real` with the low band of `round_trip`."""
    import torch.nn.functional as F

    def tensor(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()

    def uint8(x):
        return x.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def low(x):
        return F.interpolate(F.avg_pool2d(x, pool), scale_factor=pool, mode="bilinear")

    x, r = tensor(real), tensor(round_trip)
    return {"pooled": uint8(F.interpolate(F.avg_pool2d(x, pool), scale_factor=pool, mode="nearest")),
            "swap_low": uint8(r - low(r) + low(x)), "swap_high": uint8(x - low(x) + low(r))}


def image_quality(real: np.ndarray, round_trip: np.ndarray, pool: int) -> dict[str, float]:
    """uint8 images: the round trip's high band against the real one's, and its blockiness at `pool`."""
    def tensor(images):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255

    def high(x):
        return x - low_band(x, pool, smooth=True)

    def blockiness(x):
        jumps = (x[..., 1:] - x[..., :-1]).abs().mean((0, 1, 2))  # between column j and j + 1
        across = jumps[pool - 1::pool]
        inside = torch.cat([jumps[i::pool] for i in range(pool - 1)])
        return float(across.mean() / inside.mean())

    x, r = tensor(real), tensor(round_trip)
    hx, hr = high(x), high(r)
    return {"psnr_db": round(float(-10 * torch.log10((x - r).pow(2).mean())), 2),
            "high_band_energy": round(float(hr.pow(2).mean() / hx.pow(2).mean()), 4),
            "high_band_corr": round(float((hx * hr).sum() / (hx.norm() * hr.norm())), 4),
            "blockiness": round((blockiness(r) + blockiness(r.transpose(-1, -2))) / 2, 4)}


def wide_vae(base: str, channels: list[int], groups: int = 0):
    """A freshly initialised VAE of the base's config with other block widths and, with `groups`, another
    GroupNorm group count (the rebuild's `fresh_vae`)."""
    config = dict(load_pipeline(resolve_base_model(base)).vae.config)
    if groups:
        config["norm_num_groups"] = groups
    return fresh_vae({"vae": config}, channels, seed=0)[0]


def train_arm(vae, data: torch.Tensor, args, colour_weight: float, lr: float, evaluate,
              lesion: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """`--steps` VAE steps (the recipe's optimiser, batch and schedule); with `lesion` (images, masks), each
    step adds `--lesion-weight` × `lesion_colour_loss` on a second batch of those images."""
    recipe = PretrainRecipe()
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = warmup_cosine(opt, args.steps)
    curve, start = [], time.perf_counter()
    vae.train()
    for step in range(1, args.steps + 1):
        loss = vae_batch_loss(vae, data, recipe.vae_batch_size, g, colour_weight, args.pool)
        if lesion is not None:
            loss = loss + args.lesion_weight * lesion_colour_loss(vae, *lesion, recipe.vae_batch_size, g, args.pool,
                                                                  args.lesion_smooth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % args.every == 0 or step == args.steps:
            vae.eval()
            curve.append((step, round(evaluate(vae), 4)))
            vae.train()
            print(f"colour weight {colour_weight:g}: step {step}/{args.steps} loss {loss.item():.4f} "
                  f"round-trip recall {curve[-1][1]:.3f}", flush=True)
    vae.eval()
    return {"final": curve[-1][1], "best": max(r for _, r in curve), "curve": curve, "vae": vae,
            "s_per_step": (time.perf_counter() - start) / args.steps,
            "parameters": sum(p.numel() for p in vae.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", required=True, help="a folder written by jobs/build_demo.py")
    parser.add_argument("--base", default="", help="demo base alias (default: the world's: demo or demo-hard)")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--colour-weight", type=float, default=4.0)
    parser.add_argument("--pool", type=int, default=4)
    parser.add_argument("--every", type=int, default=250)
    parser.add_argument("--arms", default="plain,colour", help="comma-separated: plain, colour, wide, lesion; '' for the measurements before training only")
    parser.add_argument("--wide-channels", default="64,64,128", help="the wide arm's block widths")
    parser.add_argument("--wide-lr", type=float, default=1e-3)
    parser.add_argument("--lesion-weight", type=float, default=8.0,
                        help="the lesion arm's weight of the lesion-masked colour term (lesion_colour_loss)")
    parser.add_argument("--lesion-smooth", action="store_true",
                        help="the lesion arm's colour term on a Gaussian low band instead of the latent's 4 x 4 cells")
    parser.add_argument("--wide-groups", type=int, default=0,
                        help="the wide arm's GroupNorm groups (0: the base's; fewer groups normalise over more channels)")
    parser.add_argument("--per-class", type=int, default=PretrainRecipe.per_class,
                        help="pretraining lesions a class to train on (the recipe's by default)")
    args = parser.parse_args()
    arms = [name for name in args.arms.split(",") if name]
    if set(arms) - {"plain", "colour", "wide", "lesion"}:
        parser.error(f"--arms {args.arms}: give a comma-separated list of plain, colour, wide, lesion (or '' for none)")
    world = json.loads(open(f"{args.world}/demo_world.json").read())
    difficulty = world.get("difficulty", "easy")
    base = args.base or ("demo-hard" if difficulty == "hard" else "demo")

    train = split_pairs(f"{args.world}/real", "train", DEMO_RESOLUTION)
    classifier = quality.train_classifier(train["image"], train["class_index"], seed=0)
    test = split_pairs(f"{args.world}/real-test", "all", DEMO_RESOLUTION)
    labels = test["class_index"]

    def evaluate(vae) -> float:
        with torch.no_grad():
            return recall(classifier, vae_round_trip(vae, test["image"]), labels)

    real = recall(classifier, test["image"], labels)
    with torch.no_grad():
        shipped_trip = vae_round_trip(load_pipeline(resolve_base_model(base)).vae, test["image"])
    shipped = recall(classifier, shipped_trip, labels)
    bands = {f"{name}_recall": round(recall(classifier, images, labels), 4)
             for name, images in band_swaps(test["image"], shipped_trip, args.pool).items()}
    shipped_quality = image_quality(test["image"], shipped_trip, args.pool)
    print(f"recall on real test images {real:.3f}, after the shipped VAE's round trip {shipped:.3f}; "
          + ", ".join(f"{k} {v:.3f}" for k, v in bands.items()) + f"; its image quality {shipped_quality}", flush=True)
    if arms:
        images, masks, _ = render_batch(args.per_class, seed=10_000, size=DEMO_RESOLUTION, difficulty=difficulty)
        image_tensor = quality.images_to_tensor(images)
        data = torch.cat([image_tensor, mask_to_image(masks)])
        lesion = (image_tensor, torch.from_numpy(masks))

    def start(name: str):
        if name in ("wide", "lesion"):
            return wide_vae(base, [int(c) for c in args.wide_channels.split(",")], args.wide_groups)
        return load_pipeline(resolve_base_model(base)).vae

    results = {name: train_arm(start(name), data, args, 0.0 if name == "plain" else args.colour_weight,
                               args.wide_lr if name in ("wide", "lesion") else args.lr, evaluate,
                               lesion if name == "lesion" else None) for name in arms}
    figures = {"difficulty": difficulty, "base": base, "test_pairs": len(labels), "steps": args.steps,
               "colour_weight": args.colour_weight, "pool": args.pool, "real_recall": round(real, 4),
               "shipped_round_trip_recall": round(shipped, 4), "ratio_shipped": round(shipped / real, 4), **bands,
               "lesion_weight": args.lesion_weight, "lesion_smooth": args.lesion_smooth,
               "shipped_image_quality": shipped_quality}
    for name, arm in results.items():
        with torch.no_grad():
            quality_of_arm = image_quality(test["image"], vae_round_trip(arm["vae"], test["image"]), args.pool)
        print(f"{name}: image quality after {args.steps} steps {quality_of_arm}", flush=True)
        figures |= {f"{name}_round_trip_recall": arm["final"], f"{name}_best": arm["best"],
                    f"ratio_{name}": round(arm["final"] / real, 4), f"{name}_curve": arm["curve"],
                    f"{name}_s_per_step": round(arm["s_per_step"], 3), f"{name}_parameters": arm["parameters"],
                    f"{name}_image_quality": quality_of_arm}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
