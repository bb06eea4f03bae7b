"""The CUDA paths: fp16 training with its gradient scaler, and generation on a GPU in fp16 and bf16.

They need a CUDA device and run wherever there is one (on a CPU-only machine they are skipped: the
CPU paths, bf16 included, are tested in test_realsize.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import real_batch

from skindual import model
from skindual.finetune import FinetuneConfig, JointTrainer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_fp16_training_step_with_the_gradient_scaler(sd2_bases, demo_real):
    cfg = FinetuneConfig(base_model=str(sd2_bases["base"]), training_data=str(demo_real), resolution=256,
                         batch_size=2, lora_rank=4, mixed_precision="fp16", use_gpu=True, w_prior=1.0)
    trainer = JointTrainer(cfg, torch.device("cuda"))
    assert trainer.scaler.is_enabled() and trainer.vae.dtype == torch.float16
    batch = real_batch(demo_real, 256)
    for _ in range(3):
        metrics = trainer.train_step(batch)
    assert metrics["step"] == 3 and np.isfinite(metrics["total"]) and trainer.scaler.get_scale() > 0
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trainer.params)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_generation_on_the_gpu(sd2_bases, dtype):
    pipe = model.DualPipeline.from_pretrained(sd2_bases["base"], device="cuda", dtype=dtype, resolution=256)
    sample = pipe(["a dermoscopy image of melanoma"] * 2, [1, 2], steps=3)
    assert sample.images.shape == (2, 256, 256, 3) and sample.masks.shape == (2, 256, 256)
    assert np.isfinite(sample.latents).all()
    again = pipe(["a dermoscopy image of melanoma"], [2], steps=3)
    torch.testing.assert_close(again.latents[0], sample.latents[1], atol=2e-2, rtol=2e-2)
