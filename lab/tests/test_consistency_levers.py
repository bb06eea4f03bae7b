"""lab/consistency_levers.py's estimate of what a QC threshold keeps, from first draws."""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the lab's scripts import each other by name

from consistency_levers import threshold_estimates  # noqa: E402


def test_a_threshold_keeps_each_class_s_passing_draws_weighted_by_its_rows():
    labels = np.array([0, 0, 1, 1])
    qc = np.array([0.9, 0.1, 0.95, 0.95])
    judge = np.array([0.95, 0.2, 0.9, 0.8])
    est = threshold_estimates(labels, qc, judge, [0.5, 0.99], attempts=16)
    # class 0: half its draws pass (judged 0.95), about 2 draws a row; class 1: all pass (0.85), 1 draw a row
    assert est["0.5"]["est_kept_judge"] == pytest.approx((2 * 0.95 + 2 * 0.85) / 4, abs=1e-4)
    assert est["0.5"]["kept_share"] == pytest.approx(1.0, abs=1e-4)
    assert est["0.5"]["draws_per_kept_pair"] == pytest.approx(1.5, abs=0.01)
    assert est["0.5"]["pass_rate"] == 0.75
    assert est["0.5"]["lowest_pass_rates"] == {"akiec": 0.5, "bcc": 1.0}
    # nothing passes: nothing kept, every row drawn `attempts` times
    assert est["0.99"]["est_kept_judge"] is None and est["0.99"]["kept_share"] == 0
    assert est["0.5"]["est_kept_judge"] > judge.mean()  # the filter lifts the raw draws' mean
