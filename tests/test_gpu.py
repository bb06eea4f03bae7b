"""What only a CUDA device can show: fp16 training through its gradient scaler, bf16, NaNs from the fp16 VAE,
byte-reproducible shards on the GPU, LoRA load and fuse, the QC segmenter and the feature actors on CUDA.

On a machine without a usable CUDA device they are skipped, unless ``SKINDUAL_REQUIRE_GPU=1`` (what
bench/gpu_check.sh sets), which makes them fail instead: a GPU check can never pass by skipping.  The
CPU paths, bf16 included, are tested in test_realsize.py.  The model is SD-2's architecture at 1/8 width
(conftest `sd2_bases`), 256²."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fixture_data import real_batch

from skindual import dual_pipeline, model
from skindual.finetune_config import FinetuneConfig
from skindual.joint_trainer import JointTrainer

SIZE = 256
PROMPTS = ["a dermoscopy image of melanoma", "a dermoscopy image of melanocytic nevus"]


def cuda_problem() -> str | None:
    """Why CUDA cannot be used here, or None."""
    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False"
    try:
        torch.ones(1, device="cuda").add_(1).item()
    except RuntimeError as exc:
        return f"a CUDA kernel failed ({exc})"
    return None


@pytest.fixture(scope="session")  # session, as the data fixtures are: so it is set up (and skips or fails) first
def cuda() -> torch.device:
    problem = cuda_problem()
    if problem:
        if os.environ.get("SKINDUAL_REQUIRE_GPU") == "1":
            pytest.fail(f"SKINDUAL_REQUIRE_GPU=1 but CUDA is unusable: {problem}")
        pytest.skip(f"needs a CUDA device ({problem}); SKINDUAL_REQUIRE_GPU=1 makes this a failure")
    return torch.device("cuda")


def trainer_for(sd2_bases, demo_real, cuda, **settings) -> tuple[JointTrainer, dict]:
    cfg = FinetuneConfig(base_model=str(sd2_bases["base"]), training_data=str(demo_real), resolution=SIZE,
                         batch_size=2, lora_rank=4, use_gpu=True, geo_crop=8, **settings)
    return JointTrainer(cfg, cuda), real_batch(demo_real, SIZE)


def test_fp16_training_through_the_geometry_term_counts_skipped_steps(cuda, sd2_bases, demo_real):
    trainer, batch = trainer_for(sd2_bases, demo_real, cuda, mixed_precision="fp16", w_geo=0.1, w_prior=1.0,
                                 lr=1e-3, warmup_steps=1, ema_decay=0)
    assert trainer.scaler.is_enabled() and trainer.vae.dtype == torch.float16
    before = {k: v.clone() for k, v in trainer.state().items()}
    scales, skipped = [], 0
    for _ in range(50):
        scale = trainer.scaler.get_scale()
        metrics = trainer.train_step(batch)
        skipped += trainer.scaler.get_scale() < scale
        scales.append(trainer.scaler.get_scale())
        assert np.isfinite(metrics["geo"]) or trainer.scaler.get_scale() < scale
    assert metrics["step"] == 50 and metrics["skipped_steps"] == trainer.skipped_steps == skipped
    assert skipped < 50 and min(scales) > 0  # most steps were taken
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainer.params)
    assert any(not torch.equal(before[k], v) for k, v in trainer.state().items())
    print(f"fp16: {skipped} of 50 steps skipped by the gradient scaler, final scale {scales[-1]:g}")


def test_bf16_training_steps_are_finite(cuda, sd2_bases, demo_real):
    trainer, batch = trainer_for(sd2_bases, demo_real, cuda, mixed_precision="bf16", w_geo=0.1)
    assert not trainer.scaler.is_enabled() and trainer.vae.dtype == torch.bfloat16
    for _ in range(10):
        metrics = trainer.train_step(batch)
        assert all(np.isfinite(metrics[k]) for k in ("total", "img", "mask", "geo"))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_generation_decodes_without_nans(cuda, sd2_bases, dtype):
    pipe = dual_pipeline.DualPipeline.from_pretrained(sd2_bases["base"], device="cuda", dtype=dtype, resolution=SIZE)
    sample = pipe(PROMPTS * 2, [1, 2, 3, 4], steps=10)
    images, mask_logits = pipe.decode(sample.latents.to("cuda", dtype))
    nans = {"latents": int(torch.isnan(sample.latents).sum()), "images": int(torch.isnan(images).sum()),
            "mask_logits": int(torch.isnan(mask_logits).sum())}
    print(f"{dtype}: NaN counts {nans}")
    assert nans == {"latents": 0, "images": 0, "mask_logits": 0}
    assert sample.images.shape == (4, SIZE, SIZE, 3) and sample.masks.shape == (4, SIZE, SIZE)


def test_one_shard_generated_twice_on_the_gpu_is_the_same_bytes(cuda, sd2_bases, tmp_path):
    import pyarrow as pa

    from skindual.generate_actors import ShardGenerator, shard_items, write_shard_rows
    from skindual.generate_config import GenerateConfig
    from skindual.generate_model import ModelSpec
    from skindual.prompts import prompt_table
    from skindual.storage import open_storage

    cfg = GenerateConfig(per_class="2", classes="mel,nv", samples_per_shard=4, steps=8, batch_size=2,
                         num_gpus_per_actor=1, dtype="fp16", max_mask_area=1.0, min_mask_area=0.0, min_main_share=0.0)
    spec = ModelSpec(str(sd2_bases["base"]), "sd2-test", None, None, "channels", resolution=SIZE)
    item = shard_items(prompt_table(cfg.counts(), cfg.seed, 4), [0])
    digests = []
    for attempt in range(2):
        generator = ShardGenerator(cfg, spec)  # a fresh actor each time, as after a restart
        out = generator(pa.Table.from_pylist(item))
        storage = open_storage(tmp_path / f"run{attempt}")
        run_info = {"base_model": spec.base_id, "adapter_sha256": None, "layout": "channels", "scheduler": "ddim",
                    "steps": cfg.steps, "guidance": cfg.guidance, "fingerprint": "gpu-test", "image_format": "jpg"}
        write_shard_rows(out, storage, run_info)
        digests.append(storage.read_bytes("00000.tar"))
        del generator
        torch.cuda.empty_cache()
    assert len(digests[0]) > 0 and digests[0] == digests[1]


def test_lora_loads_and_fuses_on_the_gpu(cuda, sd2_bases, tmp_path):
    pipe = model.load_pipeline(sd2_bases["base"])
    model.prepare_unet(pipe.unet, "channels", lora_rank=4)
    with torch.no_grad():
        for name, param in pipe.unet.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)  # a trained-looking adapter: LoRA B is zero at initialisation
    model.save_adapter(tmp_path / "adapter", pipe.unet, "channels", str(sd2_bases["base"]), {}, resolution=SIZE)
    fused = dual_pipeline.DualPipeline.from_pretrained(sd2_bases["base"], tmp_path / "adapter", device="cuda",
                                               dtype=torch.float16, fuse=True)
    unfused = dual_pipeline.DualPipeline.from_pretrained(sd2_bases["base"], tmp_path / "adapter", device="cuda",
                                                 dtype=torch.float16, fuse=False)
    bare = dual_pipeline.DualPipeline.from_pretrained(sd2_bases["base"], device="cuda", dtype=torch.float16, resolution=SIZE)
    a, b, c = (p(PROMPTS, [5, 6], steps=4).latents for p in (fused, unfused, bare))
    torch.testing.assert_close(a, b, atol=5e-2, rtol=5e-2)
    assert (a - c).abs().mean() > 10 * (a - b).abs().mean()  # the adapter changed the samples


def test_the_qc_segmenter_and_the_feature_actor_on_cuda(cuda, eval_world, tmp_path):
    from skindual import downstream
    from skindual.evaluate_features import ExtractorSpec, FeatureActor
    from skindual.pairs import load_pairs, read_index, selection_of
    from skindual.qc_model import QCSegmenter

    torch.manual_seed(0)
    net = downstream.SmallUNet(16, 3)
    pairs = load_pairs(eval_world["synthetic"], selection_of(read_index(eval_world["synthetic"])), 32)
    scores = {device: QCSegmenter(net, 32, "x", device).score(pairs["image"], pairs["mask"])
              for device in ("cpu", "cuda")}
    assert np.abs(scores["cpu"] - scores["cuda"]).max() < 0.05
    spec = ExtractorSpec("random-cnn", 32, seed=0)
    keys = {k: 1 for k in read_index(eval_world["synthetic"]).column("key").to_pylist()[:8]}
    batch = {"set": np.asarray(["synthetic"]), "url": np.asarray([eval_world["synthetic"]]), "shard": np.asarray([0]),
             "keys": np.asarray([json.dumps(keys)])}
    rows = {gpus: FeatureActor(spec, 32, str(tmp_path / f"eval{gpus}"), gpus, 1.0, None, None)(batch)
            for gpus in (0.0, 1.0)}
    np.testing.assert_allclose(rows[0.0]["features"], rows[1.0]["features"], atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_require_gpu_turns_a_missing_gpu_into_failures():
    """On a machine without CUDA, SKINDUAL_REQUIRE_GPU=1 fails these tests instead of skipping them."""
    if cuda_problem() is None:
        pytest.skip("CUDA is usable here: the GPU tests run")
    test = "tests/test_gpu.py::test_bf16_training_steps_are_finite"
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", test],
                         cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, SKINDUAL_REQUIRE_GPU="1"))
    assert run.returncode == 1 and "SKINDUAL_REQUIRE_GPU=1 but CUDA is unusable" in run.stdout, run.stdout[-2000:]
