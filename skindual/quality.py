"""Measures of what a generator makes: mask sanity, image–mask consistency, class fidelity.

Pure numpy/torch on in-memory arrays (images uint8 N×H×W×3, masks uint8 N×H×W
with values 0/1), no I/O: generation's quality control and the evaluation job
both stand on these.

- `mask_check`: is a generated mask usable (non-empty, not full-frame, one main component)?
- `segment_lesion`: an independent, training-free segmentation of a lesion image (colour
  distance from the skin at the border, Otsu threshold, largest component, holes filled);
  Dice between it and a generated mask measures whether image and mask agree.
- `LesionClassifier` / `train_classifier` / `class_fidelity`: a small CNN trained on real
  images; its accuracy on generated images of each class says whether the class prompt is obeyed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn


MASK_SMOOTHING = 0.75
"""Default σ, in latent cells, of the Gaussian that smooths a decoded mask before its threshold
(`skindual.dual_pipeline.smooth_mask_logits`; generation's ``--mask-smoothing``)."""


@dataclass(frozen=True)
class MaskLimits:
    """Quality-control thresholds on a mask, as fractions of the image area."""

    min_area: float = 0.005  # smaller is "empty"
    max_area: float = 0.90  # larger is "full-frame"
    min_main_share: float = 0.90  # the largest component holds at least this share of the mask


def mask_check(mask: np.ndarray, limits: MaskLimits = MaskLimits()) -> str | None:
    """None when the mask is sane, else the reason it is not: "empty", "full-frame" or "fragmented"."""
    area = float(mask.mean())
    if area < limits.min_area:
        return "empty"
    if area > limits.max_area:
        return "full-frame"
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = np.bincount(labels.ravel())[1:]
        if sizes.max() / sizes.sum() < limits.min_main_share:
            return "fragmented"
    return None


def largest_component(mask: np.ndarray, fill_holes: bool = True) -> np.ndarray:
    """The mask's largest 4-connected component (holes filled): uint8 0/1."""
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros_like(mask, dtype=np.uint8)
    keep = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    if fill_holes:
        keep = ndimage.binary_fill_holes(keep)
    return keep.astype(np.uint8)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice overlap of two binary masks (1.0 when both are empty)."""
    a, b = a.astype(bool), b.astype(bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def otsu_threshold(values: np.ndarray, bins: int = 128) -> float:
    """The threshold that maximises between-class variance of a 1-D sample."""
    hist, edges = np.histogram(values, bins=bins)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres) / np.maximum(w0, 1)
    m1 = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(w1, 1)
    return float(centres[np.argmax(w0 * w1 * (m0 - m1) ** 2)])


def segment_lesion(image: np.ndarray, border: int = 4) -> np.ndarray:
    """A training-free lesion mask of one RGB image: uint8 0/1.

    The skin colour is the median of a ring just inside the image edge (inside
    the dermoscope's dark vignette corners); the lesion is what lies far from it
    by Otsu's threshold on the log colour distance, then its largest component.
    """
    img = image.astype(np.float32)
    h, w, _ = img.shape
    ring = np.zeros((h, w), bool)
    ring[border:-border, border:-border] = True
    ring[2 * border:-2 * border, 2 * border:-2 * border] = False
    skin = np.median(img[ring], axis=0)
    # log: a faint lesion (pearly bcc) and a dark one both stand clear of the skin's noise
    distance = np.log1p(np.linalg.norm(ndimage.uniform_filter(img, size=(3, 3, 1)) - skin, axis=-1))
    inside = np.zeros((h, w), bool)
    inside[border:-border, border:-border] = True  # the vignette corners are dark, not lesion
    mask = (distance > otsu_threshold(distance[inside])) & inside
    return largest_component(mask)


def consistency(images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per pair, Dice between the given mask and `segment_lesion` of the image."""
    return np.array([dice(segment_lesion(img), m) for img, m in zip(images, masks)])


class LesionClassifier(nn.Module):
    """A small CNN over 64×64 RGB lesion images (any size works: global pooling)."""

    def __init__(self, num_classes: int = 7, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(3, width), block(width, width * 2), block(width * 2, width * 4),
                                      block(width * 4, width * 4))
        self.head = nn.Linear(width * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


def images_to_tensor(images: np.ndarray, device: torch.device | str | None = None) -> torch.Tensor:
    """uint8 N×H×W×3 → float N×3×H×W in [-1, 1] (on `device`: moved there as uint8, then converted)."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    return (x.to(device) if device is not None else x).permute(0, 3, 1, 2).float().div(127.5).sub(1)


def _soften(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur of half the batch: a generator's samples are smoother than photographs, and the
    classifier should judge the class by its look (colour, shape, pattern), not by pixel-level grain."""
    k = int(torch.randint(1, 4, (), generator=g)) * 2 + 1
    blurred = F.avg_pool2d(x, k, stride=1, padding=k // 2, count_include_pad=False)
    pick = (torch.rand(len(x), generator=g) < 0.5)[:, None, None, None]
    return torch.where(pick, blurred, x)


def train_classifier(images: np.ndarray, labels: np.ndarray, steps: int = 200, batch_size: int = 64,
                     seed: int = 0, num_classes: int = 7) -> LesionClassifier:
    """Train on real images with class-balanced batches, flips and blur augmentation."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x, y = images_to_tensor(images), torch.as_tensor(labels, dtype=torch.long)
    counts = torch.bincount(y, minlength=num_classes).float()
    weights = (1.0 / counts.clamp(min=1))[y]
    model = LesionClassifier(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    model.train()
    for _ in range(steps):
        idx = torch.multinomial(weights, batch_size, replacement=True, generator=g)
        xb = x[idx]
        if torch.rand((), generator=g) < 0.5:
            xb = xb.flip(-1)
        if torch.rand((), generator=g) < 0.5:
            xb = xb.flip(-2)
        xb = _soften(xb, g)
        loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def classify(model: LesionClassifier, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    x = images_to_tensor(images)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)]).numpy()


def class_fidelity(model: LesionClassifier, images: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class index, the share of images the classifier assigns to the class they were made for."""
    return recall_by_class(classify(model, images), labels)


def recall_by_class(predicted: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Per class index in `labels`, the share of its items `predicted` as that class."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    return {int(c): float((predicted[labels == c] == c).mean()) for c in np.unique(labels)}


def pair_quality(images: np.ndarray, masks: np.ndarray, labels: np.ndarray,
                 classifier: LesionClassifier | None = None, limits: MaskLimits = MaskLimits()) -> dict:
    """The figures of a set of generated pairs: image–mask consistency, sane-mask share, class fidelity."""
    scores = consistency(images, masks)
    sane = np.array([mask_check(m, limits) is None for m in masks])
    out = {"pairs": int(len(images)), "consistency_dice": round(float(scores.mean()), 4),
           "sane_mask_share": round(float(sane.mean()), 4)}
    if classifier is not None:
        fidelity = class_fidelity(classifier, images, labels)
        out["class_fidelity"] = {int(k): round(v, 3) for k, v in fidelity.items()}
        out["class_fidelity_mean"] = round(float(np.mean(list(fidelity.values()))), 4)
    return out
