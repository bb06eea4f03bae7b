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


@pytest.mark.slow
def test_gpu_throughput_bench_runs_on_the_cpu_at_narrow_width():
    """The throughput bench as bench/gpu_check.sh runs it on a GPU, narrow: eager batches, where a batch's time goes
    (the two mask clean-ups agree pixel for pixel), a lever arm against eager with image-only under it."""
    figures = last_json_line(["bench/gpu_throughput.py", "--width", "16", "--resolution", "64", "--steps", "2",
                              "--batches", "1", "2", "--lever-batch", "2", "--arms", "fuse_qkv+channels_last",
                              "--dtypes", "bf16", "--peak-tflops", "1"], timeout=900)
    assert figures["device"] == "cpu" and figures["attention"] == ["AttnProcessor2_0"]  # SDPA
    assert [(r["dtype"], r["batch"], r["levers"]) for r in figures["results"]] == [("bf16", 1, "eager"), ("bf16", 2, "eager")]
    for entry in figures["results"]:
        assert entry["pairs_per_s"] > 0 and entry["image_only_per_s"] > 0 and entry["ratio"] > 0
        assert 0 < entry["floor_fraction"] < 1
    # 2 steps × 2 (guidance) UNet evaluations and 2 decodes per pair, counted on the model itself
    assert figures["gflop_per_pair"] == pytest.approx(4 * figures["unet_gflop"] + 2 * figures["vae_decode_gflop"],
                                                      abs=2e-3)
    phases = figures["phases"]
    assert phases["batch"] == 2 and phases["cleanups_agree"] == 1.0 and phases["seconds"]["denoise"] > 0
    levers = {(e["levers"], e["batch"]): e for e in figures["levers"]}
    assert set(levers) == {("fuse_qkv+channels_last", 2), ("fuse_qkv+channels_last", 1)}  # its arm, then its sweep
    arm = levers[("fuse_qkv+channels_last", 2)]
    assert arm["speedup"] > 0 and arm["ratio"] > 0 and isinstance(arm["pays_within_shard"], bool)
    assert figures["skipped"] == []


@pytest.mark.slow
def test_mask_mode_bench_runs_at_sd2_structure_on_the_cpu():
    """The mask-mode bench on SD-2-base's architecture (narrow, random weights) as bench/gpu_check.sh runs it on a
    GPU: the given masks come back exact (the script asserts it) and both modes have a rate."""
    figures = last_json_line(["bench/mask_mode_throughput.py", "--sd2-width", "16", "--dtype", "bf16", "--steps", "2",
                              "--batch-size", "2", "--batches", "1", "--repeats", "1"])
    assert figures["model"] == "sd2-base/16" and figures["resolution"] == 512 and figures["device"] == "cpu"
    assert figures["pairs_per_s"]["joint"] > 0 and figures["pairs_per_s"]["mask"] > 0 and figures["ratio"] > 0
