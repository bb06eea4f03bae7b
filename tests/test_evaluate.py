"""jobs/evaluate.py end to end on demo shards, on a real local Ray cluster (conftest `ray_cluster`),
with the offline lesion-cnn extractor; bad inputs are one line and exit status 2 from the job's
entry point (`run_job(main)`, in process: the subprocess path of errors is tested in test_export)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_test_shards
from skindual.cli import run_job
from skindual.evaluate import EvaluateConfig
from skindual.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "evaluate.py"
# tiny on purpose (2 busy cores): 32² pairs, a 10-step extractor, 6-step downstream models, 2 seeds
FAST = ["--feature-extractor", "lesion-cnn", "--extractor-steps", "10", "--size", "32", "--classifier", "small",
        "--steps", "6", "--batch-size", "8", "--seeds", "2", "--kid-subsets", "10", "--grid-per-class", "2"]
FIGURES = ("samples_synthetic.png", "samples_real.png", "fd_per_class.png", "mask_statistics.png")


def run_evaluate_job(args: list[str], ray_address: str | None = None, timeout: int = 240):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run([sys.executable, str(JOB), *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_the_job_end_to_end_on_a_ray_cluster_writing_to_s3(eval_world, ray_cluster, s3_env, tmp_path):
    cache, output = tmp_path / "cache", s3_env + "/eval"
    run = run_evaluate_job(["--real", eval_world["table"], "--synthetic", eval_world["synthetic"], "--output", output,
                            "--cache-dir", str(cache), *FAST], ray_cluster)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: FD_lesioncnn" in run.stdout
    storage = open_storage(output)
    assert {"metrics.json", "report.md", "downstream.png", *FIGURES} <= set(storage.list())
    metrics = json.loads(storage.read_bytes("metrics.json"))

    fid = metrics["fidelity"]
    assert (fid["fd_name"], fid["kd_name"]) == ("FD_lesioncnn", "KD_lesioncnn")
    assert "FID" not in json.dumps(fid) and fid["real_features_cached"] is False
    assert fid["overall"]["n_synthetic"] == 28 and fid["overall"]["FD_lesioncnn"] > 0
    assert set(fid["per_class"]) == set(metrics["counts"]["synthetic"]) and len(fid["per_class"]) == 7
    assert all(v["spread_ratio"] > 0 for v in fid["per_class"].values())

    masks = metrics["mask_statistics"]
    assert set(masks["overall"]) == {"area_fraction", "components", "border_contact", "compactness", "eccentricity"}
    assert masks["overall"]["components"]["synthetic_mean"] == 1.0  # procedural lesions are one blob
    assert set(masks["per_class"]["df"]["area_fraction"]) >= {"wasserstein", "ks", "real_mean", "synthetic_mean"}

    down = metrics["downstream"]
    assert len(down["results"]) == 2 * 2 * 2  # (arm, model, seed)
    assert {(r["arm"], r["model"]) for r in down["results"]} == {
        (a, m) for a in ("real", "real+synthetic") for m in ("classifier", "segmenter")}
    real_train = sum(metrics["counts"]["real_train"].values())
    assert {r["train_pairs"] for r in down["results"] if r["arm"] == "real+synthetic"} == {real_train + 28}
    for model, metric in (("classifier", "macro_f1"), ("classifier", "accuracy"), ("segmenter", "dice"),
                          ("segmenter", "iou")):
        entry = down["summary"][model][metric]
        assert 0 <= entry["real"]["mean"] <= 1 and entry["real"]["n"] == 2
        assert entry["gain"] == pytest.approx(entry["real+synthetic"]["mean"] - entry["real"]["mean"])
    report = storage.read_bytes("report.md").decode()
    assert "FD_lesioncnn" in report and "not FID" in report and "| segmenter | dice |" in report
    assert "diversity (synthetic / real spread)" in report

    # again, locally and without the benchmark (so without Ray): the extractor and the real features come from the cache
    assert run_job(_job_main(), EvaluateConfig, "evaluate", [
        "--real", eval_world["table"], "--synthetic", eval_world["synthetic"], "--output", str(tmp_path / "local"),
        "--cache-dir", str(cache), "--no-downstream", *FAST]) == 0
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert local["fidelity"]["real_features_cached"] is True and "downstream" not in local
    assert local["fidelity"]["overall"] == pytest.approx(fid["overall"])
    assert all((tmp_path / "local" / f).is_file() for f in FIGURES)


def _job_main():
    spec = importlib.util.spec_from_file_location("evaluate_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _one_error_line(capsys, argv: list[str]) -> str:
    assert run_job(_job_main(), EvaluateConfig, "evaluate", argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_empty_shard_folder(eval_world, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    line = _one_error_line(capsys, ["--real", eval_world["table"], "--synthetic", str(tmp_path / "empty"),
                                    "--output", str(tmp_path / "out"), *FAST])
    assert line.startswith("error: no committed shards") and str(tmp_path / "empty") in line
    assert not (tmp_path / "out").exists()


def test_a_class_without_real_images(eval_world, tmp_path, capsys):
    table = pq.read_table(eval_world["table"])
    no_vasc = table.filter(np.asarray(table.column("class_code")) != "vasc")
    pq.write_table(no_vasc, tmp_path / "table.parquet")
    line = _one_error_line(capsys, ["--real", str(tmp_path / "table.parquet"), "--synthetic", eval_world["synthetic"],
                                    "--output", str(tmp_path / "out"), *FAST])
    assert "class vasc" in line and "no real images" in line and "'train' split" in line


def test_mismatched_image_sizes(eval_world, tmp_path, capsys):
    shards = tmp_path / "mixed"
    write_test_shards(shards, [("nv", 1), ("df", 2)], size=32)
    write_test_shards(shards, [("nv", 3)], size=24, first_shard=1)
    line = _one_error_line(capsys, ["--real", eval_world["table"], "--synthetic", str(shards),
                                    "--output", str(tmp_path / "out"), *FAST])
    assert "mismatched image sizes" in line and "000010000 is 24x24" in line and "32x32" in line


def test_bad_flags_name_the_flag(capsys):
    assert "--size" in _one_error_line(capsys, ["--size", "30"])
    assert "--seeds" in _one_error_line(capsys, ["--seeds", "0"])
    assert "--real-fraction" in _one_error_line(capsys, ["--real-fraction", "0"])


def test_real_fraction_keeps_a_share_of_every_class(eval_world):
    from skindual import data
    from skindual.data import classed_rows, fraction_per_class

    rows = classed_rows(data.read_training_table(eval_world["table"]), "train")
    counts = np.bincount(np.asarray(rows.column("class_index")), minlength=7)
    part = fraction_per_class(rows, 0.3, seed=0)
    part_counts = np.bincount(np.asarray(part.column("class_index")), minlength=7)
    assert part_counts.tolist() == [int(np.ceil(0.3 * n)) for n in counts]  # rounded up: every class stays
    assert set(part.column("image_path").to_pylist()) <= set(rows.column("image_path").to_pylist())
    assert fraction_per_class(rows, 0.3, seed=0).equals(part)  # seeded
    assert not fraction_per_class(rows, 0.3, seed=1).equals(part)
    assert fraction_per_class(rows, 1.0, seed=0) is rows


def test_a_separate_test_table_is_the_downstream_test_set(eval_world, tmp_path, capsys):
    from skindual import data, demo_data
    from skindual.evaluate import load_inputs
    from skindual.prompts import CLASS_CODES

    demo_data.write_demo_dataset(tmp_path / "test", {c: 3 for c in CLASS_CODES}, seed=9, first_number=500_000)
    data.write_training_table(data.training_table(str(tmp_path / "test"), seed=0), str(tmp_path / "test.parquet"))
    base = ["--real", eval_world["table"], "--synthetic", eval_world["synthetic"], "--output", str(tmp_path / "out"),
            *FAST]
    common = {"real": eval_world["table"], "synthetic": eval_world["synthetic"], "size": 32,
              "feature_extractor": "lesion-cnn"}
    inputs = load_inputs(EvaluateConfig(**common, test_table=str(tmp_path / "test.parquet")))
    assert np.bincount(inputs.test.labels, minlength=7).tolist() == [3] * 7  # every row, all its splits
    own = load_inputs(EvaluateConfig(**common))
    assert len(own.test) < 21 and len(inputs.train) == len(own.train)

    # a "test" set that shares images with the train split is refused, naming the flag and an image
    line = _one_error_line(capsys, [*base, "--test-table", eval_world["table"]])
    assert f"--test-table {eval_world['table']}" in line and "image_id(s) also in the train split" in line
    assert "ISIC_" in line and not (tmp_path / "out").exists()
    # and one with no classed rows
    table = data.read_training_table(str(tmp_path / "test.parquet"))
    unclassed = table.set_column(table.schema.get_field_index("class_index"), "class_index",
                                 pa.array([-1] * table.num_rows, pa.int8()))
    pq.write_table(unclassed, tmp_path / "unclassed.parquet")
    line = _one_error_line(capsys, [*base, "--test-table", str(tmp_path / "unclassed.parquet")])
    assert "--test-table" in line and "no rows with a class" in line


def test_the_embedded_default_is_the_demo_world_and_its_balanced_test_set(skindual_cache, tmp_path):
    from skindual import data
    from skindual.demo_world import DEMO_TEST_PER_CLASS
    from skindual.demo_world import evaluate_defaults as resolve_inputs

    cfg = resolve_inputs(EvaluateConfig(), demo_output=str(tmp_path / "demo"))
    assert cfg.real == str(tmp_path / "demo" / "training_table.parquet")
    assert cfg.test_table == str(tmp_path / "demo" / "test_table.parquet")
    test = data.read_training_table(cfg.test_table)
    assert np.bincount(np.asarray(test.column("class_index")), minlength=7).tolist() == [DEMO_TEST_PER_CLASS] * 7
    train = data.read_training_table(cfg.real)
    assert not set(test.column("image_id").to_pylist()) & set(train.column("image_id").to_pylist())
    # a given --test-table is kept; a given --real is left alone, test table and all
    mine = resolve_inputs(EvaluateConfig(test_table="mine.parquet"), demo_output=str(tmp_path / "demo"))
    assert mine.test_table == "mine.parquet"
    assert resolve_inputs(EvaluateConfig(real="t.parquet")).test_table == ""


def test_missing_inception_weights_by_default(eval_world, tmp_path, capsys, monkeypatch):
    from skindual import fidelity

    monkeypatch.setattr(fidelity, "CLEAN_FID_CACHE", tmp_path)  # as on a machine that never downloaded them
    line = _one_error_line(capsys, ["--real", eval_world["table"], "--synthetic", eval_world["synthetic"],
                                    "--output", str(tmp_path / "out")])
    assert "--inception-weights" in line and "--feature-extractor lesion-cnn" in line
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- skindual.downstream, pure parts


def test_classifier_metrics_agree_with_torchmetrics():
    import torch

    from skindual.downstream import classifier_metrics

    tm = pytest.importorskip("torchmetrics.functional.classification")
    rng = np.random.default_rng(0)
    labels = rng.choice([0, 1, 2, 4], 60)  # classes 3, 5, 6 absent from the test split
    predicted = np.where(rng.random(60) < 0.6, labels, rng.integers(0, 7, 60))
    codes = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    out = classifier_metrics(predicted, labels, codes)
    p, t = torch.as_tensor(predicted), torch.as_tensor(labels)
    f1 = tm.multiclass_f1_score(p, t, num_classes=7, average=None, zero_division=0)
    recall = tm.multiclass_recall(p, t, num_classes=7, average=None, zero_division=0)
    assert out["accuracy"] == pytest.approx(float((p == t).float().mean()))
    assert out["macro_f1"] == pytest.approx(float(f1[[0, 1, 2, 4]].mean()))
    assert set(out["per_class_recall"]) == {"akiec", "bcc", "bkl", "mel"}
    assert out["per_class_recall"]["mel"] == pytest.approx(float(recall[4]))


def test_segmenter_metrics_and_models():
    import torch

    from skindual.downstream import SmallUNet, build_model, segmenter_metrics

    a = np.zeros((2, 4, 4), np.uint8)
    b = np.zeros((2, 4, 4), np.uint8)
    a[0, :2], b[0, :1] = 1, 1  # 8 vs 4 pixels, 4 shared: Dice 2·4/12, IoU 4/8; image 2: both empty → 1
    assert segmenter_metrics(a, b) == pytest.approx({"dice": (2 / 3 + 1) / 2, "iou": (0.5 + 1) / 2})
    x = torch.zeros(2, 3, 32, 32)
    assert SmallUNet()(x).shape == (2, 1, 32, 32)
    assert build_model("resnet18")(x).shape == (2, 7) and build_model("small")(x).shape == (2, 7)


def test_summary_is_mean_std_and_gain_per_arm():
    from skindual.downstream import summarise

    results = [{"arm": arm, "model": "classifier", "seed": s, "accuracy": acc, "macro_f1": acc / 2,
                "per_class_recall": {"df": acc}}
               for arm, accs in (("real", (0.5, 0.7)), ("real+synthetic", (0.8, 0.8))) for s, acc in enumerate(accs)]
    results += [{"arm": arm, "model": "segmenter", "seed": 0, "dice": d, "iou": d / 2}
                for arm, d in (("real", 0.6), ("real+synthetic", 0.7))]
    summary = summarise(results)
    acc = summary["classifier"]["accuracy"]
    assert acc["real"] == pytest.approx({"mean": 0.6, "std": np.std([0.5, 0.7], ddof=1), "n": 2})
    assert acc["gain"] == pytest.approx(0.2) and summary["classifier"]["recall_df"]["gain"] == pytest.approx(0.2)
    assert summary["segmenter"]["dice"]["gain"] == pytest.approx(0.1)
    assert summary["segmenter"]["iou"]["real"]["std"] == 0.0
