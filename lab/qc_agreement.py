"""Does the QC segmenter judge synthetic pairs as well as real ones? Three masks of each image, compared.

For a set of pairs (a generation output, and a real dataset as the baseline): Dice between the pair's
own mask and the QC segmenter's mask of its image (what generation's --min-consistency checks), between
the pair's mask and a training-free segmentation (`quality.segment_lesion`), and between the two
segmenters.  If the QC segmenter and the training-free one agree on real images but not on synthetic
ones, the QC segmenter does not transfer to the generator's images, and its score under-rates them.

    python lab/qc_agreement.py --synthetic RUN/synthetic --real RUN/real-test --qc-segmenter RUN/qc
    python lab/qc_agreement.py ... --base demo-hard [--adapt RUN/real]

With ``--base`` it also scores the real pairs' images after a round trip through that base's VAE (its
decoder draws every generated image) against their true masks: what a perfectly consistent pair scores
under the QC segmenter once it has the generator's look.  With ``--adapt`` (a prepared real dataset) it
trains a second segmenter with the QC segmenter's settings (its card's width, steps, batch, lr, seed,
real fraction) on that dataset's train pairs plus their VAE round trips, and gives the same figures for
it: whether a judge that knows the decoder's look rates the synthetic pairs higher.

The last line is one JSON object: the three Dice means for each set and the synthetic/real ratio of
the segmenters' agreement (and, with ``--base``, ``real_round_trip_mask_vs_qc``; with ``--adapt``, the
``adapted`` segmenter's figures).
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from skindual import data, downstream, pairs, quality
from skindual.base_models import resolve_base_model
from skindual.demo.world import vae_round_trip
from skindual.demo.world import split_pairs
from skindual.model import load_pipeline
from skindual.qc_model import CARD, QCSegmenter
from skindual.storage import open_storage


def agreement(url: str, segmenter: QCSegmenter, size: int) -> dict:
    index = pairs.read_index(url)
    chosen = pairs.load_pairs(url, pairs.selection_of(pairs.usable_rows(index)), size)
    images, masks = chosen["image"], chosen["mask"]
    free = np.stack([quality.segment_lesion(image) for image in images])
    return {"pairs": len(images), "mask_vs_qc": float(segmenter.score(images, masks).mean()),
            "mask_vs_training_free": float(quality.consistency(images, masks).mean()),
            "qc_vs_training_free": float(segmenter.score(images, free).mean())}


def train_adapted(card: dict, real: str, vae, size: int) -> QCSegmenter:
    """A segmenter trained as the QC segmenter was (`card`), on `real`'s train pairs (the card's real
    fraction of each class) and the same pairs' images after a round trip through `vae`."""
    import torch

    cfg = card["config"]
    index = pairs.read_index(real)
    rows = data.fraction_per_class(data.classed_rows(pairs.usable_rows(index), "train"), cfg["real_fraction"],
                                   cfg["seed"])
    train = pairs.load_pairs(real, pairs.selection_of(rows), size)
    images = np.concatenate([train["image"], vae_round_trip(vae, train["image"])])
    masks, labels = np.concatenate([train["mask"]] * 2), np.concatenate([train["class_index"]] * 2)
    rng = np.random.default_rng(cfg["seed"])

    def batches():
        while True:
            pick = rng.integers(len(images), size=cfg["batch_size"])
            yield images[pick], masks[pick], labels[pick]

    settings = downstream.BenchmarkSettings(steps=cfg["steps"], batch_size=cfg["batch_size"], lr=cfg["lr"])
    model = downstream.train_model(downstream.SmallUNet(cfg["width"]), batches(), "segmenter", settings,
                                   cfg["seed"], torch.device("cpu"))
    return QCSegmenter(model.eval(), size, "adapted")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", required=True, help="a generation output (folder or s3://)")
    parser.add_argument("--real", required=True, help="a prepared real dataset, e.g. the demo's real-test")
    parser.add_argument("--qc-segmenter", required=True, help="the output of jobs/qc_model.py")
    parser.add_argument("--size", type=int, default=64, help="side the pairs are compared at")
    parser.add_argument("--base", default="", help="a base model (alias or folder) whose VAE round-trips the real pairs")
    parser.add_argument("--adapt", default="", help="with --base: a prepared real dataset to train the adapted "
                                                    "segmenter on (e.g. RUN/real)")
    args = parser.parse_args()
    if args.adapt and not args.base:
        parser.error("--adapt needs --base: the VAE whose round trips the adapted segmenter trains on")
    segmenter = QCSegmenter.load(args.qc_segmenter)
    vae = load_pipeline(resolve_base_model(args.base)).vae if args.base else None
    judges = {"qc": segmenter}
    if args.adapt:
        card = json.loads(open_storage(args.qc_segmenter).read_bytes(CARD))
        judges["adapted"] = train_adapted(card, args.adapt, vae, args.size)
    if vae is not None:  # the real pairs with their images round-tripped: consistent by construction, decoded
        real = split_pairs(args.real, "all", args.size)
        round_trip_pairs = vae_round_trip(vae, real["image"]), real["mask"]
    out = {}
    for judge, seg in judges.items():
        figures = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in agreement(url, seg, args.size).items()}
                   for name, url in (("synthetic", args.synthetic), ("real", args.real))}
        if vae is not None:
            figures["real_round_trip_mask_vs_qc"] = round(float(seg.score(*round_trip_pairs).mean()), 4)
        for name, f in figures.items():
            if isinstance(f, dict):
                print(f"{judge} on {name}: Dice(mask, QC) {f['mask_vs_qc']:.3f}, Dice(mask, training-free) "
                      f"{f['mask_vs_training_free']:.3f}, Dice(QC, training-free) {f['qc_vs_training_free']:.3f} "
                      f"({f['pairs']} pairs)")
        if vae is not None:
            print(f"{judge} on the real pairs' VAE round trips: Dice(mask, QC) {figures['real_round_trip_mask_vs_qc']:.3f}")
        ratio = figures["synthetic"]["qc_vs_training_free"] / figures["real"]["qc_vs_training_free"]
        out[judge] = {**figures, "ratio_segmenters_agreement_synthetic_over_real": round(ratio, 4)}
    print(json.dumps(out["qc"] | ({"adapted": out["adapted"]} if "adapted" in out else {})))


if __name__ == "__main__":
    main()
