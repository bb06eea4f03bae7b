"""skindual.mask_stats on hand-made masks with known shape figures."""

from __future__ import annotations

import math

import numpy as np
import pytest

from skindual.mask_stats import (STATISTICS, compare_statistics, crofton_perimeter, distribution_distance,
                                 mask_statistics, statistics_table)


def ellipse(size: int, a: float, b: float, angle_deg: float = 0.0, centre=None) -> np.ndarray:
    cy, cx = centre if centre is not None else (size / 2, size / 2)
    yy, xx = np.mgrid[:size, :size]
    t = math.radians(angle_deg)
    u = math.cos(t) * (xx - cx) + math.sin(t) * (yy - cy)
    v = -math.sin(t) * (xx - cx) + math.cos(t) * (yy - cy)
    return ((u / a) ** 2 + (v / b) ** 2 <= 1).astype(np.uint8)


def test_disk_is_compact_and_round():
    s = mask_statistics(ellipse(128, 30, 30))
    assert s["compactness"] == pytest.approx(1.0, abs=0.03)
    assert s["eccentricity"] == pytest.approx(0.0, abs=0.01)
    assert s["area_fraction"] == pytest.approx(math.pi * 30**2 / 128**2, rel=0.01)
    assert s["components"] == 1 and s["border_contact"] == 0


def test_crofton_perimeter_of_a_disk():
    assert crofton_perimeter(ellipse(200, 60, 60)) == pytest.approx(2 * math.pi * 60, rel=0.01)


@pytest.mark.parametrize("angle", [0, 30, 45, 70])
def test_two_to_one_ellipse_at_any_angle(angle):
    s = mask_statistics(ellipse(160, 40, 20, angle))
    assert s["eccentricity"] == pytest.approx(math.sqrt(3) / 2, abs=0.01)
    # 4πA/P² of a 2:1 ellipse, P by Ramanujan's approximation: 0.8413
    a, b = 2.0, 1.0
    perimeter = math.pi * (3 * (a + b) - math.sqrt((3 * a + b) * (a + 3 * b)))
    assert s["compactness"] == pytest.approx(4 * math.pi * math.pi * a * b / perimeter**2, abs=0.03)


def test_two_blobs_are_two_components_and_a_ragged_shape_is_less_compact():
    two = np.maximum(ellipse(64, 8, 8, centre=(20, 20)), ellipse(64, 8, 8, centre=(44, 44)))
    assert mask_statistics(two)["components"] == 2
    square = np.zeros((64, 64), np.uint8)
    square[16:48, 16:48] = 1
    comb = square.copy()
    comb[16:48:4, 16:40] = 0  # slits: same outline box, much longer boundary
    assert mask_statistics(comb)["compactness"] < 0.5 * mask_statistics(square)["compactness"]


def test_border_contact():
    m = np.zeros((10, 10), np.uint8)
    m[0, :] = 1  # the whole top row: 10 of the 36 ring pixels
    assert mask_statistics(m)["border_contact"] == pytest.approx(10 / 36)
    assert mask_statistics(np.ones((10, 10)))["border_contact"] == 1.0
    centred = np.zeros((10, 10), np.uint8)
    centred[3:7, 3:7] = 1
    assert mask_statistics(centred)["border_contact"] == 0.0


def test_empty_mask_and_bad_shape():
    s = mask_statistics(np.zeros((8, 8), np.uint8))
    assert s["area_fraction"] == 0 and s["components"] == 0
    assert math.isnan(s["compactness"]) and math.isnan(s["eccentricity"])
    with pytest.raises(ValueError, match="H×W"):
        mask_statistics(np.zeros((2, 8, 8)))


def test_distances_between_distributions():
    same = distribution_distance(np.array([0.1, 0.2, 0.3]), np.array([0.1, 0.2, 0.3, np.nan]))
    assert same["wasserstein"] == 0 and same["ks"] == 0 and same["n_synthetic"] == 3
    shifted = distribution_distance(np.array([0.0, 1.0]), np.array([2.0, 3.0]))
    assert shifted["wasserstein"] == pytest.approx(2.0) and shifted["ks"] == 1.0
    assert distribution_distance(np.array([1.0]), np.array([np.nan]))["wasserstein"] is None


def test_tables_compare_real_with_synthetic():
    disks = [ellipse(64, r, r) for r in (10, 12, 14)]
    ellipses = [ellipse(64, 2 * r, r) for r in (8, 9, 10)]
    real, synthetic = statistics_table(disks), statistics_table(ellipses)
    assert set(real) == set(STATISTICS) and len(real["area_fraction"]) == 3
    compared = compare_statistics(real, synthetic)
    assert compared["eccentricity"]["ks"] == 1.0
    assert compared["eccentricity"]["wasserstein"] == pytest.approx(0.866, abs=0.02)
    assert compared["components"]["wasserstein"] == 0
