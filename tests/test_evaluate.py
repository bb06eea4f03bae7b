"""jobs/evaluate.py end to end on demo shards and a prepared real dataset, on a real local Ray cluster
(conftest `ray_cluster`), with the offline lesion-cnn extractor; bad inputs are one line and exit
status 2 from the job's entry point (`run_job(main)`, in process, before any cluster work: the
subprocess path of errors is tested in test_export)."""

from __future__ import annotations

import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import job_runs as jobs
from fixture_data import assert_outlined, read_card, write_test_shards
from fixture_servers import ray_list
from skindual.cli import run_job
from skindual.evaluate_plan import EvaluateConfig
from skindual.prompts import CLASS_CODES
from skindual.report import MASK_OUTLINE, QC_OUTLINE, agreement_sheet, headline_lines, render_report
from skindual.shards import read_shards
from skindual.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "evaluate.py"
# tiny on purpose (2 busy cores): 32² pairs, a 10-step extractor, 6-step downstream models, 2 seeds
FAST = ["--feature-extractor", "lesion-cnn", "--extractor-steps", "10", "--size", "32", "--classifier", "small",
        "--steps", "6", "--batch-size", "8", "--seeds", "2", "--kid-subsets", "10", "--grid-per-class", "2"]
FIGURES = (*(f"sheet_{code}.png" for code in CLASS_CODES), "fd_per_class.png", "mask_statistics.png")


def run_evaluate(args: list[str], ray_address: str | None = None, timeout: int = 240):
    return jobs.run_job("evaluate", args, ray_address, timeout=timeout)


def untrained_segmenter(folder: Path) -> str:
    """A QC segmenter of this tool's format with seeded random weights (its figures are not the point here)."""
    import torch

    from skindual.downstream import SmallUNet
    from skindual.qc_model import QCModelConfig, write_segmenter

    torch.manual_seed(0)
    write_segmenter(QCModelConfig(output=str(folder), size=32, width=8), SmallUNet(8), {"val_dice": None})
    return str(folder)


def test_the_job_end_to_end_on_a_ray_cluster_writing_to_s3(eval_world, ray_cluster, ray_test_cluster, s3_env, tmp_path):
    cache, output = tmp_path / "cache", s3_env + "/eval"
    qc = ["--qc-segmenter", untrained_segmenter(tmp_path / "qc")]
    run = run_evaluate(["--real", eval_world["real"], "--synthetic", eval_world["synthetic"], "--output", output,
                            "--cache-dir", str(cache), *qc, *FAST], ray_cluster)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "done: FD_lesioncnn" in run.stdout
    # the downstream tasks need no features: all of them were submitted while the extractor still trained
    (extractor,) = sorted(ray_list(ray_test_cluster, "tasks", "func_or_class_name=train_extractor", detail=True),
                          key=lambda t: t["creation_time_ms"])[-1:]  # this run's: the cluster's latest
    downstream = [t for t in ray_list(ray_test_cluster, "tasks", "func_or_class_name=run_task", detail=True)
                  if t["job_id"] == extractor["job_id"]]
    assert len(downstream) == 2 * 2 * 2 and all(t["creation_time_ms"] < extractor["end_time_ms"] for t in downstream)
    storage = open_storage(output)
    assert {"metrics.json", "report.md", "downstream.png", *FIGURES} <= set(storage.list())
    metrics = json.loads(storage.read_bytes("metrics.json"))

    fid = metrics["fidelity"]
    assert (fid["fd_name"], fid["kd_name"]) == ("FD_lesioncnn", "KD_lesioncnn")
    assert "FID" not in json.dumps(fid) and fid["real_features_cached"] is False and fid["extractor_cached"] is False
    assert fid["overall"]["n_synthetic"] == 28 and fid["overall"]["FD_lesioncnn"] > 0
    assert set(fid["per_class"]) == set(metrics["counts"]["synthetic"]) and len(fid["per_class"]) == 7
    assert all(v["spread_ratio"] > 0 for v in fid["per_class"].values())
    assert fid["overall"]["n_real"] == sum(metrics["counts"]["real"].values())

    masks = metrics["mask_statistics"]
    assert set(masks["overall"]) == {"area_fraction", "components", "border_contact", "compactness", "eccentricity"}
    assert masks["overall"]["components"]["synthetic_mean"] == 1.0  # procedural lesions are one blob
    assert set(masks["per_class"]["df"]["area_fraction"]) >= {"wasserstein", "ks", "real_mean", "synthetic_mean"}

    # every pair's features and figures, one parquet per (set, shard) of the feature pass
    features = [n for n in storage.list("features/") if n.endswith(".parquet")]
    assert {n.split("/")[1].rsplit("-", 1)[0] for n in features} == {"real", "synthetic", "real_test"}
    rows = sum(pq.read_table(pa.BufferReader(storage.read_bytes(n))).num_rows for n in features
               if "/synthetic-" in n)
    assert rows == 28
    quality = metrics["pair_quality"]
    assert metrics["synthetic_guided_by_qc_segmenter"] is False  # the stand-in shards were not drawn with guidance
    assert quality["synthetic"]["pairs"] == 28 and 0 <= quality["synthetic"]["consistency_dice"] <= 1
    assert set(quality["real_test"]["class_fidelity"]) == set(metrics["counts"]["real_test"])
    assert quality["synthetic"]["sane_mask_share"] == 1.0  # the stand-in shards are procedural lesions

    down = metrics["downstream"]
    assert len(down["results"]) == 2 * 2 * 2  # (arm, model, seed)
    assert {(r["arm"], r["model"]) for r in down["results"]} == {
        (a, m) for a in ("real", "real+synthetic") for m in ("classifier", "segmenter")}
    real_train = sum(metrics["counts"]["real_train"].values())
    assert {r["train_pairs"] for r in down["results"] if r["arm"] == "real+synthetic"} == {real_train + 28}
    assert {r["train_pairs"] for r in down["results"] if r["arm"] == "real"} == {real_train}
    # the default recipe: pretrain on the synthetic pairs, then fine-tune on the real ones; both arms two schedules
    assert down["settings"]["hybrid"] == "pretrain" and {r["schedules"] for r in down["results"]} == {2}
    assert {r["test_pairs"] for r in down["results"]} == {sum(metrics["counts"]["real_test"].values())}
    for model, metric in (("classifier", "macro_f1"), ("classifier", "accuracy"), ("segmenter", "dice"),
                          ("segmenter", "iou")):
        entry = down["summary"][model][metric]
        assert 0 <= entry["real"]["mean"] <= 1 and entry["real"]["n"] == 2
        assert entry["gain"] == pytest.approx(entry["real+synthetic"]["mean"] - entry["real"]["mean"])
    report = storage.read_bytes("report.md").decode()
    assert "FD_lesioncnn" in report and "not FID" in report and "| segmenter | dice |" in report
    assert "the hybrid arm pretrained on the synthetic pairs, then fine-tuned on the real ones" in report
    assert "diversity (synthetic / real spread)" in report and "## Pair quality" in report
    # the evaluated output's dataset card shows the headline figures, and where the report is
    body = read_card(Path(eval_world["synthetic"]))[1]
    assert "## Evaluation" in body and storage.join("report.md") in body
    assert all(f"- {line}" in body for line in headline_lines(metrics)) and "classifier macro_f1" in body
    # per class, the agreement with the QC segmenter and the diversity, synthetic and real, as metrics.json has them
    agreement = {name: quality[name]["qc_consistency_per_class"] for name in ("synthetic", "real_test")}
    assert set(agreement["synthetic"]) == set(fid["per_class"]) and all(0 <= v <= 1 for v in agreement["synthetic"].values())
    assert set(agreement["real_test"]) == set(metrics["counts"]["real_test"])
    section = report[report.index("## Agreement and diversity per class"):]
    assert "No QC segmenter was given" not in section
    for code, v in fid["per_class"].items():
        figures = [agreement["synthetic"][code], agreement["real_test"].get(code), v["spread_synthetic"], v["spread_real"]]
        cells = ["–" if x is None else f"{x:.3f}" for x in figures] + [f"{v['spread_ratio']:.2f}"]
        assert f"| {code} | {' | '.join(cells)} |" in section
        assert f"![{code}](sheet_{code}.png)" in section
    # each class's sheet: a row of synthetic and one of real test pairs, the masks outlined
    sheet = np.asarray(Image.open(io.BytesIO(storage.read_bytes("sheet_df.png"))).convert("RGB"))
    assert np.all(sheet == MASK_OUTLINE, axis=-1).sum() > 2 * 2 * 20
    # without a segmenter the report says how to get the agreement figures and outlines
    unscored = json.loads(json.dumps(metrics))
    for name in ("synthetic", "real_test"):
        del unscored["pair_quality"][name]["qc_consistency_per_class"]
    text = render_report(unscored, list(FIGURES))
    assert "pass its output as `--qc-segmenter`" in text and "| df | – | – |" in text

    # side by side (neither writes what the other reads): a rerun of the same inputs and settings, which keeps the
    # report (no cluster work: the same bytes, its timings too), and one into a local folder without the benchmark,
    # whose extractor and real features come from the cache
    before = {name: storage.read_bytes(name) for name in ("metrics.json", "report.md")}
    inputs = ["--real", eval_world["real"], "--synthetic", eval_world["synthetic"], "--cache-dir", str(cache), *qc, *FAST]
    run, local_run = jobs.run_jobs([("evaluate", [*inputs, "--output", output, "--actors", "1"]),
                                    ("evaluate", [*inputs, "--output", str(tmp_path / "local"), "--no-downstream"])],
                                   ray_cluster, timeout=240)
    assert run.returncode == 0 and "already holds the evaluation of these inputs and settings" in run.stderr, run.stderr
    assert {name: storage.read_bytes(name) for name in before} == before and "done: FD_lesioncnn" in run.stdout

    run = local_run
    assert run.returncode == 0, run.stderr[-3000:]
    local = json.loads((tmp_path / "local" / "metrics.json").read_text())
    assert local["fidelity"]["real_features_cached"] is True and local["fidelity"]["extractor_cached"] is True
    assert "downstream" not in local
    assert local["fidelity"]["overall"] == pytest.approx(fid["overall"])
    assert all((tmp_path / "local" / f).is_file() for f in FIGURES)


def test_a_class_sheet_draws_the_qc_segmenters_outline_beside_the_pairs_mask(eval_world):
    pairs = [p for p in read_shards(eval_world["synthetic"]) if p["meta"]["class_code"] == "mel"][:3]
    for p in pairs:
        p["qc"] = np.roll(p["mask"], 5, axis=1)  # the segmenter's mask: another outline
    rows = {"synthetic": pairs[:2], "real (test)": pairs[2:]}
    image, boxes = agreement_sheet(rows)
    sheet = np.asarray(image)
    assert [len(row) for row in boxes] == [2, 1] and all(len(group) == 2 for row in boxes for group in row)
    for row, row_boxes in zip(rows.values(), boxes):
        for pair, (own, beside) in zip(row, row_boxes):
            assert beside[0] > own[2] and beside[1] == own[1]  # right beside it
            assert_outlined(sheet, own, pair["mask"])
            assert_outlined(sheet, beside, pair["qc"], QC_OUTLINE)
    del pairs[0]["qc"], pairs[1]["qc"], pairs[2]["qc"]
    assert [len(group) for row in agreement_sheet(rows)[1] for group in row] == [1, 1, 1]  # no segmenter: the mask


def test_the_fingerprint_follows_the_inputs_and_settings_not_the_workers(eval_world, tmp_path):
    """What decides whether a rerun keeps a finished evaluation (the plan's `done`)."""
    import shutil
    from dataclasses import replace

    from skindual.evaluate_plan import plan_evaluate

    cfg = EvaluateConfig(real=eval_world["real"], synthetic=eval_world["synthetic"], output=str(tmp_path / "out"),
                         feature_extractor="lesion-cnn")
    base = plan_evaluate(cfg).fingerprint
    same = replace(cfg, actors=5, cpus_per_task=2, output=str(tmp_path / "elsewhere"))
    assert plan_evaluate(same).fingerprint == base
    for other in (replace(cfg, steps=7), replace(cfg, seeds=1), replace(cfg, real_fraction=0.5), replace(cfg, hybrid="mix")):
        assert plan_evaluate(other).fingerprint != base
    # one shard of the synthetic set drawn again (other seeds): other content, another fingerprint
    synthetic = tmp_path / "synthetic"
    shutil.copytree(eval_world["synthetic"], synthetic)
    write_test_shards(synthetic, [(code, seed + 1) for code, seed in eval_world["pairs"][:16]])
    moved = replace(cfg, synthetic=str(synthetic))
    redrawn = plan_evaluate(moved).fingerprint
    shutil.copytree(eval_world["synthetic"], synthetic, dirs_exist_ok=True)  # the original bytes back
    assert redrawn != plan_evaluate(moved).fingerprint

    # a metrics.json of that fingerprint is kept, unless --recompute; another one or none is not
    out = Path(cfg.output)
    assert plan_evaluate(cfg).done is None and not out.exists()  # a plan checks the output, creates nothing
    out.mkdir()
    (out / "metrics.json").write_text(json.dumps({"fingerprint": base, "seconds": 1.0}))
    assert plan_evaluate(cfg).done == {"fingerprint": base, "seconds": 1.0}
    assert plan_evaluate(replace(cfg, recompute=True)).done is None
    assert plan_evaluate(replace(cfg, steps=7)).done is None
    (out / "metrics.json").write_text("[1, 2]")
    assert plan_evaluate(cfg).done is None


def test_fd_from_summed_moments_is_the_in_memory_fd():
    """The streaming FD (moments summed over any split of the features) against clean-fid on the arrays."""
    from skindual import fidelity

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(300, 16)) * 3 + 1, rng.normal(size=(200, 16)) + 0.5
    parts = [fidelity.Moments.of(a[i:i + 70]) for i in range(0, 300, 70)]
    streamed = fidelity.frechet_from_moments(sum(parts[1:], parts[0]), fidelity.Moments.of(b))
    assert streamed == pytest.approx(fidelity.frechet_distance(a, b), rel=1e-9)
    keys = [f"k{i}" for i in range(300)]
    whole = fidelity.FeatureSummary.of(a, keys, seed=3, k=50)
    split = fidelity.FeatureSummary.of(a[:120], keys[:120], 3, 50) + fidelity.FeatureSummary.of(a[120:], keys[120:], 3, 50)
    assert np.array_equal(whole.sample, split.sample) and whole.moments.count == split.moments.count == 300
    small = [fidelity.FeatureSummary.of(a[i:i + 20], keys[i:i + 20], 3, 50) for i in range(0, 100, 20)]
    merged = sum(small[1:], small[0])  # parts smaller than k: the sample of the whole is all 100, up to k = 50
    reverse = sum(small[-2::-1], small[-1])
    assert len(merged.sample) == 50 and np.array_equal(merged.sample, reverse.sample)
    assert np.array_equal(merged.sample, fidelity.FeatureSummary.of(a[:100], keys[:100], 3, 50).sample)


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
    line = _one_error_line(capsys, ["--real", eval_world["real"], "--synthetic", str(tmp_path / "empty"),
                                    "--output", str(tmp_path / "out"), *FAST])
    assert "no committed shards" in line and str(tmp_path / "empty") in line and "--synthetic" in line
    assert not (tmp_path / "out").exists()


def test_a_class_without_real_images(eval_world, tmp_path, capsys):
    from fixture_data import prepare_folder

    from skindual.demo import render
    from skindual.prompts import CLASS_CODES

    render.write_demo_dataset(tmp_path / "data", {c: 6 for c in CLASS_CODES if c != "vasc"}, seed=5)
    real = prepare_folder(tmp_path / "data", tmp_path / "real")
    line = _one_error_line(capsys, ["--real", str(real), "--synthetic", eval_world["synthetic"],
                                    "--output", str(tmp_path / "out"), *FAST])
    assert "class vasc" in line and "no real images" in line and "'train' split" in line


def test_mismatched_image_sizes(eval_world, tmp_path, capsys):
    shards = tmp_path / "mixed"
    write_test_shards(shards, [("nv", 1), ("df", 2)], size=32)
    write_test_shards(shards, [("nv", 3)], size=24, first_shard=1)
    line = _one_error_line(capsys, ["--real", eval_world["real"], "--synthetic", str(shards),
                                    "--output", str(tmp_path / "out"), *FAST])
    assert "mismatched image sizes" in line and "000010000 is 24x24" in line and "32x32" in line


def test_bad_flags_name_the_flag(capsys):
    assert "--size" in _one_error_line(capsys, ["--size", "30"])
    assert "--seeds" in _one_error_line(capsys, ["--seeds", "0"])
    assert "--real-fraction" in _one_error_line(capsys, ["--real-fraction", "0"])


def test_real_fraction_keeps_a_share_of_every_class(eval_world):
    from skindual.data import classed_rows, fraction_per_class
    from skindual.pairs import read_index

    rows = classed_rows(read_index(eval_world["real"]), "train")
    counts = np.bincount(np.asarray(rows.column("class_index")), minlength=7)
    part = fraction_per_class(rows, 0.3, seed=0)
    part_counts = np.bincount(np.asarray(part.column("class_index")), minlength=7)
    assert part_counts.tolist() == [int(np.ceil(0.3 * n)) for n in counts]  # rounded up: every class stays
    assert set(part.column("key").to_pylist()) <= set(rows.column("key").to_pylist())
    assert fraction_per_class(rows, 0.3, seed=0).equals(part)  # seeded
    assert not fraction_per_class(rows, 0.3, seed=1).equals(part)
    assert fraction_per_class(rows, 1.0, seed=0) is rows


def test_separate_test_data_is_the_downstream_test_set(eval_world, tmp_path, capsys):
    from fixture_data import prepare_folder

    from skindual.demo import render
    from skindual.data import ISIC_IMAGES, ISIC_MASKS
    from skindual.evaluate_plan import plan_evaluate
    from skindual.prompts import CLASS_CODES

    render.write_demo_dataset(tmp_path / "test", {c: 3 for c in CLASS_CODES}, seed=9, first_number=500_000)
    test = prepare_folder(tmp_path / "test", tmp_path / "test-real")
    base = ["--real", eval_world["real"], "--synthetic", eval_world["synthetic"], "--output", str(tmp_path / "out"),
            *FAST]
    common = {"real": eval_world["real"], "synthetic": eval_world["synthetic"], "size": 32,
              "feature_extractor": "lesion-cnn"}
    plan = plan_evaluate(EvaluateConfig(**common, test_data=str(test)))
    assert list(plan.counts["real_test"].values()) == [3] * 7  # every pair, all its splits
    own = plan_evaluate(EvaluateConfig(**common))
    assert len(own.sets["real_test"]) < 21 and len(plan.train) == len(own.train)
    assert plan.sets["real_test"].url == str(test) and own.sets["real_test"].url == eval_world["real"]

    # a "test" set that shares images with the train split is refused, naming the flag and an image
    line = _one_error_line(capsys, [*base, "--test-data", eval_world["real"]])
    assert f"--test-data {eval_world['real']}" in line and "image_id(s) also in the train split" in line
    assert "ISIC_" in line and not (tmp_path / "out").exists()
    # and one with no classed pairs: ISIC 2018 (masks, no classes)
    for i in range(3):
        image, mask = render.render_lesion("nv", 40 + i, (48, 48))
        (tmp_path / "isic" / ISIC_IMAGES).mkdir(parents=True, exist_ok=True)
        (tmp_path / "isic" / ISIC_MASKS).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(tmp_path / "isic" / ISIC_IMAGES / f"ISIC_{9000000 + i}.jpg")
        Image.fromarray(mask * 255).save(tmp_path / "isic" / ISIC_MASKS / f"ISIC_{9000000 + i}_segmentation.png")
    from skindual.prepare import PrepareConfig, prepare_here

    prepare_here(PrepareConfig(isic2018=str(tmp_path / "isic"), output=str(tmp_path / "isic-real")))
    line = _one_error_line(capsys, [*base, "--test-data", str(tmp_path / "isic-real")])
    assert "--test-data" in line and "no pairs with a class" in line


def test_the_embedded_default_is_the_demo_world_and_its_balanced_test_set(skindual_cache, tmp_path):
    from skindual.demo.world import DEMO_TEST_PER_CLASS
    from skindual.demo.world import evaluate_defaults as resolve_inputs
    from skindual.pairs import read_index

    cfg = resolve_inputs(EvaluateConfig(), demo_output=str(tmp_path / "demo"))
    assert cfg.real == str(tmp_path / "demo" / "real")
    assert cfg.test_data == str(tmp_path / "demo" / "real-test")
    test = read_index(cfg.test_data)
    assert np.bincount(np.asarray(test.column("class_index")), minlength=7).tolist() == [DEMO_TEST_PER_CLASS] * 7
    train = read_index(cfg.real)
    assert not set(test.column("image_id").to_pylist()) & set(train.column("image_id").to_pylist())
    # a given --test-data is kept; a given --real is left alone, test set and all
    mine = resolve_inputs(EvaluateConfig(test_data="mine"), demo_output=str(tmp_path / "demo"))
    assert mine.test_data == "mine"
    assert resolve_inputs(EvaluateConfig(real="r")).test_data == ""


def test_missing_inception_weights_by_default(eval_world, tmp_path, capsys, monkeypatch):
    from skindual import fidelity

    monkeypatch.setattr(fidelity, "CLEAN_FID_CACHE", tmp_path)  # as on a machine that never downloaded them
    line = _one_error_line(capsys, ["--real", eval_world["real"], "--synthetic", eval_world["synthetic"],
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
    assert build_model("smp_unet")(x).shape == (2, 1, 32, 32)  # the stock U-Net, no pretrained weights


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


def test_the_segmenter_leaves_the_ignored_pixels_out_of_its_loss():
    import torch

    from skindual.downstream import BenchmarkSettings, PairSet, SmallUNet, segmentation_loss, test_model, train_model
    from skindual.quality import images_to_tensor

    logits, masks = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    ignore = torch.zeros_like(masks)
    ignore[:, :, :3] = 1
    kept = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, :, 3:], masks[:, :, 3:])
    assert segmentation_loss(logits, masks, ignore) == pytest.approx(float(kept), rel=1e-6)
    # each image shows a bright disc (the lesion) and a grey square; two masks in three also claim the square,
    # and those pairs' ignore maps cover it: learnt as lesion, unless the ignored pixels are left out
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    n = 64
    disc, square = np.zeros((n, 32, 32), np.uint8), np.zeros((n, 32, 32), np.uint8)
    for i in range(n):
        cy, cx = rng.integers(8, 12, 2) * (1, 1) + (16 * (i % 2), 0)
        disc[i] = (yy - cy) ** 2 + (xx - cx) ** 2 <= 16
        sy, sx = rng.integers(2, 8), rng.integers(20, 26)
        square[i, sy + 16 * (1 - i % 2):sy + 16 * (1 - i % 2) + 6, sx:sx + 6] = 1
    images = np.repeat((40 + 160 * disc + 70 * square).astype(np.uint8)[..., None], 3, axis=3)
    images += rng.integers(0, 20, images.shape, np.uint8)
    claimed = np.arange(n) % 3 != 0
    wrong = np.where(claimed[:, None, None], disc | square, disc).astype(np.uint8)
    ignore = np.where(claimed[:, None, None], square, 0).astype(np.uint8)

    def trained(ignore_maps: bool):
        def batches():
            g = np.random.default_rng(1)
            while True:
                idx = g.integers(0, 48, 16)
                yield images[idx], wrong[idx], np.zeros(16, np.int64), ignore[idx]

        torch.manual_seed(0)
        settings = BenchmarkSettings(steps=80, batch_size=16, lr=3e-3, ignore_maps=ignore_maps)
        model = train_model(SmallUNet(8, 2), batches(), "segmenter", settings, 0, torch.device("cpu"))
        with torch.no_grad():
            predicted = (model(images_to_tensor(images[48:], torch.device("cpu")))[:, 0] > 0).numpy()
        test = PairSet(images[48:], disc[48:], np.zeros(16, np.int64))
        return predicted[square[48:] > 0].mean(), test_model(model, test, "segmenter", [], torch.device("cpu"))

    (ignored_square, ignored), (learnt_square, learnt) = trained(True), trained(False)
    assert learnt_square > 0.7 and ignored_square < 0.4  # measured: 0.96 and 0.22
    assert ignored["dice"] > learnt["dice"] + 0.1


def test_the_pretrain_recipe_ends_on_the_real_pairs():
    """The hybrid arm's recipes on pairs whose synthetic masks are all wrong (inverted): pretraining on them and
    then fine-tuning on the real pairs recovers the real arm's segmenter, mixing them in does not."""
    import torch

    from skindual.downstream import BenchmarkSettings, PairSet, SmallUNet, arm_stages, test_model, train_schedules

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]

    def pairs(n: int, invert: bool) -> PairSet:
        centres = rng.integers(10, 22, (n, 2))
        masks = ((yy - centres[:, :1, None]) ** 2 + (xx - centres[:, 1:, None]) ** 2 <= 36).astype(np.uint8)
        images = np.repeat((50 + 150 * masks)[..., None], 3, axis=3).astype(np.uint8)
        images += rng.integers(0, 30, images.shape, np.uint8)
        return PairSet(images, 1 - masks if invert else masks, np.zeros(n, np.int64))

    real, synthetic, test = pairs(24, False), pairs(96, True), pairs(24, False)

    def dice(arm: str, hybrid: str) -> float:
        def batches(pools: list[PairSet], k: int):
            pool, g = PairSet.concat(pools), np.random.default_rng(k)
            while True:
                idx = g.integers(0, len(pool), 16)
                yield pool.images[idx], pool.masks[idx], pool.labels[idx]

        torch.manual_seed(0)
        settings = BenchmarkSettings(steps=60, batch_size=16, lr=3e-3)
        stages = arm_stages(arm, hybrid, real, synthetic)
        model = train_schedules(SmallUNet(8, 2), (batches(p, k) for k, p in enumerate(stages)), "segmenter",
                                settings, 0, torch.device("cpu"))
        return test_model(model, test, "segmenter", [], torch.device("cpu"))["dice"]

    assert [len(arm_stages(a, h, real, synthetic)) for a in ("real", "real+synthetic") for h in ("pretrain", "mix")] \
        == [2, 1, 2, 1]
    real_arm, pretrained, mixed = dice("real", "pretrain"), dice("real+synthetic", "pretrain"), dice("real+synthetic", "mix")
    # measured: 1.00, 0.86 (the fine-tune undoes most of 60 steps on wrong masks), 0.00; in the other order ~0
    assert real_arm > 0.9 and pretrained > 0.7 and mixed < 0.5, (real_arm, pretrained, mixed)
