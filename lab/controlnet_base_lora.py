"""A lab variant of the ControlNet fine-tune: LoRA on the base UNet trained with the ControlNet (``base_lora=R`` in
`pair_diagnosis.py`), so that the images can take the real set's look (sharp edges, hair, rulers), which the stock
base beside a ControlNet never draws.  Not the product: the fine-tune writes the ControlNet's adapter folder as
``--train controlnet`` does, and beside it the base with the LoRA fused in (``{name}/base``, a diffusers folder)
that generation must be given as its base model.

The LoRA (rank `base_rank`, alpha the rank, `model.LORA_TARGETS["attention+resnet"]`) is added to the frozen base
UNet with ``add_adapter`` after `ControlNetTrainer` built it; the LoRA and the ControlNet are one module to the
optimiser, the EMA and the checkpoint.  The loss is the ControlNet's (the image latent's denoising term).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from consistency_levers import PeakMemory

from skindual import model
from skindual.controlnet import save_controlnet
from skindual.controlnet_trainer import ControlNetTrainer
from skindual.finetune import plan_finetune
from skindual.finetune_config import FinetuneConfig
from skindual.pairs import local_batches

BASE_DIR = "base"


class Both(torch.nn.Module):
    """The ControlNet and the LoRA-adapted base UNet as one trained module (their trainable parameters)."""

    def __init__(self, controlnet, unet):
        super().__init__()
        self.controlnet, self.unet = controlnet, unet


class BaseLoraControlNetTrainer(ControlNetTrainer):
    def __init__(self, cfg: FinetuneConfig, device: torch.device, base_rank: int):
        super().__init__(cfg, device)
        from peft import LoraConfig

        torch.manual_seed(cfg.seed + 1)
        self.unet.add_adapter(LoraConfig(r=base_rank, lora_alpha=base_rank, init_lora_weights="gaussian",
                                         target_modules=model.LORA_TARGETS["attention+resnet"]))
        self.trained = Both(self.controlnet, self.unet)
        self.train_weights([p for p in self.trained.parameters() if p.requires_grad])
        self.model = self.controlnet  # what train_step runs forward as the ControlNet (no DDP here)


def train(ft: FinetuneConfig, base_rank: int, device_type: str = "cpu") -> dict:
    """The fine-tune in this process; writes ``{output}/{name}/adapter`` (the ControlNet, recording the fused base)
    and ``{output}/{name}/base`` (the base, LoRA fused), then ``train_figures.json``; returns the figures."""
    device = torch.device(device_type)
    plan = plan_finetune(ft)
    cfg = plan.config
    run = Path(cfg.output) / cfg.name
    last, seconds = {}, []
    with PeakMemory(device) as memory:
        trainer = BaseLoraControlNetTrainer(cfg, device, base_rank)
        epoch = 0
        while trainer.step < cfg.steps:
            epoch += 1
            for batch in local_batches(cfg.training_data, plan.selection, cfg.resolution, cfg.batch_size,
                                       cfg.seed + epoch):
                t = time.perf_counter()
                last = trainer.train_step(batch) or last
                seconds.append(time.perf_counter() - t)
                if trainer.step >= cfg.steps:
                    break
    with trainer.ema_weights():
        unet = trainer.unet.eval()
        unet.fuse_lora()
        unet.unload_lora()
        trainer.pipe.unet = unet.float()
        trainer.pipe.save_pretrained(run / BASE_DIR, safe_serialization=True)
        save_controlnet(run / "adapter", trainer.controlnet.eval(), str(run / BASE_DIR), asdict(cfg),
                        prompt_template=plan.prompting.template, prompt_attributes=plan.prompting.attributes)
    timed = seconds[1:] or seconds
    figures = {"steps": cfg.steps, "base_lora": base_rank, "seconds_per_step": round(float(np.mean(timed)), 4),
               "peak_memory_gb": round(memory.gb, 3),
               "last_step_losses": {k: round(float(v), 4) for k, v in last.items() if k != "time"}}
    (run / "train_figures.json").write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def fine_tune(ft: FinetuneConfig, base_rank: int, device: torch.device) -> dict:
    """`train`'s figures, or those of the run done before (its ``train_figures.json``); on the CPU in a fresh
    process, as `consistency_levers.fine_tune`."""
    done = Path(ft.output) / ft.name / "train_figures.json"
    if done.is_file():
        return json.loads(done.read_text())
    if device.type != "cpu":
        return train(ft, base_rank, device.type)
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(train, ft, base_rank, "cpu").result()
