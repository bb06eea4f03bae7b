"""The downstream benchmark's models and measures: do synthetic pairs help a classifier and a segmenter?

Two arms, ``real`` and ``real+synthetic``, train the same model from the same seeded
initialisation with the same step budget and batch size, each step on the next batch of the arm's
pairs (the evaluation streams them from storage through a shuffle buffer); both are tested on the same
held-out real pairs.  `summarise` gives mean ± std over seeds and the gain.  How the hybrid arm uses
the synthetic pairs is its recipe (`HYBRIDS`, `arm_stages`):

- ``pretrain``: two schedules of the step budget each, the hybrid arm's first on the synthetic pairs
  and its second on the real ones; the real arm runs the same two schedules, both on the real pairs,
  so both arms take the same optimiser steps.  The best recipe for segmentation measured on the demo
  worlds (docs/demo.md, "The levers for segmentation").
- ``mix``: one schedule on the pool of real and synthetic pairs (the synthetic share of a batch is its
  share of the pool).

Models: ``resnet18`` (torchvision, ``weights=None``) or ``small`` (`skindual.quality.LesionClassifier`)
for the classifier — accuracy, macro-F1 (over the classes present in the test split) and per-class
recall; ``unet`` (`SmallUNet`, below), ``smp_unet`` (segmentation_models_pytorch's ``Unet`` with a ResNet-18
encoder, ``encoder_weights=None``: the stock U-Net users train; the side must be a multiple of 32) or
``fcn_resnet50`` (torchvision, ``weights=None, weights_backbone=None``) for the segmenter — per-image Dice and
IoU, averaged.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from skindual.quality import LesionClassifier, images_to_tensor

ARMS = ("real", "real+synthetic")
HYBRIDS = ("pretrain", "mix")


def arm_stages(arm: str, hybrid: str, real: Any, synthetic: Any) -> list[list[Any]]:
    """The pools one arm trains on, one schedule of the step budget each (see the module's docstring)."""
    if hybrid not in HYBRIDS:
        raise ValueError(f"hybrid recipe {hybrid!r}: one of {', '.join(HYBRIDS)}")
    if hybrid == "mix":
        return [[real]] if arm == "real" else [[real, synthetic]]
    return [[real], [real]] if arm == "real" else [[synthetic], [real]]
CLASSIFIERS = ("resnet18", "small")
SEGMENTERS = ("unet", "smp_unet", "fcn_resnet50")


@dataclass(frozen=True)
class BenchmarkSettings:
    classifier: str = "resnet18"
    segmenter: str = "unet"
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    num_classes: int = 7
    ignore_maps: bool = True  # the segmenter leaves the pixels of a pair's ignore map out of its loss


@dataclass
class PairSet:
    """uint8 images N×S×S×3, masks N×S×S (0/1), class indices N."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @staticmethod
    def of(loaded: dict) -> PairSet:
        """The pairs of `pairs.load_pairs` (or the demo's `split_pairs`): its images, masks and class indices."""
        return PairSet(loaded["image"], loaded["mask"], loaded["class_index"])

    @staticmethod
    def concat(sets: Sequence[PairSet]) -> PairSet:
        return PairSet(*(np.concatenate([getattr(s, f) for s in sets]) for f in ("images", "masks", "labels")))


class SmallUNet(nn.Module):
    """A compact U-Net: `depth` 2×downsampling stages of two 3×3 conv-BN-ReLU, mirrored with skips."""

    def __init__(self, width: int = 16, depth: int = 3):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(True))

        widths = [width * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([block(3, widths[0])] + [block(widths[i], widths[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(depth)])
        self.merge = nn.ModuleList([block(2 * widths[i], widths[i]) for i in range(depth)])
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            x = self.merge[i](torch.cat([self.up[i](x), skips.pop()], 1))
        return self.head(x)


class _FCN(nn.Module):
    def __init__(self):
        super().__init__()
        from torchvision.models.segmentation import fcn_resnet50

        self.net = fcn_resnet50(weights=None, weights_backbone=None, num_classes=1, aux_loss=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)["out"]


def build_model(kind: str, num_classes: int = 7) -> nn.Module:
    """A freshly initialised model of `CLASSIFIERS` or `SEGMENTERS`."""
    if kind == "resnet18":
        from torchvision.models import resnet18

        return resnet18(weights=None, num_classes=num_classes)
    if kind == "small":
        return LesionClassifier(num_classes)
    if kind == "unet":
        return SmallUNet()
    if kind == "smp_unet":
        import segmentation_models_pytorch as smp

        return smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=1)
    if kind == "fcn_resnet50":
        return _FCN()
    raise ValueError(f"unknown model {kind!r}")


def segmentation_loss(logits: torch.Tensor, masks: torch.Tensor, ignore: torch.Tensor | None = None) -> torch.Tensor:
    """Binary cross-entropy over the pixels not in `ignore` (N×1×H×W, 1: left out), averaged over those pixels."""
    if ignore is None:
        return F.binary_cross_entropy_with_logits(logits, masks)
    keep = 1 - ignore
    per_pixel = F.binary_cross_entropy_with_logits(logits, masks, reduction="none")
    return (per_pixel * keep).sum() / keep.sum().clamp_min(1)


def train_model(model: nn.Module, batches: Iterator[tuple[np.ndarray, ...]], task: str,
                settings: BenchmarkSettings, seed: int, device: torch.device) -> nn.Module:
    """`settings.steps` AdamW steps (cosine decay), each on the next of `batches` (uint8 images, 0/1
    masks, class indices, and optionally 0/1 ignore maps) with random flips; with ``settings.ignore_maps``
    the segmenter's loss leaves out the ignored pixels (`segmentation_loss`)."""
    g = torch.Generator().manual_seed(seed)
    model = model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, settings.steps)
    for _ in range(settings.steps):
        images, masks, labels, *rest = next(batches)
        x = images_to_tensor(images, device)
        y = (torch.from_numpy(labels) if task == "classifier" else torch.from_numpy(masks).float()[:, None]).to(device)
        ignore = (torch.from_numpy(rest[0]).float()[:, None].to(device)
                  if task == "segmenter" and rest and settings.ignore_maps and rest[0].any() else None)
        for dim in (-1, -2):
            if torch.rand((), generator=g) < 0.5:
                x = x.flip(dim)
                y = y.flip(dim) if task == "segmenter" else y
                ignore = ignore.flip(dim) if ignore is not None else None
        out = model(x)
        loss = F.cross_entropy(out, y) if task == "classifier" else segmentation_loss(out, y, ignore)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


def train_schedules(model: nn.Module, schedules: Iterable[Iterator[tuple[np.ndarray, ...]]], task: str,
                    settings: BenchmarkSettings, seed: int, device: torch.device) -> nn.Module:
    """`train_model` once per schedule, in order (each with a fresh optimiser and cosine decay): an arm's
    `arm_stages`, each stage's batches one iterator."""
    for batches in schedules:
        model = train_model(model, batches, task, settings, seed, device)
    return model


def uniform_batches(pool: PairSet, batch_size: int, seed: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Endless batches drawn uniformly with replacement from a pool held in memory."""
    g = torch.Generator().manual_seed(seed)
    while True:
        idx = torch.randint(len(pool), (batch_size,), generator=g).numpy()
        yield pool.images[idx], pool.masks[idx], pool.labels[idx]


@torch.no_grad()
def _predict(model: nn.Module, images: np.ndarray, device: torch.device, batch: int = 128) -> torch.Tensor:
    return torch.cat([model(images_to_tensor(images[i:i + batch], device)).cpu() for i in range(0, len(images), batch)])


def classifier_metrics(predicted: np.ndarray, labels: np.ndarray, class_codes: Sequence[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 over the classes present in `labels`, and recall of each of those classes.

    From the confusion matrix (F1 of a class nobody predicted is 0), as torchmetrics' multiclass
    F1/recall with ``average=None, zero_division=0`` compute them (tests compare the two).
    """
    n = len(class_codes)
    p, t = np.asarray(predicted, np.int64), np.asarray(labels, np.int64)
    confusion = np.bincount(t * n + p, minlength=n * n).reshape(n, n)  # rows: true, columns: predicted
    hits, support, called = np.diag(confusion), confusion.sum(1), confusion.sum(0)
    f1 = np.divide(2 * hits, support + called, out=np.zeros(n), where=support + called > 0)
    present = np.flatnonzero(support)
    return {"accuracy": float((p == t).mean()), "macro_f1": float(f1[present].mean()),
            "per_class_recall": {class_codes[c]: float(hits[c] / support[c]) for c in present}}


def segmenter_metrics(predicted: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """Per-image Dice and IoU (1 when both masks are empty), averaged over the images."""
    p, m = predicted.astype(bool).reshape(len(masks), -1), masks.astype(bool).reshape(len(masks), -1)
    inter, a, b = (p & m).sum(1), p.sum(1), m.sum(1)
    union = a + b - inter
    dice = np.where(a + b > 0, 2 * inter / np.maximum(a + b, 1), 1.0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 1.0)
    return {"dice": float(dice.mean()), "iou": float(iou.mean())}


def test_model(model: nn.Module, test: PairSet, task: str, class_codes: Sequence[str],
               device: torch.device) -> dict[str, Any]:
    """The trained model's figures on the test set (`classifier_metrics` or `segmenter_metrics`)."""
    out = _predict(model, test.images, device)
    if task == "classifier":
        return classifier_metrics(out.argmax(1).numpy(), test.labels, class_codes)
    return segmenter_metrics((out[:, 0] > 0).numpy(), test.masks)


METRICS = {"classifier": ("accuracy", "macro_f1"), "segmenter": ("dice", "iou")}


def summarise(results: list[dict[str, Any]]) -> dict[str, dict[str, dict]]:
    """model → metric → {arm: {mean, std, n}, gain: mean(real+synthetic) − mean(real)}; recall per class too."""
    summary: dict[str, dict[str, dict]] = {}
    for task, names in METRICS.items():
        rows = [r for r in results if r["model"] == task]
        codes = sorted({c for r in rows for c in r.get("per_class_recall", {})})
        for name in [*names, *(f"recall_{c}" for c in codes)]:
            entry: dict[str, Any] = {}
            for arm in ARMS:
                values = [r[name] if not name.startswith("recall_") else r["per_class_recall"].get(name[7:])
                          for r in rows if r["arm"] == arm]
                values = np.array([v for v in values if v is not None], np.float64)
                entry[arm] = {"mean": float(values.mean()) if len(values) else None,
                              "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0, "n": len(values)}
            if all(entry[a]["mean"] is not None for a in ARMS):
                entry["gain"] = entry["real+synthetic"]["mean"] - entry["real"]["mean"]
            summary.setdefault(task, {})[name] = entry
    return summary
