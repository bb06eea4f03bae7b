"""Pictures of a run: validation grid (image | mask overlay per class) and the loss curve.

The evaluation job's figures grow here too.  matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from skindual.prompts import CLASSES, build_prompt, row_seed


def overlay(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0), alpha: float = 0.45) -> np.ndarray:
    """The image with the mask tinted on top and its outline drawn."""
    from scipy import ndimage

    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    edge = m & ~ndimage.binary_erosion(m)
    out[edge] = colour
    return out.astype(np.uint8)


def pair_grid(rows: list[list[tuple[np.ndarray, np.ndarray]]], scale: int = 2) -> Image.Image:
    """A grid with one row per list: each pair shown as image | overlay, 2 px gaps."""
    cells = max(len(r) for r in rows)
    h, w = rows[0][0][0].shape[:2]
    gap = 2
    canvas = np.full((len(rows) * (h + gap), cells * (2 * w + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, (image, mask) in enumerate(row):
            y, x = i * (h + gap), j * (2 * w + gap)
            canvas[y:y + h, x:x + w] = image
            canvas[y:y + h, x + w:x + 2 * w] = overlay(image, mask)
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def validation_grid(dual, per_class: int, steps: int, seed: int, path: str | Path, guidance: float = 4.0) -> None:
    """Sample `per_class` pairs of every class with a `DualPipeline` and save the grid PNG."""
    prompts = [build_prompt(c.code) for c in CLASSES for _ in range(per_class)]
    seeds = [row_seed(seed, 10**9 + i) for i in range(len(prompts))]
    sample = dual(prompts, seeds, steps=steps, guidance=guidance)
    rows = [[(sample.images[c * per_class + k], sample.masks[c * per_class + k]) for k in range(per_class)]
            for c in range(len(CLASSES))]
    pair_grid(rows).save(path)


def loss_curve(history: list[dict], path: str | Path) -> None:
    """Each loss term against the optimiser step (log scale), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history]
    for term in ("total", "img", "mask", "geo", "prior"):
        values = [h.get(term, 0.0) for h in history]  # "prior": runs from before that term have none
        if any(values):
            ax.plot(steps, values, label=term, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
