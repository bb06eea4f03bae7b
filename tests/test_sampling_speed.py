"""skindual.sampling_speed: the masks' clean-up in torch (what a GPU runs) against scipy's, and generation's
``--compile`` levers against eager sampling on the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from skindual import sampling_speed
from skindual.quality import largest_component

torch.set_num_threads(1)


def blobs(n: int, side: int, seed: int) -> np.ndarray:
    """N×side×side float32 logits with several smooth blobs and pixel noise: masks with many components, holes
    and ragged edges once thresholded."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, side, side)), (0, side / 20, side / 20)) * 10
    return (smooth + rng.normal(scale=0.3, size=(n, side, side))).astype(np.float32)


@pytest.mark.parametrize("n,side,sigma", [(6, 64, 3.0), (3, 48, 0.0), (2, 17, 30.0), (2, 96, 6.0)])
def test_torch_cleanup_gives_scipys_masks_exactly(n, side, sigma):
    """Smoothing (scipy's kernel and reflect edges, a radius beyond the image too), threshold, largest component and
    filled holes: the same masks, pixel for pixel, as the scipy path the CPU runs."""
    logits = blobs(n, side, seed=side)
    smoothed = sampling_speed.smooth_logits(torch.from_numpy(logits), sigma).numpy()
    assert np.array_equal(smoothed, sampling_speed.smooth_mask_logits(logits, sigma))
    expected = sampling_speed.finish_masks(torch.from_numpy(logits), sigma, where="scipy")
    assert expected.dtype == np.uint8 and (expected.any() or sigma > side)  # σ 30 on 17 px: the mean, below 0
    for largest in (True, False):
        got = sampling_speed.finish_masks(torch.from_numpy(logits), sigma, largest, where="torch")
        want = expected if largest else (sampling_speed.smooth_mask_logits(logits, sigma) > 0).astype(np.uint8)
        assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_components_match_scipys_labels_ties_holes_and_empty_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((24, 40, 40)) < np.linspace(0.3, 0.7, 24)[:, None, None]  # from specks to one web
    tie = np.zeros((40, 40), bool)
    tie[5:10, 20:25] = tie[20:25, 5:10] = True  # two equal squares: scipy keeps the first in raster order
    ring = np.zeros((40, 40), bool)
    ring[5:30, 5:30], ring[10:25, 10:25], ring[15, 15] = True, False, True  # a ring with a speck in its hole
    spiral = np.zeros((40, 40), bool)
    for k in range(0, 20, 4):  # a long winding component: union-find must still join it
        spiral[k, k:40 - k] = spiral[k:40 - k, 39 - k] = spiral[39 - k, k:40 - k] = True
        spiral[k + 2:40 - k, k] = True
    masks = np.concatenate([masks, [tie, ring, spiral, np.zeros((40, 40), bool), np.ones((40, 40), bool)]])
    labels = sampling_speed.component_labels(torch.from_numpy(masks)).numpy()
    first_pixel = np.arange(40 * 40).reshape(40, 40)
    for mask, got in zip(masks, labels):
        ref, count = ndimage.label(mask)
        firsts = ndimage.minimum(first_pixel, ref, np.arange(1, count + 1)) if count else []
        assert np.array_equal(got, np.where(ref > 0, np.concatenate([[1600], firsts]).astype(int)[ref], 1600))
    for fill in (True, False):
        got = sampling_speed.largest_components(torch.from_numpy(masks), fill).numpy()
        assert np.array_equal(got, np.stack([largest_component(m.astype(np.uint8), fill) for m in masks]).astype(bool))
    assert sampling_speed.largest_components(torch.zeros(0, 8, 8, dtype=torch.bool)).shape == (0, 8, 8)
    with pytest.raises(ValueError, match="clean-up 'gpu'"):
        sampling_speed.finish_masks(torch.zeros(1, 8, 8), 1.0, where="gpu")
