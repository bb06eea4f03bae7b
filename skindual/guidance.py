"""Segmenter guidance: an image drawn for a given mask is nudged, while it is sampled, towards one in which a
segmenter reads that mask (``jobs/generate.py --segmenter-guidance N``, with a ControlNet and a
``--qc-segmenter``).

At a few steps of the denoising loop (`GUIDED_AT`: shares of the steps, where the lesion's outline is set but its
texture is not yet), the step's predicted clean latents x̂0 are refined by N Adam steps (`LR`) on the segmenter's
binary cross-entropy against the pair's mask, through the VAE decoder; the next latents move by
√ᾱ_prev · (x̂0′ − x̂0), as DDIM's own update would have with the refined x̂0.  The steps after it are the model's
own: they put the class's texture back on the outline the guidance set.  Each sample's loss is its own (summed,
not averaged over the batch) and Adam is element-wise, so a sample's image does not depend on its batch.

What it does to the pairs is measured in ``lab/notes/pair-diagnosis.md`` (a held-out judge of another
architecture, "Segmenter guidance").  The segmenter that guides is the QC segmenter: its consistency scores of
guided pairs are no longer an independent check (the judge is), though a pair it still disagrees with is drawn
again as before.  Pure model code: no Ray, no storage.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

GUIDED_AT = (0.5, 0.7)
"""Shares of the sampling steps after which the predicted clean latents are refined (step ⌊share·steps⌉)."""
LR = 0.05
"""Adam's step size on the latents (unit variance: SD's scaled latents)."""


class SegmenterGuidance:
    """Refines predicted clean latents so that `segmenter` (images N×3×`size`² in [-1, 1] → mask logits) reads
    the given masks in their decoded images (see the module's docstring)."""

    def __init__(self, segmenter: torch.nn.Module, size: int, steps: int, lr: float = LR,
                 at: tuple[float, ...] = GUIDED_AT, batch: int = 4):
        if steps < 1 or lr <= 0 or not all(0 < a < 1 for a in at):
            raise ValueError(f"steps {steps} must be ≥ 1, lr {lr} > 0 and every share of {at} in (0, 1)")
        self.segmenter = segmenter.eval().requires_grad_(False)
        self.size, self.steps, self.lr, self.at, self.batch = size, steps, lr, tuple(at), max(1, batch)

    def guided_steps(self, n: int) -> set[int]:
        """The indices of the `n` sampling steps after which x̂0 is refined (never the last: nothing follows it)."""
        return {i for i in (int(round(a * n)) for a in self.at) if 0 <= i < n - 1}

    def refine(self, vae, x0: torch.Tensor, masks: np.ndarray) -> torch.Tensor:
        """`x0` (scaled latents N×C×h×w) refined for the 0/1 `masks` (N×H×W), in micro-batches of `batch`."""
        target = torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32))[:, None].to(x0.device)
        return torch.cat([self._refine(vae, x0[i:i + self.batch], target[i:i + self.batch])
                          for i in range(0, len(x0), self.batch)])

    def _refine(self, vae, x0: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        vae.requires_grad_(False)
        scale = vae.config.scaling_factor
        z = x0.detach().float().clone().requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        with torch.enable_grad():
            for _ in range(self.steps):
                image = vae.decode((z / scale).to(vae.dtype)).sample.float().clamp(-1, 1)
                x = F.interpolate(image, size=(self.size, self.size), mode="bilinear", antialias=True,
                                  align_corners=False) if image.shape[-1] != self.size else image
                logits = self.segmenter(x).float()
                if logits.shape[-2:] != target.shape[-2:]:
                    logits = F.interpolate(logits, size=target.shape[-2:], mode="bilinear", align_corners=False)
                per_sample = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3))
                opt.zero_grad(set_to_none=True)
                per_sample.sum().backward()
                opt.step()
        return z.detach().to(x0.dtype)
