"""jobs/qc_model.py trains the consistency-QC segmenter on a prepared real dataset (Ray Train, on the shared
local cluster); jobs/generate.py with --qc-segmenter scores every pair and redraws the inconsistent ones."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from job_runs import run_job, run_jobs
from skindual.demo.world import split_pairs
from skindual.errors import UserError
from skindual.qc_model import CARD, QCSegmenter, ignore_maps
from skindual.shards import read_shards

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def segmenter(demo_real, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("qc") / "segmenter"
    result = run_job("qc_model", ["--training-data", str(demo_real), "--steps", "150", "--size", "32",
                                 "--cpus-per-worker", "1", "--output", str(out)], ray_cluster)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "done: QC segmenter at" in result.stdout
    return out


def test_the_segmenter_learns_the_real_masks(segmenter, demo_real):
    card = json.loads((segmenter / CARD).read_text())
    assert card["size"] == 32 and card["train_pairs"] > 0 and card["val_pairs"] > 0
    qc = QCSegmenter.load(str(segmenter))
    test = split_pairs(demo_real, "test", 64)  # scored at the pairs' own size
    scores = qc.score(test["image"], test["mask"])
    assert scores.shape == (len(test["image"]),) and scores.mean() > 0.8  # the real masks agree with it
    shuffled = qc.score(test["image"], np.roll(test["mask"], 1, axis=0))  # masks of other images: far less
    assert shuffled.mean() < scores.mean() - 0.1
    # the ignore maps: few pixels of the true masks, many more of the other images' masks
    true, other = qc.judge(test["image"], test["mask"]), qc.judge(test["image"], np.roll(test["mask"], 1, axis=0))
    assert np.array_equal(true.consistency, scores) and true.ignore.shape == test["mask"].shape
    assert np.allclose(true.disagreement, true.ignore.reshape(len(scores), -1).mean(1))
    assert true.disagreement.mean() < 0.1 and other.disagreement.mean() > 2 * true.disagreement.mean()


def test_an_ignore_map_is_the_confident_contradictions_and_a_band_around_them():
    mask = np.zeros((1, 64, 64), np.uint8)
    mask[0, 16:48, 16:48] = 1
    p = np.where(mask, 0.8, 0.2).astype(np.float32)  # agrees with the mask everywhere
    p[0, 30, 30] = 0.05  # inside the mask, confidently background
    p[0, 5, 5] = 0.95  # outside it, confidently lesion
    p[0, 60, 60] = 0.6  # outside it, leaning lesion but not confident: kept
    ignore = ignore_maps(p, mask)[0]
    assert ignore.dtype == np.uint8 and set(np.unique(ignore)) == {0, 1}
    rows, cols = np.nonzero(ignore)
    near = lambda r, c: np.hypot(rows - r, cols - c) <= 1.0  # noqa: E731 (64 px: a band of 1 px)
    assert np.all(near(30, 30) | near(5, 5)) and ignore[30, 30] and ignore[5, 5] and ignore.sum() == 10
    assert ignore_maps(p, mask, band=4 / 64)[0].sum() == 2 * 49  # radius 4: 49 pixels around each
    assert not ignore_maps(np.where(mask, 0.8, 0.2).astype(np.float32), mask).any()


def test_a_segmenter_that_is_not_one_is_one_clear_error(segmenter, tmp_path):
    with pytest.raises(UserError, match="no segmenter.json there"):
        QCSegmenter.load(str(tmp_path))
    (tmp_path / CARD).write_text((segmenter / CARD).read_text())
    (tmp_path / "segmenter.safetensors").write_bytes(b"x" * 10)
    with pytest.raises(UserError, match="does not match the sha256"):
        QCSegmenter.load(str(tmp_path))


def test_generation_redraws_the_pairs_the_segmenter_disagrees_with(segmenter, ray_cluster, tmp_path):
    common = ["--per-class", "2", "--classes", "df,nv", "--steps", "10", "--batch-size", "4", "--max-attempts", "2",
              "--qc-segmenter", str(segmenter)]
    # side by side: strict (no generated mask is a perfect match: every pair is drawn twice, then rejected) and scored
    result, scored = run_jobs([("generate", [*common, "--min-consistency", threshold, "--output", str(tmp_path / name)])
                               for name, threshold in (("strict", "1.0"), ("scored", "0"))], ray_cluster)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "--min-consistency" in errors[0]
    rows = pq.read_table(tmp_path / "strict" / "00000.parquet").to_pylist()
    assert {r["reason"] for r in rows} == {"inconsistent"} and all(r["rejections"] == ["inconsistent"] * 2 for r in rows)
    assert all(0 <= r["consistency"] < 1 for r in rows)
    assert scored.returncode == 0, scored.stderr[-4000:]
    rows = pq.read_table(tmp_path / "scored" / "00000.parquet").to_pylist()
    assert [r["status"] for r in rows] == ["ok"] * 4 and all(0 <= r["consistency"] <= 1 for r in rows)
    # every kept pair has its ignore map in the tar, its share in the json and the parquet
    read = {s["key"]: s for s in read_shards(str(tmp_path / "scored"))}
    for row in rows:
        pair = read[row["key"]]
        assert pair["ignore"].shape == pair["mask"].shape and set(np.unique(pair["ignore"])) <= {0, 1}
        assert pair["meta"]["disagreement"] == row["disagreement"] == round(float(pair["ignore"].mean()), 6)
    assert json.loads((tmp_path / "scored" / "manifest.json").read_text())["resolved"]["min_consistency"] == 0.0


def test_a_rerun_with_the_same_settings_reuses_the_segmenter(segmenter, demo_real, ray_cluster):
    from dataclasses import replace

    from skindual.qc_model import QCModelConfig, plan_qc_model

    before = (segmenter / "segmenter.safetensors").stat().st_mtime_ns
    result = run_job("qc_model", ["--training-data", str(demo_real), "--steps", "150", "--size", "32",
                                 "--cpus-per-worker", "2", "--output", str(segmenter)], ray_cluster)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "reusing it" in result.stdout + result.stderr
    assert (segmenter / "segmenter.safetensors").stat().st_mtime_ns == before
    cfg = QCModelConfig(training_data=str(demo_real), steps=150, size=32, output=str(segmenter))
    assert plan_qc_model(cfg).done is not None and plan_qc_model(replace(cfg, steps=151)).done is None
    # other data prepared at the same URL (its manifest's fingerprint) is not what the segmenter learnt
    manifest = demo_real / "manifest.json"
    kept = manifest.read_bytes()
    try:
        manifest.write_text(json.dumps({**json.loads(kept), "fingerprint": "another-prepare-run"}))
        assert plan_qc_model(cfg).done is None
    finally:
        manifest.write_bytes(kept)
    assert plan_qc_model(cfg).done is not None
