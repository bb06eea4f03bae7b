"""A lab variant of the ControlNet fine-tune: LoRA on the base UNet trained with the ControlNet (``base_lora=R`` in
`pair_diagnosis.py`), so that the images can take the real set's look (sharp edges, hair, rulers), which the stock
base beside a ControlNet never draws.  Not the product: the fine-tune writes the ControlNet's adapter folder as
``--train controlnet`` does, and beside it the base with the LoRA fused in (``{name}/base``, a diffusers folder)
that generation must be given as its base model.

The LoRA (rank `base_rank`, alpha the rank, `model.LORA_TARGETS["attention+resnet"]`) is added to the frozen base
UNet with ``add_adapter`` after `ControlNetTrainer` built it; the LoRA and the ControlNet are one module to the
optimiser, the EMA and the checkpoint.  The loss is the ControlNet's (the image latent's denoising term).  It trains
through `consistency_levers.fine_tune`, with `build` and `write` below (`hooks`).
"""

from __future__ import annotations

from dataclasses import asdict
from functools import partial
from pathlib import Path

import torch

from skindual import model
from skindual.controlnet import save_controlnet
from skindual.controlnet_trainer import ControlNetTrainer
from skindual.finetune_config import FinetuneConfig

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
        self.base_rank = base_rank
        self.trained = Both(self.controlnet, self.unet)
        self.train_weights([p for p in self.trained.parameters() if p.requires_grad])
        self.model = self.controlnet  # what train_step runs forward as the ControlNet (no DDP here)


def build(cfg: FinetuneConfig, device: torch.device, base_rank: int) -> BaseLoraControlNetTrainer:
    return BaseLoraControlNetTrainer(cfg, device, base_rank)


def write(cfg: FinetuneConfig, trainer: BaseLoraControlNetTrainer, plan) -> dict:
    """The base with the LoRA (its EMA weights) fused in under ``{output}/{name}/base``, then the ControlNet's adapter
    folder recording that base and the plan's fingerprint (written last: the run is done once it is there)."""
    run = Path(cfg.output) / cfg.name
    with trainer.ema_weights():
        unet = trainer.unet.eval()
        unet.fuse_lora()
        unet.unload_lora()
        trainer.pipe.unet = unet.float()
        trainer.pipe.save_pretrained(run / BASE_DIR, safe_serialization=True)
        save_controlnet(run / "adapter", trainer.controlnet.eval(), str(run / BASE_DIR), asdict(cfg),
                        prompt_template=plan.prompting.template, prompt_attributes=plan.prompting.attributes,
                        fingerprint=plan.fingerprint)
    return {"base_lora": trainer.base_rank}


def hooks(base_rank: int) -> dict:
    """`consistency_levers.fine_tune`'s ``build`` and ``write`` for a ControlNet with LoRA of `base_rank` on the
    base."""
    return {"build": partial(build, base_rank=base_rank), "write": write}
