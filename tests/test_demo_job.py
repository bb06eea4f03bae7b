"""jobs/demo.py end to end, tiny: the whole chain (demo data → fine-tune → QC → generate → evaluate) on the
job's own embedded local Ray cluster (no RAY_ADDRESS), as the README's quick start runs it."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from fixture_data import shard_snapshot
from job_runs import ok, run_job
from skindual import model
from skindual.controlnet import CONTROLNET_DIR, load_controlnet_info
from skindual.demo.chain import DEMO_CONTROLNET, STAGES
from skindual.demo.world import DEMO_TEST_PER_CLASS
from skindual.prompts import CLASS_CODES
from skindual.shards import read_shards
from skindual.storage import LocalStorage

pytestmark = pytest.mark.slow  # whole chains
ROOT = Path(__file__).resolve().parents[1]
# 3 fine-tuning steps of the ControlNet (the demo's default pairs: images drawn for real train masks), the 5-step
# QC segmenter only scores (--min-consistency 0); one actor for one shard of 14 pairs; a 20-step lesion-cnn,
# 5-step downstream models; a 2-step validation grid
TINY = ["--finetune-steps", "3", "--validation-steps", "2", "--per-class", "2", "--actors", "1", "--extractor-steps", "20", "--eval-steps", "5",
        "--seeds", "1", "--max-mask-area", "1.0", "--qc-steps", "5", "--min-consistency", "0"]


def run_demo_job(args: list[str], cache: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return run_job("demo", args, timeout=timeout, SKINDUAL_CACHE=cache)  # its own embedded cluster


def shard_bytes(folder: Path) -> dict[str, str]:
    return shard_snapshot(LocalStorage(folder))


@pytest.fixture(scope="module")
def demo_run(skindual_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    return out, ok(run_demo_job([*TINY, "--output", str(out)], skindual_cache))


def test_the_chain_runs_its_five_stages_and_summarises(demo_run):
    out, run = demo_run
    lines = run.stdout.splitlines()
    # one line as each stage starts and one as it ends, in stage order
    positions = []
    for number, name in enumerate(STAGES, 1):
        start = [i for i, line in enumerate(lines) if re.fullmatch(rf"\[{number}/5\] {name}: .+ \.\.\.", line)]
        end = [i for i, line in enumerate(lines) if re.fullmatch(rf"\[{number}/5\] {name}: done in \d+ s \(.+\)", line)]
        assert len(start) == len(end) == 1, (name, run.stdout)
        positions += [start[0], end[0]]
    assert positions == sorted(positions)
    assert "[2/5] fine-tune: 3 steps (a ControlNet beside the stock base, batch 16, lr 0.0005) into" in run.stdout
    assert "[4/5] generate: 2 pairs per class, images drawn by that ControlNet for the real train masks" in run.stdout
    assert "each nudged towards its mask by the QC segmenter (5 guidance steps)" in run.stdout
    assert "[3/5] qc segmenter: 5 steps of a U-Net on the real train pairs" in run.stdout
    assert "[4/5] generate: done in" in run.stdout and "14 pairs in 1 shards" in run.stdout

    # the summary: stage times, total, key figures, the report's path
    summary = run.stdout[run.stdout.index("demo finished in"):]
    for name in (*STAGES, "total"):
        assert re.search(rf"^  {name} +\d+\.\d s$", summary, re.M), (name, summary)
    assert re.search(r"image-mask consistency .* \d\.\d{3} \(real test pairs \d\.\d{3}\), sane masks \d\.\d{3}",
                     summary)
    assert re.search(r"class fidelity .* \d\.\d{3} \(its accuracy on real test images \d\.\d{3}\)", summary)
    assert re.search(r"FD_lesioncnn \(all classes\) \d+\.\d\d", summary)
    for what in ("classifier macro_f1", "segmenter dice"):
        assert re.search(rf"downstream {what}: real \d\.\d{{3}} ± \d\.\d{{3}} -> real\+synthetic \d\.\d{{3}}", summary)
    assert f"report: {out / 'eval' / 'report.md'}" in summary

    saved = json.loads((out / "demo_summary.json").read_text())
    assert list(saved["stage_seconds"]) == list(STAGES)
    # each figure is rounded to 0.1 s, so the stages' sum may exceed the total by up to 0.05 s per stage
    assert saved["total_seconds"] >= sum(saved["stage_seconds"].values()) - 0.05 * len(STAGES)
    assert saved["finetune"] == {**DEMO_CONTROLNET, "steps": 3} and saved["pairs"] == "controlnet"
    assert saved["pair_quality"]["pairs"] == 14 and set(saved["pair_quality"]["class_fidelity"]) == set(CLASS_CODES)
    assert saved["qc"]["format"] == "skindual-qc-segmenter/1" and saved["qc"]["min_consistency"] == 0
    assert saved["generation"]["segmenter_guidance"] == 5
    assert saved["generation"]["draws"]["kept"] == 14 and 0 <= saved["generation"]["draws"]["kept_qc_consistency"] <= 1


def test_every_stage_wrote_its_output_under_the_one_folder(demo_run):
    out, _ = demo_run
    assert (out / "data" / "HAM10000_metadata.csv").is_file() and (out / "real" / "manifest.json").is_file()

    # the ControlNet the fine-tune stage wrote, with the demo's settings ...
    adapter = out / "runs" / "demo" / "adapter"
    assert {CONTROLNET_DIR, model.ADAPTER_JSON} <= {p.name for p in adapter.iterdir()}
    meta = json.loads((adapter / model.ADAPTER_JSON).read_text())
    assert {k: meta["training_config"][k] for k in DEMO_CONTROLNET} == {**DEMO_CONTROLNET, "steps": 3}
    assert (out / "runs" / "demo" / "validation_grid.png").is_file()
    sha = load_controlnet_info(adapter).sha256

    # ... draws every generated pair's image, each for a real train mask (mask mode), and the classes have exactly
    # the asked counts
    counts: dict[str, int] = {}
    real_keys = {s["key"] for s in read_shards(str(out / "real"))}
    for sample in read_shards(str(out / "synthetic")):
        meta = sample["meta"]
        assert meta["controlnet_sha256"] == sha and meta["status"] == "ok" and meta["mode"] == "mask"
        assert meta["source_key"].split("/")[1] in real_keys
        counts[meta["class_code"]] = counts.get(meta["class_code"], 0) + 1
    assert counts == {code: 2 for code in CLASS_CODES}
    assert sorted(p.name for p in (out / "synthetic").glob("*.tar")) == ["00000.tar"]
    manifest = json.loads((out / "synthetic" / "manifest.json").read_text())
    assert manifest["resolved"]["controlnet"] == f"sha256:{sha}" and manifest["resolved"]["adapter"] == "none"
    assert manifest["resolved"]["segmenter_guidance"] == 5  # the images nudged by the QC segmenter the chain trained
    card = (out / "synthetic" / "README.md").read_text()
    assert "segmenter guidance: 5 Adam steps" in card
    # every kept pair scored by the QC segmenter the chain trained, in its json and the parquet
    qc_card = json.loads((out / "qc" / "segmenter.json").read_text())
    assert manifest["resolved"]["qc_segmenter"].startswith("sha256:") and qc_card["train_pairs"] > 0
    assert all(0 <= s["meta"]["consistency"] <= 1 for s in read_shards(str(out / "synthetic")))

    # the evaluation of those shards against the demo table
    assert (out / "eval" / "report.md").read_text().startswith("# SkinDualGen evaluation")
    metrics = json.loads((out / "eval" / "metrics.json").read_text())
    assert metrics["counts"]["synthetic"] == {code: 2 for code in CLASS_CODES}
    # the pairs were guided by the QC segmenter that scores them: the report says its figures are no independent check
    assert metrics["synthetic_guided_by_qc_segmenter"] is True
    assert "drawn with `--segmenter-guidance` by this same QC segmenter" in (out / "eval" / "report.md").read_text()
    # the downstream test set is the separate balanced one, not the imbalanced table's test split
    assert metrics["config"]["test_data"] == str(out / "real-test")
    assert metrics["counts"]["real_test"] == {code: DEMO_TEST_PER_CLASS for code in CLASS_CODES}
    assert metrics["fidelity"]["fd_name"] == "FD_lesioncnn"
    assert metrics["config"]["steps"] == 5 and metrics["config"]["extractor_steps"] == 20
    assert {(r["arm"], r["model"]) for r in metrics["downstream"]["results"]} == {
        (arm, m) for arm in ("real", "real+synthetic") for m in ("classifier", "segmenter")}
    # the demo's recipe, the best of lab/pair_recipes.py's table: pretrain on the synthetic pairs, then the real
    assert metrics["config"]["hybrid"] == "pretrain" and metrics["downstream"]["settings"]["schedules"] == 2
    saved = json.loads((out / "demo_summary.json").read_text())
    assert saved["fd"] == metrics["fidelity"]["overall"]["FD_lesioncnn"]


def test_rerun_keeps_the_fine_tune_the_shards_and_the_evaluation(demo_run, skindual_cache):
    out, _ = demo_run
    before, metrics = shard_bytes(out / "synthetic"), (out / "eval" / "metrics.json").read_bytes()
    adapter = (out / "runs" / "demo" / "adapter" / model.ADAPTER_JSON).read_bytes()
    run = ok(run_demo_job([*TINY, "--output", str(out)], skindual_cache))
    # every stage's plan finds its work done with these settings and inputs: nothing is trained or drawn again
    for number, name in enumerate(STAGES[1:], 2):
        assert re.search(rf"^\[{number}/5\] {name}: done in \d+ s \(already done: ", run.stdout, re.M), name
    assert "demo finished in" in run.stdout and "fine-tuning" not in run.stderr and "shards to do" not in run.stderr
    assert (out / "runs" / "demo" / "adapter" / model.ADAPTER_JSON).read_bytes() == adapter
    assert shard_bytes(out / "synthetic") == before
    # the same shards and settings: the evaluation is kept, not run again
    assert "already holds the evaluation of these inputs and settings" in run.stderr
    assert (out / "eval" / "metrics.json").read_bytes() == metrics
    # another step count: the fine-tune would resume with its own; one line in the demo's own flags
    other = run_demo_job([*TINY, "--finetune-steps", "4", "--output", str(out)], skindual_cache)
    assert other.returncode != 0 and "Traceback" not in other.stderr
    assert re.search(r"--steps 3, now --steps 4; the demo resumes its fine-tune .* give the same --finetune-steps, "
                     r"or another --output", other.stderr) and "--name" not in other.stderr


def test_a_bad_flag_is_one_line_and_exit_status_2(skindual_cache, tmp_path):
    out = str(tmp_path / "x")
    for args, message in [(["--per-class", "0", "--output", out], "error: --per-class 0: must be at least 1"),
                          (["--real-fraction", "0", "--output", out], "error: --real-fraction 0.0: must be in (0, 1]"),
                          (["--output", "s3://bucket/demo"], "error: --output s3://bucket/demo: the demo writes")]:
        run = run_demo_job(args, skindual_cache, timeout=120)
        assert run.returncode == 2 and run.stdout == "", run.stderr
        assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith(message), run.stderr
        assert "Traceback" not in run.stderr
    assert not (tmp_path / "x").exists()
