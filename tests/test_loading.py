"""The loaders users already use, on a real output: each recipe of README.md's "Loading the pairs" runs here as
the README (and every dataset card, `skindual.card.RECIPES`) prints it, from a folder holding the output as
``skindual-synthetic``, with the real library (webdataset, Hugging Face datasets, MONAI); image, mask, class and
json arrive as such.  The Ray Data recipe runs on the generate job's own output (test_generate)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from fixture_data import write_test_output
from PIL import Image

from skindual import card
from skindual.cli import parse_config
from skindual.export import ExportConfig, plan_export, run_export
from skindual.prompts import CLASS_BY_CODE
from skindual.shards import read_shards

ROOT = Path(__file__).resolve().parents[1]
PAIRS = [(code, 1000 * i + k) for i, code in enumerate(("bcc", "mel", "nv")) for k in range(4)]  # 12 pairs, 2 shards
SIDE = 32


def readme_recipes() -> list[tuple[str, str]]:
    """(language, code) of every code block in README.md's "Loading the pairs"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Loading the pairs\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(python|bash)\n(.*?)```", section, re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder holding a finished output (with ignore maps on every other pair) as ``skindual-synthetic``."""
    root = tmp_path_factory.mktemp("loading")
    write_test_output(root / "skindual-synthetic", PAIRS, per_shard=8, ignore_rows=3, license="cc-by-4.0")
    return root


def run_recipe(name: str, workdir: Path, monkeypatch) -> dict:
    """Execute a recipe as printed, from `workdir`; its variables."""
    monkeypatch.chdir(workdir)
    scope: dict = {"__name__": f"recipe_{name}"}
    exec(compile(card.RECIPES[name], f"<README recipe {name}>", "exec"), scope)
    return scope


def expected(workdir: Path) -> dict[str, dict]:
    """The output's pairs as skindual's reader decodes them, by key."""
    return {s["key"]: s for s in read_shards(str(workdir / "skindual-synthetic"))}


def same_json(got: dict, want: dict) -> bool:
    """The same metadata, floats to 1e-12 (datasets' Json feature stores them through ujson, its last digit may move)."""
    return got.keys() == want.keys() and all(
        got[k] == pytest.approx(v, rel=1e-12) if isinstance(v, float) else got[k] == v for k, v in want.items())


def test_the_readme_prints_the_recipes_of_the_cards_verbatim():
    assert readme_recipes() == [("python", code) for name, code in card.RECIPES.items() if name != "monai"] + [
        ("bash", card.EXPORT_MSD + "\n"), ("python", card.RECIPES["monai"])]


def test_webdataset_and_skindual_recipes(workdir, monkeypatch):
    scope = run_recipe("webdataset", workdir, monkeypatch)
    truth = expected(workdir)
    seen = 0
    for image, mask, ignore, label, meta in scope["pairs"]:
        pair = truth[meta["key"]]
        assert image.dtype == np.uint8 and image.shape == (SIDE, SIDE, 3)
        assert np.array_equal(mask, pair["mask"] * 255) and np.array_equal(ignore > 0, pair["ignore"] > 0)
        assert label == pair["class_index"] == CLASS_BY_CODE[meta["class_code"]].index
        seen += 1
    assert seen == len(PAIRS)
    images, masks, ignores, labels, metas = next(iter(scope["loader"]))  # batches through DataLoader workers
    assert images.shape[1:] == (SIDE, SIDE, 3) and len(labels) == len(metas) <= 16

    scope = run_recipe("skindual", workdir, monkeypatch)
    assert tuple(scope["image"].shape) == (3, SIDE, SIDE) and tuple(scope["mask"].shape) == (1, SIDE, SIDE)
    assert tuple(scope["ignore"].shape) == (1, SIDE, SIDE) and scope["meta"]["class_index"] == scope["label"]


def test_hugging_face_datasets_recipes(workdir, monkeypatch, tmp_path):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    truth = expected(workdir)
    scope = run_recipe("datasets", workdir, monkeypatch)
    pairs = scope["pairs"]
    assert len(pairs) == len(PAIRS)
    for pair in pairs:
        want = truth[pair["__key__"]]
        assert pair["jpg"].mode == "RGB" and pair["jpg"].size == (SIDE, SIDE)
        assert pair["seg.png"].mode == "L" and np.array_equal(np.asarray(pair["seg.png"]), want["mask"] * 255)
        assert pair["cls"] == want["class_index"] and pair["txt"] == want["prompt"]
        assert same_json(pair["json"], want["meta"])
        ignore = pair["ignore.png"]  # every other pair has a map (including its redraws' rejections in the json)
        assert (ignore is None) == (not want["ignore"].any())
    # the card declares the features: the folder alone loads the same
    card_pairs = run_recipe("datasets-card", workdir, monkeypatch)["pairs"]
    assert card_pairs.column_names == [n for n in pairs.column_names]
    assert sorted(card_pairs["__key__"]) == sorted(truth) and same_json(card_pairs[0]["json"], pairs[0]["json"])


def test_monai_recipe_on_the_msd_export(workdir, monkeypatch):
    command = shlex.split(card.EXPORT_MSD)
    assert command[:2] == ["python", "jobs/export.py"]
    monkeypatch.chdir(workdir)
    cfg = parse_config(ExportConfig, command[2:], "")
    summary = run_export(plan_export(cfg))
    assert summary["counts"] == {"synthetic_train": len(PAIRS)}
    truth = {f"syn_{k}": v for k, v in expected(workdir).items()}
    scope = run_recipe("monai", workdir, monkeypatch)
    assert scope["keys"] == ["image", "label", "ignore"] and len(scope["pairs"]) == len(PAIRS)
    for item, pair in zip(scope["items"], scope["pairs"]):
        want = truth[Path(item["image"]).stem]
        image, label, ignore = (np.asarray(pair[k]) for k in ("image", "label", "ignore"))
        assert image.shape == (3, SIDE, SIDE) and label.shape == ignore.shape == (1, SIDE, SIDE)
        # MONAI's PIL reader puts width first: the arrays are the PNGs transposed
        assert np.array_equal(label[0].T, want["mask"]) and np.array_equal(ignore[0].T, want["ignore"])
        assert np.array_equal(image.transpose(2, 1, 0), np.asarray(Image.open(item["image"])))
        assert pair["class"] == want["class_index"]
