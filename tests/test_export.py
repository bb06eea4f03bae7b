"""skindual.export and jobs/export.py: the exports are read back as nnU-Net v2 and torchvision expect them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from fixture_data import tamper_shard, write_test_shards
from PIL import Image

from skindual.errors import UserError
from skindual.export import ExportConfig, plan_export, run_export
from skindual.pairs import read_index
from skindual.prompts import CLASS_BY_CODE, CLASS_CODES
from skindual.shards import read_shards
from skindual.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def shard_pairs(url: str) -> dict[str, dict]:
    return {s["key"]: s for s in read_shards(url)}


def check_nnunet_dataset(folder: Path, ignore: bool = False) -> dict:
    """nnU-Net v2's raw-dataset conventions (documentation/dataset_format.md) for 2D RGB PNG data; with `ignore`,
    its ignore label (documentation/ignore_label.md: named "ignore", the highest label)."""
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "R", "1": "G", "2": "B"}
    assert meta["labels"] == {"background": 0, "lesion": 1, **({"ignore": 2} if ignore else {})}
    assert meta["file_ending"] == ".png"
    images = sorted((folder / "imagesTr").iterdir())
    labels = sorted((folder / "labelsTr").iterdir())
    cases = [p.name.removesuffix("_0000.png") for p in images]
    assert all(p.name.endswith("_0000.png") for p in images)  # one file (channel 0000) holding R, G and B
    assert [p.name for p in labels] == [c + ".png" for c in cases]
    assert meta["numTraining"] == len(cases) == len(set(cases))
    for image_path, label_path in zip(images, labels):
        image, label = np.asarray(Image.open(image_path)), np.asarray(Image.open(label_path))
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert label.dtype == np.uint8 and label.shape == image.shape[:2]
        assert set(np.unique(label)) <= {0, 1, 2} if ignore else {0, 1}  # consecutive integer labels, background 0
    return meta


def export(cfg: ExportConfig) -> dict:
    plan = plan_export(cfg)
    return plan.done or run_export(plan)


def test_nnunet_export_of_local_shards(eval_world, tmp_path):
    summary = export(ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path)))
    folder = tmp_path / "Dataset501_SkinDualGen"
    meta = check_nnunet_dataset(folder)
    pairs = shard_pairs(eval_world["synthetic"])
    assert meta["numTraining"] == len(pairs) == len(eval_world["pairs"]) and summary["counts"] == {"synthetic_train": 28}
    key, sample = next(iter(pairs.items()))
    assert np.array_equal(np.asarray(Image.open(folder / "imagesTr" / f"syn_{key}_0000.png")), sample["image"])
    assert np.array_equal(np.asarray(Image.open(folder / "labelsTr" / f"syn_{key}.png")), sample["mask"])
    assert not (folder / "imagesTs").exists()
    # the same export again is already done; one of other settings into the same place is refused, then
    # replaced with --overwrite
    assert export(ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path))) == summary
    with pytest.raises(UserError, match="--overwrite"):
        plan_export(ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path), size=16))
    (folder / "imagesTr" / "stale_0000.png").write_bytes(b"")
    export(ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path), overwrite=True))
    assert not (folder / "imagesTr" / "stale_0000.png").exists()


def test_nnunet_export_writes_ignore_maps_as_the_ignore_label(tmp_path):
    write_test_shards(tmp_path / "synthetic", [("df", 1), ("vasc", 2), ("nv", 3), ("mel", 4)], per_shard=4,
                      ignore_rows=5)
    pairs = shard_pairs(str(tmp_path / "synthetic"))
    summary = export(ExportConfig(synthetic=str(tmp_path / "synthetic"), output=str(tmp_path / "out")))
    folder = tmp_path / "out" / "Dataset501_SkinDualGen"
    check_nnunet_dataset(folder, ignore=True)
    assert summary["pairs_with_ignored_pixels"] == 2
    for key, sample in pairs.items():
        label = np.asarray(Image.open(folder / "labelsTr" / f"syn_{key}.png"))
        assert np.array_equal(label, np.where(sample["ignore"] > 0, 2, sample["mask"]))
        assert sample["ignore"][:5].all() == (int(key) % 2 == 1) and not sample["ignore"][5:].any()
    # resized, an ignore map keeps every pixel it reaches; without --ignore-maps, only the masks' labels
    export(ExportConfig(synthetic=str(tmp_path / "synthetic"), output=str(tmp_path / "small"), size=24))
    label = np.asarray(Image.open(tmp_path / "small" / "Dataset501_SkinDualGen" / "labelsTr" / "syn_000000001.png"))
    assert (label[:3] == 2).all() and not (label[4:] == 2).any()
    export(ExportConfig(synthetic=str(tmp_path / "synthetic"), output=str(tmp_path / "plain"), ignore_maps=False))
    check_nnunet_dataset(tmp_path / "plain" / "Dataset501_SkinDualGen")


def test_nnunet_export_merged_with_real_and_resized(eval_world, tmp_path):
    cfg = ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path), with_real=eval_world["real"],
                       dataset_id=7, dataset_name="Lesions", size=24)
    summary = export(cfg)
    folder = tmp_path / "Dataset007_Lesions"
    meta = check_nnunet_dataset(folder)
    splits = read_index(eval_world["real"]).column("split").to_pylist()
    assert summary["counts"] == {"synthetic_train": 28, "real_train": splits.count("train"),
                                 "real_test": splits.count("test")}
    assert meta["numTraining"] == 28 + splits.count("train")
    test_images = sorted(p.name for p in (folder / "imagesTs").iterdir())
    assert len(test_images) == splits.count("test") and all(n.startswith("real_") for n in test_images)
    assert len(list((folder / "labelsTs").iterdir())) == len(test_images)
    assert all(Image.open(p).size == (24, 24) for p in (folder / "imagesTr").iterdir())


def test_msd_export_merged_with_real_lists_every_item_with_the_same_keys(tmp_path, eval_world):
    """A Decathlon datalist: every training item has an ignore map once the synthetic pairs carry them (all 0 for a
    pair without one, and for the real pairs), the real test split is listed with its labels, and the licence is
    the synthetic output's."""
    from fixture_data import write_test_output

    write_test_output(tmp_path / "synthetic", [("df", 1), ("vasc", 2), ("nv", 3), ("mel", 4)], per_shard=4,
                      ignore_rows=5, license="cc-by-nc-4.0")
    summary = export(ExportConfig(synthetic=str(tmp_path / "synthetic"), output=str(tmp_path / "out"), format="msd",
                                  with_real=eval_world["real"], dataset_id=12, dataset_name="Lesions"))
    folder = tmp_path / "out" / "Task012_Lesions"
    meta = json.loads((folder / "dataset.json").read_text())
    splits = read_index(eval_world["real"]).column("split").to_pylist()
    assert meta["licence"] == "cc-by-nc-4.0" and meta["labels"] == {"0": "background", "1": "lesion"}
    assert meta["numTraining"] == len(meta["training"]) == 4 + splits.count("train") == summary["counts"][
        "synthetic_train"] + summary["counts"]["real_train"]
    assert meta["numTest"] == len(meta["test"]) == splits.count("test")
    assert all(set(item) == {"image", "label", "ignore", "class"} for item in meta["training"])
    assert all(set(item) == {"image", "label", "class"} and "/imagesTs/real_" in item["image"] for item in meta["test"])
    pairs = shard_pairs(str(tmp_path / "synthetic"))
    for item in meta["training"]:
        label, ignore = (np.asarray(Image.open(folder / item[k])) for k in ("label", "ignore"))
        assert set(np.unique(label)) <= {0, 1} and set(np.unique(ignore)) <= {0, 1}
        key = Path(item["image"]).stem.removeprefix("syn_")
        if key in pairs:
            assert np.array_equal(label, pairs[key]["mask"]) and np.array_equal(ignore, pairs[key]["ignore"])
            assert item["class"] == pairs[key]["class_index"]
        else:
            assert not ignore.any()
    # without --ignore-maps, or pairs without maps: no ignore key at all
    export(ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path / "plain"), format="msd"))
    plain = json.loads((tmp_path / "plain" / "Task501_SkinDualGen" / "dataset.json").read_text())
    assert all(set(item) == {"image", "label", "class"} for item in plain["training"]) and plain["licence"] == "unknown"


def test_imagefolder_export_reads_back_with_torchvision(eval_world, tmp_path):
    from torchvision.datasets import ImageFolder

    summary = export(ExportConfig(synthetic=eval_world["synthetic"], output=str(tmp_path), format="imagefolder",
                                      with_real=eval_world["real"]))
    dataset = ImageFolder(str(tmp_path))
    real_train = read_index(eval_world["real"]).column("split").to_pylist().count("train")
    assert len(dataset) == 28 + real_train
    assert dataset.class_to_idx == {c.code: c.index for c in CLASS_BY_CODE.values()} == summary["class_to_idx"]
    by_name = {Path(path).stem: target for path, target in dataset.samples}
    for key, sample in shard_pairs(eval_world["synthetic"]).items():
        assert by_name[key] == sample["class_index"]
    image, target = dataset[0]
    assert image.mode == "RGB" and CLASS_CODES[target] == Path(dataset.samples[0][0]).parent.name


def test_export_from_and_to_s3(s3_env, tmp_path):
    source, target = s3_env + "/synthetic", s3_env + "/nnunet"
    write_test_shards(source, [("df", 1), ("vasc", 2), ("nv", 3)], per_shard=2)
    export(ExportConfig(synthetic=source, output=target))
    storage = open_storage(target)
    names = storage.list()
    assert "export.json" in names and "Dataset501_SkinDualGen/dataset.json" in names
    local = tmp_path / "Dataset501_SkinDualGen"
    for name in names:
        if name.startswith("Dataset501_SkinDualGen/"):
            storage.download_file(name, tmp_path / name)
    assert check_nnunet_dataset(local)["numTraining"] == 3


def test_config_and_job_errors(tmp_path):
    with pytest.raises(UserError, match="--dataset-id"):
        ExportConfig(dataset_id=1000)
    with pytest.raises(UserError, match="--real-splits"):
        ExportConfig(real_splits="training")
    (tmp_path / "empty").mkdir()
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--synthetic", str(tmp_path / "empty"),
                          "--output", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no committed shards" in errors[0] and "Traceback" not in run.stderr


def test_export_refuses_a_shard_with_a_traversal_or_symlink_member_in_one_line(tmp_path):
    """A shard whose tar holds ``../x`` (or a symlink where a pair's image should be) behind a matching
    _stats.json: the export job ends in one line naming the shard and member, before it writes anything."""
    for case in ("traversal", "symlink"):
        source = tmp_path / case / "synthetic"
        write_test_shards(source, [("df", 1), ("vasc", 2), ("nv", 3), ("mel", 4)], per_shard=4)
        tamper_shard(source, 0, case)
    source, output = tmp_path / "traversal" / "synthetic", tmp_path / "traversal" / "out"
    run = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--synthetic", str(source),
                          "--output", str(output)], capture_output=True, text=True, timeout=120)
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr
    assert len(errors) == 1 and f"--synthetic shard 00000 of {source}: member '../x' is not named" in errors[0]
    assert not output.exists() or not any(output.iterdir())
    source = tmp_path / "symlink" / "synthetic"  # the same check in the plan, in this process
    with pytest.raises(UserError, match=rf"^--synthetic shard 00000 of {source}: member '000000002.jpg' is a "
                                        "symbolic link, not a regular file; run the job that wrote it again"):
        plan_export(ExportConfig(synthetic=str(source), output=str(tmp_path / "symlink" / "out")))
