"""The bench scripts that a CI machine can run at small size: each ends with one JSON line of its figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def last_json_line(args: list[str], timeout: int = 600) -> dict:
    run = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_gpu_throughput_bench_runs_on_the_cpu_at_narrow_width():
    figures = last_json_line(["bench/gpu_throughput.py", "--width", "16", "--resolution", "128", "--steps", "2",
                              "--batches", "1", "2", "--dtypes", "bf16", "--repeats", "1", "--peak-tflops", "1"])
    assert figures["device"] == "cpu" and figures["attention"] == ["AttnProcessor2_0"]  # SDPA
    assert [(r["dtype"], r["batch"]) for r in figures["results"]] == [("bf16", 1), ("bf16", 2)]
    for entry in figures["results"]:
        assert entry["pairs_per_s"] > 0 and entry["image_only_per_s"] > 0 and 0 < entry["ratio"] < 2
        assert 0 < entry["floor_fraction"] < 1
    # 2 steps × 2 (guidance) UNet evaluations and 2 decodes per pair, counted on the model itself
    assert figures["gflop_per_pair"] == pytest.approx(4 * figures["unet_gflop"] + 2 * figures["vae_decode_gflop"],
                                                      abs=2e-3)


def test_the_vae_bench_swaps_the_bands_it_names():
    """bench/vae_round_trip.py's band measurements: pooling keeps an image that is constant on each cell; a
    swap between an image and itself gives it back; each swap takes one band from each image."""
    import importlib.util

    import numpy as np

    spec = importlib.util.spec_from_file_location("vae_round_trip", ROOT / "bench" / "vae_round_trip.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(0)
    cells = rng.integers(0, 256, (2, 4, 4, 3)).astype(np.uint8)
    blocky = cells.repeat(4, 1).repeat(4, 2)  # constant on each 4 × 4 cell
    other = rng.integers(0, 256, blocky.shape).astype(np.uint8)
    bands = bench.band_swaps(blocky, other, pool=4)
    assert np.array_equal(bands["pooled"], blocky)
    same = bench.band_swaps(other, other, pool=4)
    assert np.abs(same["swap_low"].astype(int) - other).max() <= 1
    assert np.abs(same["swap_high"].astype(int) - other).max() <= 1
    # against a flat grey round trip: swap_low is the real image's low band alone, swap_high its high band
    # on grey, so the two add up to the image plus grey (values kept off 0 and 255: nothing clips)
    mid = rng.integers(96, 160, blocky.shape).astype(np.uint8)
    flat = bench.band_swaps(mid, np.full_like(mid, 128), pool=4)
    total = flat["swap_low"].astype(int) + flat["swap_high"] - 128
    assert np.abs(total - mid).max() <= 1 and np.abs(flat["swap_low"].astype(int) - mid).mean() > 5
