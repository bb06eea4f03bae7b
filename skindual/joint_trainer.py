"""The joint model's training, in plain PyTorch and without Ray: `Trainer` (what every trainer shares: the frozen
text encoder and VAE, a micro-batch's inputs, the optimiser step, the EMA), `JointTrainer` (the joint model and
its loss; the Ray Train loop runs it on each worker, the bench and lab scripts in a plain loop) and the
checkpoint (`save_checkpoint`, `load_checkpoint`): weights, EMA and optimiser (rank 0's), and every worker's own
RNG streams and place in its share of the pairs, so that a resumed run continues exactly.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skindual import losses, model
from skindual.errors import UserError
from skindual.finetune_config import FinetuneConfig, resolve_precision
from skindual.qc_model import QCSegmenter
from skindual.quality import images_to_tensor

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_PROGRESS = "progress.json"
CHECKPOINT_EMA = "ema.safetensors"
CHECKPOINT_RNG = "rng-rank{rank}.safetensors"
"""Each worker's own file: its RNG streams (tensors), and in the metadata the gradient scaler and where its
data order stands -- tensors and text only, nothing is unpickled on resume."""


def device_name(device: torch.device) -> str:
    """The model of the device a worker computes on (``cpu``, or the GPU's name)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """Linear warm-up over `warmup` steps, then constant or a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Trainer:
    """What the trainers share, plain PyTorch, no Ray: the frozen text encoder and VAE held in the compute dtype,
    the noise schedule, each rank's own generator, a micro-batch's inputs, the optimiser step (gradient
    accumulation, clipping, the gradient scaler, the learning-rate schedule), the EMA of the trained weights, and
    what a checkpoint holds (`save_checkpoint`, `load_checkpoint`).  A subclass builds the module it trains,
    ``self.trained`` (what the checkpoint, the EMA and DDP hold), calls `train_weights` with its trainable
    parameters, and defines ``train_step``: one micro-batch, the metrics when an optimiser step was taken."""

    def __init__(self, cfg: FinetuneConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        self.cfg, self.device, self.rank, self.world_size = cfg, device, rank, world_size
        precision = resolve_precision(cfg.mixed_precision, device.type == "cuda")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"--mixed-precision bf16: {torch.cuda.get_device_name(device)} computes no bf16; "
                            "use --mixed-precision fp16")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        self.frozen_dtype = self.amp_dtype or torch.float32
        self.pipe = model.load_pipeline(cfg.base_model, s3_endpoint=cfg.s3_endpoint or None)
        self.vae = model.place(self.pipe.vae, device, self.frozen_dtype).eval().requires_grad_(False)
        self.text_encoder = model.place(self.pipe.text_encoder, device, self.frozen_dtype).eval().requires_grad_(False)
        self.alphas = torch.as_tensor(self.pipe.scheduler.alphas_cumprod, dtype=torch.float32, device=device)
        self.prediction_type = self.pipe.scheduler.config.prediction_type
        self.num_timesteps = self.pipe.scheduler.config.num_train_timesteps
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
        # each rank draws its own noise, timesteps, flips and prompt dropout
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + rank)
        self.step, self.micro, self.history = 0, 0, []
        self.skipped_steps = 0  # optimiser steps the gradient scaler skipped (inf/NaN gradients in fp16)
        # where the data order stands: the current epoch's shuffle seed and the micro-batches it has given
        self.epoch_seed, self.epoch_batches = cfg.seed, 0
        self.ema = None  # float32 copies of the trainable weights, on their device
        self.trained: torch.nn.Module | None = None  # the module a subclass trains

    def train_weights(self, params: list[torch.nn.Parameter]) -> None:
        """``self.trained``'s trainable `params` in fp32 whatever the compute dtype; their AdamW and EMA."""
        self.params = params
        for p in self.params:
            p.data = p.data.float()
        self.optimizer = torch.optim.AdamW(self.params, lr=self.cfg.lr, weight_decay=1e-2)
        self.model = self.trained  # what runs forward: the DDP wrapper under Ray Train
        if self.cfg.ema_decay:
            self.ema = {k: v.detach().float().clone() for k, v in self.trained.named_parameters() if v.requires_grad}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.trained.named_parameters() if v.requires_grad}

    def update_ema(self) -> None:
        """ema ← d·ema + (1−d)·weights, with d warming up as (1+n)/(10+n) (diffusers' EMAModel)."""
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, param in self.trained.named_parameters():
                if param.requires_grad:
                    self.ema[name].lerp_(param.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the trained module holds the EMA weights (for sampling and the adapter)."""
        if self.ema is None:
            yield
            return
        backup = {k: v.clone() for k, v in self.state().items()}  # on a CPU `state()` aliases the live weights
        self.trained.load_state_dict(self.ema, strict=False)
        try:
            yield
        finally:
            self.trained.load_state_dict(backup, strict=False)

    def batch_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A micro-batch (uint8 images, 0/1 masks, prompts) → images N×3×H×W in [-1, 1] and masks N×H×W, each
        pair flipped left-right with p = 1/2, and the prompts' text embeddings, each prompt dropped to '' with
        p = ``--uncond-prob`` (classifier-free guidance): drawn from this rank's generator in that order."""
        cfg, g, device = self.cfg, self.generator, self.device
        images = images_to_tensor(batch["image"], device)
        masks = torch.from_numpy(batch["mask"]).to(device, copy=True)  # flipped in place below: not the caller's
        flip = (torch.rand(len(images), generator=g) < 0.5).to(device)
        images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
        prompts = [p if torch.rand((), generator=g) >= cfg.uncond_prob else "" for p in batch["prompt"]]
        with torch.no_grad():
            tok = self.pipe.tokenizer
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            cond = self.text_encoder(ids)[0]
        return images, masks, cond

    def noise_and_timesteps(self, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's noise and timestep (uniform over the schedule), from this rank's generator."""
        noise = torch.randn(x0.shape, generator=self.generator).to(self.device)
        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=self.generator).to(self.device)
        return noise, t

    @contextlib.contextmanager
    def micro_batch(self):
        """Around a micro-batch's forward and backward: DDP all-reduces the gradients on the last micro-batch of
        an optimiser step only."""
        last = (self.micro + 1) % self.cfg.grad_accum == 0
        with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
            yield

    def optimizer_step(self, terms: dict[str, torch.Tensor]) -> dict | None:
        """After a micro-batch's backward; on the last of an optimiser step, the step (the schedule's learning
        rate, clipped gradients, the gradient scaler, the EMA) and its metrics: `terms`, the step, the time."""
        cfg = self.cfg
        self.micro += 1
        if self.micro % cfg.grad_accum:
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:  # inf/NaN gradients: step skipped
            self.skipped_steps += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.update_ema()
        metrics = ({k: float(v.detach()) for k, v in terms.items()}
                   | {"step": self.step, "time": time.time(), "skipped_steps": self.skipped_steps})
        self.history.append(metrics)
        return metrics


class JointTrainer(Trainer):
    """The joint image–mask model's trainer (the bench's baseline too).

    Memory: with ``mixed_precision`` the frozen weights (text encoder, VAE, the UNet under its LoRA)
    are held in the compute dtype and only the trained ones in fp32; the prior term's base prediction
    comes from the same UNet with its LoRA switched off and its original 4-channel convs (a copy of
    the base UNet only when the whole UNet is trained); the geometry term decodes a `geo_crop`
    window of each mask with the VAE decoder's activations recomputed in the backward pass.
    """

    def __init__(self, cfg: FinetuneConfig, device: torch.device, rank: int = 0, world_size: int = 1):
        if cfg.train not in ("lora", "full"):
            raise ValueError(f"JointTrainer trains --train lora or full, not {cfg.train!r}")
        super().__init__(cfg, device, rank, world_size)
        frozen_dtype = self.frozen_dtype
        self.unet = model.place(self.pipe.unet, device, frozen_dtype if cfg.train == "lora" else torch.float32)
        if cfg.w_geo or cfg.w_consistency:
            self.vae.enable_gradient_checkpointing()  # only the geometry and reward decodes run with gradients
        self.segmenter = None  # the consistency reward's, frozen
        if cfg.w_consistency:
            qc = QCSegmenter.load(cfg.consistency_segmenter, cfg.s3_endpoint or None, str(device))
            self.segmenter = qc.model.requires_grad_(False)
            self.segmenter_size = qc.size
        self.teacher, self.base_convs = None, None
        if cfg.w_prior and cfg.train == "full":  # nothing to switch off: keep a frozen copy of the base UNet
            self.teacher = model.place(copy.deepcopy(self.unet), device, frozen_dtype).eval().requires_grad_(False)
        elif cfg.w_prior and cfg.layout == "channels":  # the base's 4-channel convs, for the prior's forward
            self.base_convs = (copy.deepcopy(self.unet.conv_in), copy.deepcopy(self.unet.conv_out))
        # seeded right before the LoRA's random initialisation: whatever this process ran before (a Ray worker
        # is reused) and whatever loading the pipeline drew, the same seed gives the same start, on every rank
        torch.manual_seed(cfg.seed)
        params = model.prepare_unet(self.unet, cfg.layout, cfg.lora_rank, cfg.lora_alpha or None, cfg.train,
                                    cfg.lora_targets)
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.trained = self.unet
        self.train_weights(params)  # LoRA and widened convs, or the whole UNet

    @contextlib.contextmanager
    def base_unet(self):
        """Within the block the UNet computes the base model's prediction for 4-channel image latents:
        its LoRA switched off and (channels layout) its original convs in place; or the base's copy
        when the whole UNet is trained."""
        if self.teacher is not None:
            yield self.teacher
            return
        unet, widened = self.unet, (self.unet.conv_in, self.unet.conv_out)
        if self.base_convs is not None:
            unet.conv_in, unet.conv_out = self.base_convs
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()
            unet.conv_in, unet.conv_out = widened

    def decode_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled mask latents → decoded N×3×H×W (the geometry term's `decode_mask`), in the compute dtype."""
        with self.autocast():
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def segment(self, images: torch.Tensor) -> torch.Tensor:
        """The frozen reward segmenter's lesion logits of decoded N×3×H×W images in [-1, 1], at its input size."""
        size = (self.segmenter_size, self.segmenter_size)
        x = images if tuple(images.shape[-2:]) == size else F.interpolate(images, size=size, mode="bilinear",
                                                                         antialias=True, align_corners=False)
        with self.autocast():
            return self.segmenter(x)

    def train_step(self, batch: dict) -> dict | None:
        """One micro-batch (uint8 images, 0/1 masks, prompts); the metrics when an optimiser step was taken."""
        cfg, g, device = self.cfg, self.generator, self.device
        images, masks, cond = self.batch_inputs(batch)
        with torch.no_grad():
            x0 = model.encode_pair(self.vae, images.to(self.vae.dtype), masks, cfg.layout).float()
        noise, t = self.noise_and_timesteps(x0)
        noisy = losses.noisy(x0, noise, losses.alpha_bar(self.alphas, t))
        conditioned = None
        if cfg.mask_condition_rate:  # these samples see their mask clean: p(image | mask) is learnt
            conditioned = (torch.rand(len(x0), generator=g) < cfg.mask_condition_rate).to(device)
            noisy_img, noisy_mask = model.unpack_latents(noisy, cfg.layout)
            clean = model.unpack_latents(x0, cfg.layout)[1]
            noisy = model.pack_latents(noisy_img, torch.where(conditioned[:, None, None, None], clean, noisy_mask),
                                       cfg.layout)
        offsets = None
        if (cfg.w_geo or cfg.w_consistency) and cfg.geo_crop:  # where each sample's decoded window lies (latent cells)
            side = model.unpack_latents(x0, cfg.layout)[1].shape[-1]
            offsets = torch.randint(0, max(1, side - cfg.geo_crop + 1), (len(x0), 2), generator=g)
        prior_pred = None
        pinned = t >= cfg.prior_min_t  # the samples the prior term counts: the base predicts only theirs
        if cfg.w_prior and pinned.any():  # first: switching the LoRA off and on again must not happen inside the graph
            noisy_img = model.unpack_latents(noisy, cfg.layout)[0]
            with self.autocast(), torch.no_grad(), self.base_unet() as base:
                if pinned.all():
                    prior_pred = base(noisy_img, t, encoder_hidden_states=cond).sample.float()
                else:
                    prior_pred = torch.zeros(noisy_img.shape, device=device)
                    prior_pred[pinned] = base(noisy_img[pinned], t[pinned],
                                              encoder_hidden_states=cond[pinned]).sample.float()
        with self.micro_batch():
            with self.autocast():
                pred = self.model(noisy, t, encoder_hidden_states=cond).sample
            terms = losses.joint_loss(pred.float(), x0, noise, t, self.alphas, self.prediction_type, cfg.layout,
                                      true_masks=masks, decode_mask=self.decode_mask, w_img=cfg.w_img,
                                      w_mask=cfg.w_mask, w_geo=cfg.w_geo, snr_gamma=cfg.snr_gamma or None,
                                      noisy_latents=noisy, prior_pred=prior_pred, w_prior=cfg.w_prior,
                                      geo_crop=cfg.geo_crop, geo_offsets=offsets, segment=self.segment,
                                      w_consistency=cfg.w_consistency, consistency_max_t=cfg.consistency_max_t,
                                      conditioned=conditioned, prior_min_t=cfg.prior_min_t)
            self.scaler.scale(terms["total"] / cfg.grad_accum).backward()
        return self.optimizer_step(terms)


def save_checkpoint(trainer: Trainer, folder: str) -> None:
    """`trainer`'s share of a checkpoint in `folder` (every rank writes into the same one): rank 0 the weights,
    EMA, optimiser and progress, every rank its own RNG streams (noise, timesteps, flips, prompt dropout;
    torch's and CUDA's), gradient scaler and where its data order stands -- a resumed run continues exactly."""
    from safetensors.torch import save_file

    if trainer.rank == 0:
        save_file(trainer.state(), os.path.join(folder, CHECKPOINT_STATE))
        if trainer.ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in trainer.ema.items()}, os.path.join(folder, CHECKPOINT_EMA))
        torch.save(trainer.optimizer.state_dict(), os.path.join(folder, CHECKPOINT_OPTIMIZER))
        Path(folder, CHECKPOINT_PROGRESS).write_text(json.dumps({
            "step": trainer.step, "history": trainer.history, "skipped_steps": trainer.skipped_steps,
            "world_size": trainer.world_size, "device": device_name(trainer.device)}))
    streams = {"generator": trainer.generator.get_state(), "torch": torch.get_rng_state()}
    if trainer.device.type == "cuda":
        streams |= {f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())}
    save_file(streams, os.path.join(folder, CHECKPOINT_RNG.format(rank=trainer.rank)), metadata={
        "rank": str(trainer.rank), "world_size": str(trainer.world_size), "epoch_seed": str(trainer.epoch_seed),
        "epoch_batches": str(trainer.epoch_batches),
        "scaler": json.dumps(trainer.scaler.state_dict() if trainer.scaler.is_enabled() else {})})


def load_checkpoint(trainer: Trainer, folder: str) -> None:
    """Resume `trainer` from a folder `save_checkpoint` wrote, with its rank's own streams and data order; a
    checkpoint of another number of workers is refused (each rank's streams are its own)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    progress = json.loads(Path(folder, CHECKPOINT_PROGRESS).read_text())
    rng_path = os.path.join(folder, CHECKPOINT_RNG.format(rank=trainer.rank))
    if "world_size" not in progress:
        raise UserError(f"run {trainer.cfg.name}'s last checkpoint was written by an earlier skindual, without "
                        "each worker's RNG streams: start another --name")
    if progress["world_size"] != trainer.world_size:
        raise UserError(f"run {trainer.cfg.name}'s last checkpoint was written by {progress['world_size']} "
                        f"worker(s), this run has {trainer.world_size}: resume it with --num-workers "
                        f"{progress['world_size']}, or start another --name")
    unexpected = trainer.trained.load_state_dict(load_file(os.path.join(folder, CHECKPOINT_STATE)), strict=False)
    if unexpected.unexpected_keys:
        raise RuntimeError(f"checkpoint has keys the model lacks: {unexpected.unexpected_keys[:3]}")
    if trainer.ema is not None and os.path.exists(os.path.join(folder, CHECKPOINT_EMA)):
        trainer.ema = {k: v.to(trainer.device) for k, v in load_file(os.path.join(folder, CHECKPOINT_EMA)).items()}
    trainer.optimizer.load_state_dict(torch.load(os.path.join(folder, CHECKPOINT_OPTIMIZER), weights_only=True))
    trainer.step, trainer.history = progress["step"], progress["history"]
    trainer.micro = trainer.step * trainer.cfg.grad_accum
    trainer.skipped_steps = progress.get("skipped_steps", 0)
    streams = load_file(rng_path)
    with safe_open(rng_path, "pt") as f:
        meta = f.metadata()
    trainer.generator.set_state(streams["generator"])
    torch.set_rng_state(streams["torch"])
    cuda = [streams[f"cuda.{i}"] for i in range(len(streams)) if f"cuda.{i}" in streams]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    trainer.epoch_seed, trainer.epoch_batches = int(meta["epoch_seed"]), int(meta["epoch_batches"])
    if json.loads(meta["scaler"]):
        trainer.scaler.load_state_dict(json.loads(meta["scaler"]))
    if progress.get("device") and progress["device"] != device_name(trainer.device):
        log.warning("resuming a run checkpointed on %s on %s: the steps from here on compute on another "
                    "device model (pass --accelerator-type to keep one)", progress["device"],
                    device_name(trainer.device))
