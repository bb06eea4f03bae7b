"""SD-2's own architecture (conftest `sd2_bases`: 1/8 width, random weights, built offline) through the
real jobs on the shared local Ray cluster, at 256²: both layouts, both prediction types, bf16 training
and generation on the CPU, the adapter's trained resolution, and the errors of a base without its
adapter.  SD-2's exact widths: `test_exact_sd2_size_trains_and_samples`, opt-in (SKINDUAL_TEST_SD2_FULL=1).
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from safetensors import safe_open

from fixture_data import real_batch
from job_runs import error_line, ok, run_job, run_jobs

from skindual import dual_pipeline, model, report
from skindual.errors import UserError
from skindual.finetune_config import FinetuneConfig
from skindual.finetune_worker import write_outputs
from skindual.joint_trainer import JointTrainer

ROOT = Path(__file__).resolve().parents[1]
TWO_STEPS = ["--steps", "2", "--checkpoint-every", "2", "--batch-size", "2", "--resolution", "256",
             "--validation-per-class", "1", "--validation-steps", "2", "--lora-rank", "4", "--cpus-per-worker", "0.5"]
PROMPTS = ["a dermoscopy image of melanoma", "a dermoscopy image of dermatofibroma"]


def projections(lora_file: Path) -> set[str]:
    """The modules a diffusers LoRA file adapts (its keys: ``{module}.lora.down.weight`` / ``.lora.up.weight``)."""
    with safe_open(str(lora_file), "pt") as f:
        return {k.split(".lora.")[0] for k in f.keys() if ".lora." in k}


@pytest.fixture(scope="module")
def trained(sd2_bases, demo_real, ray_cluster, tmp_path_factory):
    """Two 2-step fine-tuning runs through jobs/finetune.py at 256²: channels layout on SD-2-base
    (epsilon, PNDM) in bf16 with the prior and geometry terms, and side-by-side on SD-2 (v, DDIM) in fp32."""
    out = tmp_path_factory.mktemp("sd2-runs")
    runs = {"channels": ["--base-model", str(sd2_bases["base"]), "--layout", "channels", "--mixed-precision", "bf16",
                         "--w-prior", "1", "--geo-crop", "16"],
            "side-by-side": ["--base-model", str(sd2_bases["v"]), "--layout", "side-by-side"]}
    # side by side: each leaves the 2-core machine's CPUs idle for much of its time (its actors starting)
    for result in run_jobs([("finetune", ["--training-data", str(demo_real), "--output", str(out), "--name", name,
                                          *args, *TWO_STEPS]) for name, args in runs.items()], ray_cluster):
        ok(result)
    return out


def test_both_layouts_and_prediction_types_train_on_sd2s_architecture(trained, sd2_bases):
    for name, base, prediction in (("channels", "base", "epsilon"), ("side-by-side", "v", "v_prediction")):
        info = model.load_adapter(trained / name / "adapter")
        assert (info.layout, info.resolution, info.base_model) == (name, 256, str(sd2_bases[base]))
        assert info.training_config["steps"] == 2
        assert model.load_pipeline(sd2_bases[base]).scheduler.config.prediction_type == prediction
        # LoRA on every attention projection of SD-2's UNet: 16 transformer blocks × 2 attentions × q, k, v, out
        assert len(projections(info.folder / model.LORA_FILE)) == 128
        assert (trained / name / "validation_grid.png").is_file() and (trained / name / "loss_curve.png").is_file()
        # loaded, it samples at its trained resolution, not the base's 512 (the round trip: test_model.py)
        assert dual_pipeline.DualPipeline.from_pretrained(sd2_bases[base], info.folder, fuse=False).resolution == 256
    with Image.open(trained / "channels" / "validation_grid.png") as grid:  # 7 classes × (image | overlay) at 256²
        assert grid.size == (2 * (2 * 256 + 2), 2 * 7 * (256 + 2))
    history = json.loads(sorted((trained / "channels").glob("checkpoint_*/progress.json"))[-1].read_text())["history"]
    assert all(h["prior"] >= 0 and h["geo"] > 0 for h in history)


@pytest.mark.parametrize("variant, train", [("base", "lora"), ("v", "lora"), ("base", "full")])
def test_step_zero_is_the_base_model_exactly(sd2_bases, variant, train):
    """The widened UNet, LoRA or fully trained, starts as the base: its image outputs are the base's, its
    mask outputs copies of them, whatever the mask latents (their input weights are zero)."""
    pipe = model.load_pipeline(sd2_bases[variant])
    reference = copy.deepcopy(pipe.unet)
    model.prepare_unet(pipe.unet, "channels", lora_rank=4, train=train)
    assert pipe.unet.config.in_channels == pipe.unet.config.out_channels == 8
    g = torch.Generator().manual_seed(0)
    x, emb = torch.randn(2, 4, 32, 32, generator=g), torch.randn(2, 77, 1024, generator=g)
    t = torch.tensor([999, 3])
    with torch.no_grad():
        expected = reference(x, t, emb).sample
        out = pipe.unet(torch.cat([x, 3 * torch.randn_like(x)], 1), t, emb).sample
    assert torch.equal(out[:, :4], expected) and torch.equal(out[:, 4:], expected)


def test_the_side_by_side_lora_loads_into_a_stock_pipeline(trained, sd2_bases):
    from diffusers import StableDiffusionPipeline

    stock = StableDiffusionPipeline.from_pretrained(str(sd2_bases["v"]), safety_checker=None)
    stock.set_progress_bar_config(disable=True)
    stock.load_lora_weights(str(trained / "side-by-side" / "adapter"))
    image = stock(PROMPTS[:1], num_inference_steps=2, height=256, width=512, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 256, 512, 3) and np.isfinite(image).all()


def test_generation_samples_at_the_adapters_resolution_in_bf16(trained, sd2_bases, ray_cluster, tmp_path):
    out = tmp_path / "synthetic"
    ok(run_job("generate", ["--base-model", str(sd2_bases["base"]), "--adapter", str(trained / "channels" / "adapter"),
                           "--per-class", "1", "--classes", "df,nv", "--steps", "2", "--batch-size", "2",
                           "--dtype", "bf16", "--max-mask-area", "1.0", "--min-mask-area", "0",
                           "--min-main-share", "0", "--output", str(out)], ray_cluster))
    samples = list(wds.WebDataset(str(out / "00000.tar"), shardshuffle=False).decode("rgb8"))
    assert len(samples) == 2 and {s["jpg"].shape for s in samples} == {(256, 256, 3)}
    assert {s["seg.png"].shape[:2] for s in samples} == {(256, 256)}
    assert {s["json"]["base_model"] for s in samples} == {str(sd2_bases["base"])}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resolved"]["resolution"] == 256 and manifest["resolved"]["dtype"] == "bf16"


def test_a_base_without_its_adapter_is_one_clear_line(sd2_bases, ray_cluster, tmp_path):
    base = str(sd2_bases["base"])
    demo_adapter = str(ROOT / "skindual" / "assets" / "demo_adapter")
    without, misfit = run_jobs([("generate", ["--base-model", base, "--output", str(tmp_path / "a")]),
                                ("generate", ["--base-model", base, "--adapter", demo_adapter,
                                              "--output", str(tmp_path / "b")])], ray_cluster)
    assert f"--base-model {base} without --adapter" in error_line(without)
    assert f"--adapter {demo_adapter} was trained on demo and does not fit --base-model {base}" in error_line(misfit)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_resolution_and_cpu_fp16_are_refused(sd2_bases, demo_real, tmp_path):
    line = error_line(run_job("finetune", ["--training-data", str(demo_real), "--base-model",
                                              str(sd2_bases["base"]), "--resolution", "200", "--output",
                                              str(tmp_path)]))
    assert "--resolution 200" in line and "multiple of 64" in line
    with pytest.raises(UserError, match="--mixed-precision fp16 needs GPUs"):
        FinetuneConfig(mixed_precision="fp16")


def small_trainer(base: Path, demo_real: Path, **settings) -> tuple[JointTrainer, dict]:
    cfg = FinetuneConfig(base_model=str(base), training_data=str(demo_real), resolution=256, batch_size=2,
                         lora_rank=4, **settings)
    return JointTrainer(cfg, torch.device("cpu")), real_batch(demo_real, 256)


@pytest.mark.parametrize("variant,layout", [("v", "channels"), ("base", "side-by-side")])
def test_the_other_layout_and_prediction_pairs_train_in_bf16(sd2_bases, demo_real, variant, layout):
    trainer, batch = small_trainer(sd2_bases[variant], demo_real, layout=layout, mixed_precision="bf16",
                                   w_prior=1.0, geo_crop=16)
    assert trainer.vae.dtype == trainer.text_encoder.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in trainer.params)  # the trained weights stay fp32
    for _ in range(2):
        metrics = trainer.train_step(batch)
    assert metrics["step"] == 2 and all(np.isfinite(metrics[k]) for k in ("total", "img", "mask", "geo", "prior"))


@pytest.mark.slow
def test_a_failing_grid_leaves_the_adapter_and_a_clean_rerun(sd2_bases, demo_real, tmp_path, monkeypatch, caplog):
    trainer, batch = small_trainer(sd2_bases["base"], demo_real, validation_per_class=1, validation_steps=1,
                                   output=str(tmp_path), name="run")
    trainer.train_step(batch)

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")

    with monkeypatch.context() as m, caplog.at_level(logging.WARNING, logger="skindual.finetune_worker"):
        m.setattr(report, "validation_grid", out_of_memory)
        write_outputs(trainer.cfg, trainer)
    assert "validation_grid.png not written (RuntimeError: CUDA out of memory" in caplog.text
    adapter = model.load_adapter(tmp_path / "run" / "adapter")  # complete, every sha256 checked
    assert not (tmp_path / "run" / "validation_grid.png").exists() and (tmp_path / "run" / "loss_curve.png").exists()
    write_outputs(trainer.cfg, trainer)  # the rerun: same adapter, and now the grid
    assert model.load_adapter(tmp_path / "run" / "adapter").sha256 == adapter.sha256
    with Image.open(tmp_path / "run" / "validation_grid.png") as grid:
        assert grid.size == (2 * (2 * 256 + 2), 2 * 7 * (256 + 2))


@pytest.mark.skipif(os.environ.get("SKINDUAL_TEST_SD2_FULL") != "1",
                    reason="opt-in: SD-2's exact size (about 11 GB, a minute or two); set SKINDUAL_TEST_SD2_FULL=1")
def test_exact_sd2_size_trains_and_samples(demo_real, tmp_path):
    from skindual.sd2 import build_sd2_pipeline

    pipe = build_sd2_pipeline("base", width=1)
    assert sum(p.numel() for p in pipe.unet.parameters()) == 865_910_724  # SD-2-base's UNet
    pipe.save_pretrained(tmp_path / "sd2", safe_serialization=True)
    del pipe
    trainer, batch = small_trainer(tmp_path / "sd2", demo_real, mixed_precision="bf16", w_prior=1.0,
                                   gradient_checkpointing=True)
    metrics = trainer.train_step(batch)
    assert np.isfinite(metrics["total"]) and len([n for n, _ in trainer.unet.named_modules()
                                                  if n.endswith(".lora_A")]) == 128
    dual = dual_pipeline.DualPipeline(trainer.pipe, "channels", resolution=256)
    with trainer.autocast():
        sample = dual(PROMPTS, [1, 2], steps=2)
    assert sample.images.shape == (2, 256, 256, 3) and sample.masks.shape == (2, 256, 256)
