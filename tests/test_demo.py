"""The offline demo world: procedural data read by the real reader, the demo base model, the build job."""

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from conftest import folder_arrays

from skindual import base_models, data, demo_data, demo_model, quality
from skindual.errors import UserError
from skindual.model import load_pipeline
from skindual.storage import file_sha256
from skindual.prompts import CLASSES

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"akiec": 6, "bcc": 6, "bkl": 8, "df": 5, "mel": 8, "nv": 20, "vasc": 5}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return demo_data.write_demo_dataset(tmp_path_factory.mktemp("ham") / "HAM10000", SMALL, seed=3)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return base_models.demo_base_path(cache=tmp_path_factory.mktemp("cache"))


def test_demo_counts_keep_ham10000_proportions():
    counts = demo_data.demo_counts(0.1)
    assert counts["nv"] == 670 and counts["mel"] == 111 and counts["df"] == 12
    assert max(counts, key=counts.get) == "nv" and min(counts, key=counts.get) == "df"


def test_real_reader_reads_the_demo_folder(demo_root):
    report = data.read_ham10000(str(demo_root))
    table = report.table
    assert report.skipped == {}
    codes = table.column("class_code").to_pylist()
    assert {c: codes.count(c) for c in SMALL} == SMALL
    folders = {Path(p).parent.name for p in table.column("image_path").to_pylist()}
    assert folders == set(demo_data.IMAGE_DIRS)
    lesions = table.column("lesion_id").to_pylist()
    assert len(set(lesions)) < len(lesions)  # some lesions have two images, as in HAM10000
    assert set(table.column("dataset").to_pylist()) == {"demo"}


def test_a_second_set_with_other_ids_and_the_low_data_table(demo_root, tmp_path):
    from skindual.data import low_data_table

    other = demo_data.write_demo_dataset(tmp_path / "test", {c: 2 for c in SMALL}, seed=4, first_number=1_000_000)
    ids = [set(data.read_ham10000(str(root)).table.column(k).to_pylist()) for root in (demo_root, other)
           for k in ("image_id", "lesion_id")]
    assert not ids[0] & ids[2] and not ids[1] & ids[3] and "ISIC_1000000" in ids[2]

    table = data.training_table(str(demo_root), seed=0).table
    low = low_data_table(table, 0.3)
    split = lambda t, s: np.asarray(t.column("class_index"))[np.asarray(t.column("split")) == s]
    full, cut = (np.bincount(split(t, "train"), minlength=7) for t in (table, low))
    assert cut.tolist() == [int(np.ceil(0.3 * n)) for n in full]  # a share of each class, none lost
    for s in ("val", "test"):
        assert sorted(split(low, s)) == sorted(split(table, s))
    assert set(low.column("image_id").to_pylist()) <= set(table.column("image_id").to_pylist())


def test_masks_are_exact_and_classes_differ_in_coarse_look(demo_root):
    images, masks, labels = folder_arrays(demo_root, 64)
    assert set(np.unique(masks)) == {0, 1}
    colours = np.stack([img[m.astype(bool)].mean(0) for img, m in zip(images, masks)])
    areas = masks.mean((1, 2))
    features = np.column_stack([colours / 255, areas * 4])
    centroids = np.stack([features[labels == c].mean(0) for c in range(7)])
    nearest = np.argmin(((features[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (nearest == labels).mean() >= 0.9  # mean colour and size alone nearly separate the classes


def test_render_is_deterministic_and_views_share_the_lesion():
    a_img, a_mask = demo_data.render_lesion("mel", 11)
    b_img, b_mask = demo_data.render_lesion("mel", 11)
    c_img, c_mask = demo_data.render_lesion("mel", 11, view=1)
    assert np.array_equal(a_img, b_img) and np.array_equal(a_mask, b_mask)
    assert np.array_equal(a_mask, c_mask) and not np.array_equal(a_img, c_img)


def test_independent_segmenter_agrees_with_demo_masks(demo_root):
    images, masks, labels = folder_arrays(demo_root, 64)
    scores = quality.consistency(images, masks)
    assert scores.mean() >= 0.9, scores
    assert all(quality.mask_check(m) is None for m in masks)


def test_mask_check_reasons():
    empty = np.zeros((32, 32), np.uint8)
    full = np.ones((32, 32), np.uint8)
    split = empty.copy()
    split[2:10, 2:10] = 1
    split[20:28, 20:28] = 1
    assert quality.mask_check(empty) == "empty"
    assert quality.mask_check(full) == "full-frame"
    assert quality.mask_check(split) == "fragmented"
    assert quality.largest_component(split).sum() == 64


def test_shipped_base_loads_through_from_pretrained(base_folder):
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    assert (base_folder / "model_index.json").exists()
    pipe = StableDiffusionPipeline.from_pretrained(str(base_folder), safety_checker=None)
    assert isinstance(pipe.text_encoder, CLIPTextModel) and isinstance(pipe.tokenizer, CLIPTokenizer)
    assert isinstance(pipe.vae, AutoencoderKL) and isinstance(pipe.unet, UNet2DConditionModel)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # every prompt word is a single token of the locally built tokenizer
    assert pipe.tokenizer.tokenize("melanocytic nevus")[:2] == ["melanocytic</w>", "nevus</w>"]
    out = pipe(["a dermoscopy image of melanoma"], num_inference_steps=3, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_base_cache_is_keyed_by_artifact_hash(base_folder, tmp_path):
    digest = file_sha256(base_models.ARTIFACT)[:16]
    assert base_folder.name == digest
    stamp = (base_folder / "model_index.json").stat().st_mtime_ns
    assert base_models.demo_base_path(cache=base_folder.parents[1]) == base_folder
    assert (base_folder / "model_index.json").stat().st_mtime_ns == stamp


def test_shipped_vae_reconstructs_demo_images_and_masks(base_folder, demo_root):
    pipe = load_pipeline(base_folder)
    images, masks, _ = folder_arrays(demo_root, 64)
    figures = demo_model.vae_reconstruction(pipe.vae, images, masks)
    assert figures["psnr_db"] >= 24.0, figures
    assert figures["mask_dice"] >= 0.97, figures


def test_the_vae_loss_adds_the_colour_term_linearly_and_the_round_trip_keeps_the_shape(base_folder, demo_root):
    vae = load_pipeline(base_folder).vae
    images, masks, _ = folder_arrays(demo_root, 64)
    data_ = quality.images_to_tensor(images)

    def loss(weight: float) -> float:  # the same draw each time: the generator fixes batch, flip and sample
        with torch.no_grad():
            return demo_model.vae_batch_loss(vae, data_, 4, torch.Generator().manual_seed(5), weight).item()

    plain, four, eight = loss(0.0), loss(4.0), loss(8.0)
    assert four > plain and eight - plain == pytest.approx(2 * (four - plain), rel=1e-4)
    trip = demo_model.vae_round_trip(vae, images[:6])
    assert trip.dtype == np.uint8 and trip.shape == images[:6].shape
    assert np.abs(trip.astype(float) - images[:6]).mean() < 20  # a reconstruction, not noise


def test_rebuild_recipe_still_runs_shortened(tmp_path):
    recipe = demo_model.PretrainRecipe(per_class=2, vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4)
    pipe, configs = demo_model.pretrain_demo_base(recipe)
    artifact = tmp_path / "base.safetensors"
    demo_model.save_artifact(pipe, recipe, artifact, configs)
    folder = base_models.demo_base_path(artifact, cache=tmp_path / "cache")
    again = load_pipeline(folder)
    assert again.vae.config.scaling_factor == pytest.approx(pipe.vae.config.scaling_factor)
    for name in ("unet", "vae", "text_encoder"):
        for (k, a), b in zip(getattr(pipe, name).state_dict().items(), getattr(again, name).state_dict().values()):
            torch.testing.assert_close(a.half().float(), b, msg=f"{name}.{k}")


def test_a_rebuild_with_other_vae_widths_continues_from_a_base_with_a_fresh_vae(tmp_path):
    """The hard recipe's shape: text encoder and UNet from the easy base, a fresh VAE of other widths
    trained with the colour term, recorded in the artifact's configs and recipe."""
    recipe = demo_model.PretrainRecipe(per_class=2, vae_steps=2, unet_steps=2, batch_size=4, vae_batch_size=4,
                                       difficulty="hard", start_from=str(base_models.ARTIFACT),
                                       vae_channels=(16, 32, 32), vae_colour_weight=4.0, vae_lesion_weight=8.0,
                                       vae_lesion_smooth=True)
    pipe, configs = demo_model.pretrain_demo_base(recipe)
    assert list(pipe.vae.config.block_out_channels) == [16, 32, 32] == configs["vae"]["block_out_channels"]
    easy = load_pipeline("demo")
    for a, b in zip(pipe.text_encoder.state_dict().values(), easy.text_encoder.state_dict().values()):
        torch.testing.assert_close(a, b)  # frozen: exactly the easy base's
    artifact = tmp_path / "hard.safetensors"
    demo_model.save_artifact(pipe, recipe, artifact, configs)
    again = load_pipeline(base_models.demo_base_path(artifact, cache=tmp_path / "cache"))
    assert list(again.vae.config.block_out_channels) == [16, 32, 32]
    recorded = json.loads(base_models.artifact_metadata(artifact)["recipe"])
    assert recorded["vae_channels"] == [16, 32, 32] and recorded["vae_colour_weight"] == 4.0
    assert recorded["vae_lesion_weight"] == 8.0 and recorded["vae_lesion_smooth"] is True
    # the command that rebuilds it names every flag the recipe differs in (not --start-from: recorded by sha256)
    assert base_models.artifact_metadata(artifact)["rebuild_command"] == (
        "python jobs/build_demo.py --rebuild --difficulty hard --pretrain-per-class 2 --vae-steps 2 "
        "--vae-channels 16,32,32 --vae-colour-weight 4 --vae-lesion-weight 8 --vae-lesion-smooth --unet-steps 2")


def test_the_lesion_colour_term_weighs_the_lesions_cells_only():
    """`lesion_colour_loss`: 0 where no mask has a lesion; with masks covering the whole image, the plain
    mean L1 of the pooled round trip; with the lesion in one quadrant, that quadrant's error alone."""
    import torch.nn.functional as F

    vae = load_pipeline("demo").vae
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    quadrant = torch.zeros(4, 64, 64, dtype=torch.bool)
    quadrant[:, :32, :32] = True

    def loss(lesions):
        return demo_model.lesion_colour_loss(vae, images, lesions, 4, torch.Generator().manual_seed(1))

    def pooled_error():  # the same draw as `loss`: batch indices, then the posterior sample
        g = torch.Generator().manual_seed(1)
        batch = images[torch.randint(4, (4,), generator=g)]
        recon = vae.decode(vae.encode(batch).latent_dist.sample(generator=g)).sample
        return (F.avg_pool2d(recon, 4) - F.avg_pool2d(batch, 4)).abs().mean(1)

    with torch.no_grad():
        assert loss(torch.zeros(4, 64, 64, dtype=torch.bool)).item() == 0.0
        error = pooled_error()
        torch.testing.assert_close(loss(torch.ones(4, 64, 64, dtype=torch.bool)), error.mean())
        torch.testing.assert_close(loss(quadrant), error[:, :8, :8].mean())
        assert not torch.isclose(error[:, :8, :8].mean(), error.mean())


def test_the_smooth_low_band_has_no_cell_grid():
    """`low_band(smooth=True)`: a normalised Gaussian blur at full resolution, so a constant image stays
    constant and a one-pixel shift of the input shifts the output by one pixel (the 4 × 4 pooling cannot:
    its cells are fixed), which leaves a decoder no cell borders to fit colour offsets to."""
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(demo_model.low_band(torch.full_like(x, 0.3), 4, smooth=True), torch.full_like(x, 0.3))
    shifted = demo_model.low_band(torch.roll(x, 1, dims=-1), 4, smooth=True)
    torch.testing.assert_close(shifted[..., 8:-8], demo_model.low_band(x, 4, smooth=True)[..., 7:-9])
    assert demo_model.low_band(x, 4).shape == (2, 3, 8, 12)  # the default: the pooled cells
    # the lesion term on it still weighs nothing where no lesion is
    vae = load_pipeline("demo").vae
    with torch.no_grad():
        none = torch.zeros(2, 32, 48, dtype=torch.bool)
        assert demo_model.lesion_colour_loss(vae, x * 2 - 1, none, 2, torch.Generator().manual_seed(0),
                                             smooth=True).item() == 0.0


def _run_job(*args, env_extra=None):
    env = dict(os.environ, SKINDUAL_LOG_LEVEL="WARNING", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "build_demo.py"), *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)


def test_build_demo_job_end_to_end(tmp_path):
    out = tmp_path / "world"
    result = _run_job("--output", str(out), "--data-scale", "0.02", "--samples-per-class", "2",
                      "--sample-steps", "4", env_extra={"SKINDUAL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "demo_world.json").read_text())
    assert report["class_counts"]["nv"] == 134 and report["class_counts"]["df"] == 10
    assert set(report["base_class_fidelity"]) == {c.code for c in CLASSES}
    assert report["vae_psnr_db"] > 20 and 0 <= report["base_class_fidelity_mean"] <= 1
    # the classifier's recall after a VAE round trip: how much of the classes the VAE keeps
    assert set(report["vae_round_trip_class_recall"]) <= {c.code for c in CLASSES}
    assert 0 < report["vae_round_trip_class_recall_mean"] <= 1 and 0 <= report["vae_round_trip_accuracy"] <= 1
    # the base's samples: one row per prompted class, as many as were sampled
    confusion = report["base_confusion_rows_prompted_cols_predicted"]
    assert [sum(row) for row in confusion] == [report["fidelity_samples_per_class"]] * len(CLASSES)
    assert all(abs(confusion[c.index][c.index] / sum(confusion[c.index]) - report["base_class_fidelity"][c.code]) < 1e-3
               for c in CLASSES)
    assert (out / "data" / demo_data.METADATA_CSV).exists()
    manifest = json.loads((out / "real" / "manifest.json").read_text())  # prepared through the prepare job's code
    assert manifest["kind"] == "real" and manifest["totals"]["per_class"]["nv"]["ok"] == 134
    assert (out / "real-test" / "manifest.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--data-scale", "2"], "--data-scale 2.0"),
    (["--artifact", "/nonexistent/base.safetensors"], "/nonexistent/base.safetensors"),
    (["--rebuild", "--vae-channels", "64,x"], "--vae-channels 64,x"),
    (["--rebuild", "--vae-channels", "64,60"], "multiple of 16"),
    (["--rebuild", "--vae-colour-weight", "-1"], "--vae-colour-weight -1"),
    (["--rebuild", "--vae-lesion-weight", "-0.5"], "--vae-lesion-weight -0.5"),
])
def test_build_demo_job_bad_input_is_one_clear_line(tmp_path, args, needle):
    result = _run_job("--output", str(tmp_path / "w"), "--no-measure", *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_the_hard_world_keeps_the_lesion_and_adds_what_makes_segmentation_hard():
    easy, easy_mask = demo_data.render_lesion("nv", 5, view=1)
    hard, hard_mask = demo_data.render_lesion("nv", 5, view=1, difficulty="hard")
    again = demo_data.render_lesion("nv", 5, view=1, difficulty="hard")
    assert np.array_equal(hard, again[0]) and np.array_equal(hard_mask, again[1])  # deterministic
    assert np.array_equal(easy, demo_data.render_lesion("nv", 5, view=1)[0])  # the easy world is unchanged
    # the mask is the lesion's shape (moved off centre for some lesions), the image much further from it:
    # a training-free segmentation agrees far less with the hard masks
    touching, agreement = {}, {}
    for difficulty in ("easy", "hard"):
        pairs = [demo_data.render_lesion("nv", seed, (64, 64), difficulty=difficulty) for seed in range(40)]
        masks = np.stack([m for _, m in pairs])
        touching[difficulty] = np.mean([m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks])
        agreement[difficulty] = quality.consistency(np.stack([i for i, _ in pairs]), masks).mean()
    assert touching["hard"] >= touching["easy"] + 0.15  # lesions cross the frame
    assert agreement["easy"] > 0.9 and agreement["hard"] < 0.75
    with pytest.raises(ValueError, match="difficulty"):
        demo_data.render_lesion("nv", 1, difficulty="impossible")


def test_a_demo_world_of_another_difficulty_is_refused(tmp_path, skindual_cache):
    from skindual.demo_world import prepare_demo_world
    from skindual.errors import UserError

    (tmp_path / "demo_world.json").write_text(json.dumps({"difficulty": "hard"}))
    with pytest.raises(UserError, match="another difficulty than 'easy'"):
        prepare_demo_world(tmp_path, measure=False)


def test_the_hard_worlds_base_is_shipped_and_loads_by_its_name(tmp_path, monkeypatch):
    monkeypatch.setenv("SKINDUAL_CACHE", str(tmp_path))
    assert base_models.HARD_ARTIFACT.is_file() and base_models.DEMO_BASES["demo-hard"] == base_models.HARD_ARTIFACT
    pipe = load_pipeline("demo-hard")
    assert base_models.demo_alias(base_models.resolve_base_model("demo-hard")) == "demo-hard"
    assert base_models.demo_base_id("demo-hard").startswith("demo-hard@")
    out = pipe(["a dermoscopy image of melanoma"], num_inference_steps=2, output_type="np",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 64, 64, 3) and np.isfinite(out).all()


def test_the_automatic_qc_threshold_is_one_every_class_can_meet():
    from skindual.demo import DEMO_CONSISTENCY_SHARE, pilot_threshold

    rng = np.random.default_rng(0)
    scores = {"nv": list(rng.uniform(0.85, 0.99, 12)), "df": list(rng.uniform(0.5, 0.9, 12))}
    threshold, how = pilot_threshold(scores, val_dice=0.97)
    assert how["weakest_class"] == "df" and threshold == round(np.quantile(scores["df"], 0.3), 3)
    assert np.mean(np.asarray(scores["df"]) >= threshold) >= 0.6  # the weakest class's draws mostly pass
    # a generator better than the cap: the segmenter's own agreement on real pairs bounds it
    threshold, how = pilot_threshold({"nv": [0.99] * 12, "df": [0.98] * 12}, val_dice=0.9)
    assert threshold == round(DEMO_CONSISTENCY_SHARE * 0.9, 3) and how["from_val_dice"] == threshold


def test_the_hard_base_records_how_to_rebuild_it_without_a_local_path():
    metadata = base_models.artifact_metadata(base_models.HARD_ARTIFACT)
    recipe = json.loads(metadata["recipe"])
    # the command names the recipe's flags: the shipped hard base weighs the lesion's colour in its VAE loss
    assert recipe["difficulty"] == "hard" and recipe["vae_lesion_weight"] > 0
    command = metadata["rebuild_command"]
    assert command.startswith(base_models.REBUILD_COMMAND) and "--difficulty hard" in command
    assert f"--vae-lesion-weight {recipe['vae_lesion_weight']:g}" in command
    assert f"--vae-steps {recipe['vae_steps']}" in command
    # and a missing artifact's error names that same command, for a user to rebuild it
    missing = dict(base_models.DEMO_BASES, **{"demo-hard": Path("/nonexistent/demo_base_hard.safetensors")})
    with mock.patch.object(base_models, "DEMO_BASES", missing), pytest.raises(UserError) as raised:
        base_models.resolve_base_model("demo-hard")
    assert f"{command} --artifact /nonexistent/demo_base_hard.safetensors" in str(raised.value)
    # the artifact it continued from, by name and content: the easy base as shipped
    assert recipe["start_from"] == {"file": base_models.ARTIFACT.name, "sha256": file_sha256(base_models.ARTIFACT)}
