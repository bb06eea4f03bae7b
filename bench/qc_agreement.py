"""Does the QC segmenter judge synthetic pairs as well as real ones? Three masks of each image, compared.

For a set of pairs (a generation output, and a real dataset as the baseline): Dice between the pair's
own mask and the QC segmenter's mask of its image (what generation's --min-consistency checks), between
the pair's mask and a training-free segmentation (`quality.segment_lesion`), and between the two
segmenters.  If the QC segmenter and the training-free one agree on real images but not on synthetic
ones, the QC segmenter does not transfer to the generator's images, and its score under-rates them.

    python bench/qc_agreement.py --synthetic RUN/synthetic --real RUN/real-test --qc-segmenter RUN/qc

The last line is one JSON object: the three Dice means for each set and the synthetic/real ratio of
the segmenters' agreement.
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from skindual import pairs, quality
from skindual.qc_model import QCSegmenter


def agreement(url: str, segmenter: QCSegmenter, size: int) -> dict:
    index = pairs.read_index(url)
    chosen = pairs.load_pairs(url, pairs.selection_of(pairs.usable_rows(index)), size)
    images, masks = chosen["image"], chosen["mask"]
    free = np.stack([quality.segment_lesion(image) for image in images])
    return {"pairs": len(images), "mask_vs_qc": float(segmenter.score(images, masks).mean()),
            "mask_vs_training_free": float(quality.consistency(images, masks).mean()),
            "qc_vs_training_free": float(segmenter.score(images, free).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--synthetic", required=True, help="a generation output (folder or s3://)")
    parser.add_argument("--real", required=True, help="a prepared real dataset, e.g. the demo's real-test")
    parser.add_argument("--qc-segmenter", required=True, help="the output of jobs/qc_model.py")
    parser.add_argument("--size", type=int, default=64, help="side the pairs are compared at")
    args = parser.parse_args()
    segmenter = QCSegmenter.load(args.qc_segmenter)
    figures = {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in agreement(url, segmenter, args.size).items()}
               for name, url in (("synthetic", args.synthetic), ("real", args.real))}
    for name, f in figures.items():
        print(f"{name}: Dice(mask, QC) {f['mask_vs_qc']:.3f}, Dice(mask, training-free) "
              f"{f['mask_vs_training_free']:.3f}, Dice(QC, training-free) {f['qc_vs_training_free']:.3f} ({f['pairs']} pairs)")
    ratio = figures["synthetic"]["qc_vs_training_free"] / figures["real"]["qc_vs_training_free"]
    print(json.dumps({**figures, "ratio_segmenters_agreement_synthetic_over_real": round(ratio, 4)}))


if __name__ == "__main__":
    main()
