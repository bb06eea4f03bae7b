"""Sampling the joint image–mask model: `DualPipeline`, one denoising loop over joint latents with
classifier-free guidance that yields an image and its mask together (or, given masks, the image for each),
over a base pipeline whose UNet `skindual.model` has adapted (`prepare_unet` in a training job, an adapter
folder applied by `DualPipeline.from_pretrained`).  Pure model code: no Ray, no storage.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skindual import sampling_speed
from skindual.base_models import demo_alias
from skindual.errors import UserError
from skindual.model import (AdapterInfo, apply_adapter, check_layout, load_adapter, load_pipeline, mask_to_image,
                            pack_latents, unpack_latents, vae_decoder, widen_unet)
from skindual.quality import MASK_SMOOTHING

log = logging.getLogger(__name__)


def make_scheduler(name: str, config):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

    classes = {"ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler, "euler": EulerDiscreteScheduler}
    if name not in classes:
        raise UserError(f"unknown scheduler {name!r}; choose one of {', '.join(classes)}")
    return classes[name].from_config(config)


@dataclass
class DualSample:
    images: np.ndarray  # uint8 N×H×W×3
    masks: np.ndarray  # uint8 N×H×W, values 0/1
    latents: torch.Tensor = field(repr=False)  # final joint latents (float32, CPU), before decoding


class DualPipeline:
    """One denoising loop over joint image–mask latents, with classifier-free guidance.

    Wraps a `StableDiffusionPipeline` whose UNet is already adapted (by `prepare_unet` in a
    training job, or by `from_pretrained` with an adapter folder).  `resolution` is the side of one
    square image (and its mask) in pixels, by default the base model's.
    """

    def __init__(self, pipe, layout: str = "channels", scheduler: str = "ddim",
                 adapter: AdapterInfo | None = None, resolution: int | None = None, decode_batch: int = 4):
        self.pipe, self.layout, self.adapter = pipe, check_layout(layout), adapter
        if layout == "channels" and pipe.unet.config.in_channels != 8:
            raise ValueError("layout 'channels' needs a widened UNet: call prepare_unet or widen_unet first")
        self.scheduler_name = scheduler
        self.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        self.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        step = pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)
        if self.resolution % step:
            raise UserError(f"resolution {self.resolution}: this base model needs a multiple of {step}")
        self.decode_batch = max(1, decode_batch)
        trained = adapter.training_config.get("mask_condition_rate", 0) if adapter is not None else 0
        self.mask_hold = "clean" if trained else "noised"
        """How `__call__` holds given masks: an adapter trained with a mask-conditioned share sees them clean,
        as it learnt to; any other joint model gets them noised to each step's level (RePaint-style)."""
        self.mask_cleanup = "auto"
        """Where `finish_masks` cleans the decoded masks: "auto" (torch on a GPU, scipy on the CPU), "torch" or
        "scipy" (`sampling_speed.MASK_CLEANUPS`); the same masks either way."""

    @classmethod
    def from_pretrained(cls, base_model: str | Path, adapter: str | Path | None = None, device="cpu",
                        dtype: torch.dtype = torch.float32, scheduler: str = "ddim",
                        layout: str | None = None, fuse: bool = True, resolution: int | None = None,
                        decode_batch: int = 4, s3_endpoint: str | None = None) -> "DualPipeline":
        """The base model (an SD-2 id or folder) with an adapter folder applied, or the bare base
        (``layout`` then picks the layout; ``channels`` starts as the base model, mask untrained).
        Samples come at `resolution`, else the adapter's trained one, else the base model's."""
        info = load_adapter(adapter) if adapter is not None else None
        if info is not None and layout is not None and layout != info.layout:
            raise UserError(f"adapter {adapter} has layout {info.layout!r}, not {layout!r}")
        layout = info.layout if info is not None else (layout or "channels")
        if info is not None and info.base_model != str(base_model) and (
                demo_alias(info.base_model) is None or demo_alias(info.base_model) != demo_alias(base_model)):
            log.warning("adapter %s was trained on %s, loading it onto %s", adapter, info.base_model, base_model)
        pipe = load_pipeline(base_model, torch_dtype=dtype, s3_endpoint=s3_endpoint)
        if info is not None:
            apply_adapter(pipe, info, fuse=fuse)
        elif layout == "channels":
            widen_unet(pipe.unet)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        return cls(pipe, layout, scheduler, info, resolution or (info.resolution if info else None), decode_batch)

    unet = property(lambda self: self.pipe.unet)
    vae = property(lambda self: self.pipe.vae)
    text_encoder = property(lambda self: self.pipe.text_encoder)
    tokenizer = property(lambda self: self.pipe.tokenizer)
    device = property(lambda self: self.pipe.unet.device)
    dtype = property(lambda self: self.pipe.unet.dtype)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Per-sample noise, each from its own CPU generator: a sample depends on its seed only."""
        channels, side = self.unet.config.in_channels, self.resolution // self.pipe.vae_scale_factor
        shape = (channels, side, 2 * side if self.layout == "side-by-side" else side)
        noise = [torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device, self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, masks: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Joint latents → (images N×3×H×W in [-1, 1], mask logits N×H×W: mean of the decoded channels, or
        None without `masks`), decoded `decode_batch` latents at a time (the VAE decoder's memory grows with
        its batch)."""
        image_latents, mask_latents = unpack_latents(latents, self.layout)
        both = (torch.cat([image_latents, mask_latents]) if masks else image_latents).to(self.dtype)
        decode = vae_decoder(self.vae)
        decoded = torch.cat([decode(both[i:i + self.decode_batch]).float()
                             for i in range(0, len(both), self.decode_batch)])
        if not masks:
            return decoded.clamp(-1, 1), None
        images, mask_logits = decoded.chunk(2)
        return images.clamp(-1, 1), mask_logits.mean(1)

    @torch.no_grad()
    def encode_masks(self, masks: np.ndarray) -> torch.Tensor:
        """0/1 masks N×H×W (at `resolution`) → their scaled VAE latents (posterior means), as training encodes them."""
        images = mask_to_image(torch.from_numpy(np.ascontiguousarray(masks))).to(self.device, self.dtype)
        encode = self.vae.encode
        z = torch.cat([encode(images[i:i + self.decode_batch]).latent_dist.mean
                       for i in range(0, len(images), self.decode_batch)])
        return z * self.vae.config.scaling_factor

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
                 clean_masks: bool = True, mask_smoothing: float = MASK_SMOOTHING,
                 masks: np.ndarray | None = None) -> DualSample:
        """Sample one image–mask pair per (prompt, seed).  Masks: the decoded mask logits, smoothed by a
        Gaussian of σ = `mask_smoothing` latent cells (× the VAE's scale factor in pixels), thresholded
        at 0 and, with `clean_masks`, cut to their largest component with holes filled (`finish_masks`).

        Given `masks` (0/1 N×H×W at `resolution`), only the image is sampled: before every step the mask half
        of the latents is replaced by the given masks' latents (`encode_masks`), noised to that step's level
        with the mask half of the seed's own noise (`scheduler.add_noise`), as RePaint-style inpainting holds
        the known region, or clean (`mask_hold`); the returned masks are the given ones."""
        latents = self.denoise(prompts, seeds, steps, guidance, masks)
        if masks is not None:
            images, _ = self.decode(latents, masks=False)
            return DualSample(images=pixels(images), masks=np.asarray(masks, np.uint8), latents=latents.float().cpu())
        images, mask_logits = self.decode(latents)
        return DualSample(images=pixels(images), masks=self.finish_masks(mask_logits, mask_smoothing, clean_masks),
                          latents=latents.float().cpu())

    @torch.no_grad()
    def denoise(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
                masks: np.ndarray | None = None) -> torch.Tensor:
        """The denoising loop of `__call__`: the final joint latents, on the device (with given `masks`, their
        mask half the given masks' latents)."""
        if len(prompts) != len(seeds) or (masks is not None and len(masks) != len(seeds)):
            raise ValueError(f"{len(prompts)} prompts, {len(seeds)} seeds, "
                             f"{'no' if masks is None else len(masks)} masks")
        if masks is not None and tuple(masks.shape[1:]) != (self.resolution, self.resolution):
            raise ValueError(f"given masks are {masks.shape[1:]}, the pipeline samples {self.resolution}²")
        cfg = guidance > 1.0
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, cfg)
        embeds = torch.cat([uncond, cond]) if cfg else cond
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device)
        noise = self.initial_noise(seeds)
        latents = noise * sched.init_noise_sigma
        known = self.encode_masks(masks) if masks is not None else None
        for t in sched.timesteps:
            if known is not None and self.mask_hold == "noised":
                held = sched.add_noise(known, unpack_latents(noise, self.layout)[1], t.reshape(1).expand(len(known)))
                latents = pack_latents(unpack_latents(latents, self.layout)[0], held.to(latents.dtype), self.layout)
            x = sched.scale_model_input(torch.cat([latents, latents]) if cfg else latents, t)
            if known is not None and self.mask_hold == "clean":  # the model input's mask half, as in training
                given = known.to(x.dtype)
                x = pack_latents(unpack_latents(x, self.layout)[0], torch.cat([given, given]) if cfg else given,
                                 self.layout)
            pred = self.unet(x, t, encoder_hidden_states=embeds).sample
            if cfg:
                uncond_pred, cond_pred = pred.chunk(2)
                pred = uncond_pred + guidance * (cond_pred - uncond_pred)
            latents = sched.step(pred, t, latents).prev_sample
        if known is not None:
            latents = pack_latents(unpack_latents(latents, self.layout)[0], known.to(latents.dtype), self.layout)
        return latents

    def finish_masks(self, mask_logits: torch.Tensor, mask_smoothing: float = MASK_SMOOTHING,
                     clean_masks: bool = True) -> np.ndarray:
        """Decoded N×H×W mask logits → uint8 0/1 masks N×H×W (see `__call__`), cleaned where ``mask_cleanup``
        says (`sampling_speed.finish_masks`: on a GPU, without leaving it)."""
        return sampling_speed.finish_masks(mask_logits, mask_smoothing * self.pipe.vae_scale_factor, clean_masks,
                                           self.mask_cleanup)

def pixels(images: torch.Tensor) -> np.ndarray:
    """Decoded N×3×H×W images in [-1, 1] → uint8 N×H×W×3 on the host (rounded on the images' device)."""
    return ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
