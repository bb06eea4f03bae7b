"""The pictures of skindual/report.py, checked pixel by pixel on small arrays."""

import numpy as np

from skindual import report


def test_a_pair_grid_shows_each_image_beside_its_mask_tinted_or_outlined():
    image = np.full((16, 16, 3), 100, np.uint8)
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 1  # an 8×8 square: a 28-pixel outline around 36 inner pixels
    rows = [[(image, mask), (image, mask)], [(image, mask)]]
    tinted = np.asarray(report.pair_grid(rows, scale=1))
    assert tinted.shape == (2 * (16 + 2), 2 * (2 * 16 + 2), 3)  # 2 rows, 2 pairs wide, 2 px gaps
    assert np.array_equal(tinted[:16, :16], image) and (tinted[18:, 34:] == 255).all()  # a short row's end is blank
    changed = (tinted[:16, 16:32] != 100).any(-1)
    assert changed.sum() == 64 and changed[4:12, 4:12].all()  # the whole mask tinted
    outlined = (np.asarray(report.pair_grid(rows, scale=1, alpha=0.0))[:16, 16:32] != 100).any(-1)
    assert outlined.sum() == 28 and not outlined[5:11, 5:11].any()  # its outline only: the lesion stays visible
