"""The ControlNet's training (``--train controlnet``), in plain PyTorch and without Ray: `ControlNetTrainer`, a
`joint_trainer.Trainer` (its inputs, optimiser step, EMA and checkpoint: `save_checkpoint`/`load_checkpoint`
resume it exactly as they do the joint model) whose trained module is a `ControlNetModel` initialised from the
base UNet (`controlnet.controlnet_from_unet`), the base UNet stock and frozen beside it.  The loss is the
image-latent denoising term only, for the pair's mask given to the ControlNet (`controlnet.mask_condition`).
"""

from __future__ import annotations

import torch

from skindual import losses, model
from skindual.controlnet import controlnet_from_unet, mask_condition
from skindual.finetune_config import FinetuneConfig
from skindual.joint_trainer import Trainer


class ControlNetTrainer(Trainer):
    """A ControlNet beside the frozen base UNet: one training step draws the same flips, prompt dropout, noise and
    timesteps as the joint model's (`Trainer.batch_inputs`, `Trainer.noise_and_timesteps`), encodes only the
    image, and learns the image-latent target of the base's prediction type (min-SNR weighted with
    ``--snr-gamma``), the residuals of the ControlNet (fp32 weights) added into the base UNet (held in the compute
    dtype) under autocast."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        if cfg.train != "controlnet":
            raise ValueError(f"ControlNetTrainer trains --train controlnet, not {cfg.train!r}")
        super().__init__(cfg, device, rank, world_size)
        # seeded right before the conditioning embedding's random initialisation (the rest is copied from the UNet,
        # in fp32, before the UNet is cast): the same start on every rank, whatever this process drew before
        torch.manual_seed(cfg.seed)
        self.controlnet = model.place(controlnet_from_unet(self.pipe.unet, self.pipe.vae_scale_factor), device,
                                      torch.float32).train()
        self.unet = model.place(self.pipe.unet, device, self.frozen_dtype).eval().requires_grad_(False)
        if cfg.gradient_checkpointing:
            self.controlnet.enable_gradient_checkpointing()
            self.unet.enable_gradient_checkpointing()
        self.trained = self.controlnet
        self.train_weights([p for p in self.controlnet.parameters() if p.requires_grad])

    def train_step(self, batch: dict) -> dict | None:
        """One micro-batch (uint8 images, 0/1 masks, prompts); the metrics (``total``, ``img``) when an optimiser
        step was taken."""
        cfg = self.cfg
        images, masks, cond = self.batch_inputs(batch)
        with torch.no_grad():
            dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
            x0 = (dist.mean * self.vae.config.scaling_factor).float()
        noise, t = self.noise_and_timesteps(x0)
        noisy = losses.noisy(x0, noise, losses.alpha_bar(self.alphas, t))
        control = mask_condition(masks).to(self.device)
        with self.micro_batch():
            with self.autocast():
                down, mid = self.model(noisy, t, encoder_hidden_states=cond, controlnet_cond=control, return_dict=False)
                pred = self.unet(noisy, t, encoder_hidden_states=cond, down_block_additional_residuals=down,
                                 mid_block_additional_residual=mid).sample
            img = losses.image_loss(pred.float(), x0, noise, t, self.alphas, self.prediction_type,
                                    cfg.snr_gamma or None)
            terms = {"total": cfg.w_img * img, "img": img}
            self.scaler.scale(terms["total"] / cfg.grad_accum).backward()
        return self.optimizer_step(terms)
