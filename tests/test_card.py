"""skindual.card: every prepare and generate output carries a Hugging Face dataset card (README.md) whose counts
are its manifest's, whose licence is the one given (or says it is unknown), and which an evaluation adds its
headline figures to; a README.md that is not such a card is never overwritten."""

from __future__ import annotations

import json
import logging
import re

import pytest
from fixture_data import card_table, read_card, write_test_output

from skindual import card
from skindual.errors import UserError
from skindual.evaluate import add_to_card
from skindual.evaluate_plan import EvaluateConfig
from skindual.generate_config import GenerateConfig
from skindual.prepare import PrepareConfig, prepare_here
from skindual.prompts import CLASS_CODES
from skindual.run_files import check_output
from skindual.storage import LocalStorage

PAIRS = [(code, 100 * i + k) for i, code in enumerate(("akiec", "df", "vasc")) for k in range(3)]
FEATURES = ["__key__", "jpg", "seg.png", "ignore.png", "cls", "txt", "json"]


def test_a_generate_outputs_card_shows_its_manifests_numbers(tmp_path):
    manifest = write_test_output(tmp_path / "out", PAIRS, per_shard=4, ignore_rows=2, license="cc-by-nc-4.0")
    header, body = read_card(tmp_path / "out")
    assert header["license"] == "cc-by-nc-4.0" and "synthetic" in header["tags"]
    assert header["task_categories"] == ["image-segmentation", "image-classification"]
    assert header["size_categories"] == ["n<1K"]
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "*.tar"}]}]
    assert [f["name"] for f in header["dataset_info"]["features"]] == FEATURES
    counts = card_table(body, "Pairs per class")
    assert {c: int(row[1]) for c, row in counts.items() if c != "all"} == {
        c: n["ok"] for c, n in manifest["totals"]["per_class"].items()}
    assert int(counts["all"][1]) == manifest["totals"]["successes"] == len(PAIRS)
    assert int(counts["all"][2]) == sum(manifest["asked_per_class"].values())
    made = card_table(body, "How they were made")
    draws = manifest["totals"]["draws"]
    assert made["kept"][0].startswith(f"{len(PAIRS)} of {draws} draws passed quality control")
    assert "qc-segmenter" not in made["quality control"][0] and "sha256:abab" in made["quality control"][0]
    assert "**Synthetic**" in body and "Not for diagnosis" in body and "Licence: `cc-by-nc-4.0`" in body
    assert "Partial" not in body and "`{key}.ignore.png`" in body
    assert all(f"```python\n{code}```" in body for code in card.RECIPES.values()) and card.EXPORT_MSD in body


def test_a_partial_output_says_so_and_an_unknown_licence_says_what_to_do(tmp_path):
    write_test_output(tmp_path / "out", PAIRS, complete=False)
    header, body = read_card(tmp_path / "out")
    assert header["license"] == "unknown" and "**Partial**" in body and "rerun the job with `--license`" in body
    assert [f["name"] for f in header["dataset_info"]["features"]] == [f for f in FEATURES if f != "ignore.png"]
    with pytest.raises(UserError, match=r"^--license 'CC BY 4\.0': give a licence id"):
        GenerateConfig(license="CC BY 4.0")
    with pytest.raises(UserError, match="--license"):
        PrepareConfig(ham10000="x", license="Apache 2")
    assert [card.size_category(n) for n in (0, 999, 1000, 35_000, 10**6)] == [
        "n<1K", "n<1K", "1K<n<10K", "10K<n<100K", "1M<n<10M"]


def test_prepare_writes_the_real_datasets_card_and_a_new_licence_reaches_it(tmp_path, monkeypatch):
    import datasets

    from skindual.demo import render

    render.write_demo_dataset(tmp_path / "data", {"nv": 12, "df": 6, "vasc": 6}, seed=2)
    out = tmp_path / "real"
    manifest = prepare_here(PrepareConfig(ham10000=str(tmp_path / "data"), output=str(out), samples_per_shard=10))
    header, body = read_card(out)
    assert header["license"] == "unknown" and "real" in header["tags"] and "synthetic" not in header["tags"]
    assert "ham10000" in header["tags"] and "Synthetic" not in body
    counts, splits = card_table(body, "Pairs per class and split"), manifest["totals"]["per_split"]
    names = list(splits)
    for code, n in manifest["totals"]["per_class"].items():
        assert counts[code][1:] == [str(splits[s].get(code, 0)) for s in names] + [str(n["ok"])]
    assert counts["all"][-1] == str(manifest["totals"]["successes"])
    assert all(f"```python\n{card.RECIPES[n]}```" in body for n in card.REAL_RECIPES) and card.EXPORT_MSD not in body
    # the card's features read the real pairs too (their json's fields differ from the synthetic ones')
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    pairs = datasets.load_dataset(str(out), split="train")
    assert len(pairs) == manifest["totals"]["successes"] and pairs[0]["seg.png"].mode == "L"
    assert {p["json"]["split"] for p in pairs} == set(splits) and set(pairs["cls"]) == {3, 5, 6}

    storage = LocalStorage(out)
    relicensed = card.update_license(storage, manifest, "cc-by-nc-4.0")
    assert json.loads(storage.read_bytes("manifest.json")) == relicensed
    assert relicensed["config"]["license"] == "cc-by-nc-4.0" and relicensed["totals"] == manifest["totals"]
    assert read_card(out)[0]["license"] == "cc-by-nc-4.0"


def test_an_evaluation_adds_its_headline_to_the_card_of_the_same_pairs_only(tmp_path, caplog):
    out = tmp_path / "out"
    manifest = write_test_output(out, PAIRS, per_shard=4)
    storage = LocalStorage(out)
    assert card.add_evaluation(storage, ["FD_lesioncnn 12.34 over all classes"], "s3://bucket/eval/report.md")
    body = read_card(out)[1]
    assert "## Evaluation" in body and "- FD_lesioncnn 12.34 over all classes" in body and "s3://bucket/eval" in body
    card.write_card(storage, manifest)  # a rerun's card of the same pairs keeps it
    assert "- FD_lesioncnn 12.34" in read_card(out)[1]
    card.write_card(storage, {**manifest, "fingerprint": "other pairs"})
    assert "## Evaluation" not in read_card(out)[1]

    # the evaluation's own step: its figures from metrics.json; an output it cannot write is one warning line
    metrics = {"config": {"real": "real", "fid_split": "train"}, "image_size": 32,
               "counts": {"synthetic": {c: 3 for c in ("akiec", "df", "vasc")}, "real": {"akiec": 5}},
               "fidelity": {"fd_name": "FD_lesioncnn", "kd_name": "KD_lesioncnn", "extractor": "lesion-cnn",
                            "overall": {"FD_lesioncnn": 1.5, "KD_lesioncnn": 0.01}}}
    add_to_card(EvaluateConfig(synthetic=str(out)), metrics, "eval/report.md")
    assert "- FD_lesioncnn 1.50, KD_lesioncnn 0.0100 over all classes" in read_card(out)[1]
    blocked = tmp_path / "blocked"
    write_test_output(blocked, PAIRS, per_shard=4)
    (blocked / "README.md").unlink()
    (blocked / "README.md").mkdir()  # a card that cannot be written
    with caplog.at_level(logging.WARNING, "skindual"):
        add_to_card(EvaluateConfig(synthetic=str(blocked)), metrics, "eval/report.md")
    assert re.search(r"the dataset card of .*blocked is unchanged, as it cannot be written there: \[Errno 21\]",
                     caplog.text)


def test_a_readme_that_is_not_a_card_is_never_overwritten(tmp_path, caplog):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README.md").write_text("# my notes\n")
    check_output(LocalStorage(out), {"steps": 1})  # a fresh output: its run files only
    with caplog.at_level(logging.WARNING, "skindual"):
        manifest = write_test_output(out, PAIRS, per_shard=4)
    assert (out / "README.md").read_text() == "# my notes\n" and "is not a skindual dataset card" in caplog.text
    (out / "README.md").unlink()
    card.write_card(LocalStorage(out), manifest)
    check_output(LocalStorage(out), {"steps": 2}, overwrite=True)  # starting afresh deletes the old card
    assert not (out / "README.md").exists() and all(c in CLASS_CODES for c, _ in PAIRS)
