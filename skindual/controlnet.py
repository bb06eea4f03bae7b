"""The ControlNet branch: images drawn for a given mask by a branch built for it (``--train controlnet``).

The base UNet stays stock (4 channels, no LoRA) and frozen; the trained module is diffusers' `ControlNetModel`,
initialised from the base UNet as diffusers does (`controlnet_from_unet`), conditioned on the mask replicated to
3 channels in [0, 1] at pixel resolution (`mask_condition`: the conditioning image diffusers'
`StableDiffusionControlNetPipeline` expects).  Its adapter folder (`save_controlnet`) holds ``controlnet/``
(``config.json`` and ``diffusion_pytorch_model.safetensors``, `ControlNetModel.save_pretrained`'s) and
``skindual_adapter.json`` (``train: controlnet``, the base model, the training config, the sha256 of every
file), so stock diffusers loads it and `load_controlnet` verifies it.  `ControlNetPipeline` samples: the
ControlNet's down and mid residuals added into the base UNet at every step, with classifier-free guidance, one
seeded noise per sample; given no masks it takes them from a joint model's own sampling first (`masker`); with
a `guide` (`guidance.SegmenterGuidance`) each image is nudged while it is sampled towards one a segmenter reads as
its mask.
Pure model code: no Ray, no storage beyond a local folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from skindual.base_models import base_config
from skindual.dual_pipeline import DualPipeline, DualSample, make_scheduler, pixels
from skindual.errors import UserError
from skindual.guidance import SegmenterGuidance
from skindual.model import (ADAPTER_JSON, CONTROLNET_DIR, ADAPTER_REDO, AdapterInfo, adapter_record, load_adapter,
                            load_pipeline, stock_pipeline_beside, write_adapter_json)
from skindual.prompts import DEFAULT_TEMPLATE
from skindual.quality import MASK_SMOOTHING
from skindual.storage import file_sha256

log = logging.getLogger(__name__)

CONDITIONING_CHANNELS = (16, 32, 96, 256)
"""diffusers' conditioning embedding (SD's 8× VAE: 3 stride-2 convolutions); a base whose VAE scales by 2^k
takes the first k + 1 (the demo's 4×: 16, 32, 96), so the embedding meets the latents' size."""
ARCHITECTURE = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block", "cross_attention_dim",
                "attention_head_dim", "num_attention_heads", "use_linear_projection")
"""The UNet config fields a ControlNet copies and must share with the base UNet it drives."""


def controlnet_from_unet(unet, vae_scale_factor: int):
    """A `ControlNetModel` initialised from `unet` (its conv_in, time embedding, down and mid blocks copied; the
    zero convolutions at zero, so step 0 adds nothing), for a 3-channel conditioning image at pixel size.  Its
    conditioning embedding is randomly initialised: seed torch first for the same start."""
    from diffusers import ControlNetModel

    downsamples = int(vae_scale_factor).bit_length() - 1
    if 2 ** downsamples != vae_scale_factor or not 1 <= downsamples < len(CONDITIONING_CHANNELS):
        raise ValueError(f"a VAE scale factor of {vae_scale_factor}: expected 2, 4 or 8")
    return ControlNetModel.from_unet(unet, conditioning_channels=3,
                                     conditioning_embedding_out_channels=CONDITIONING_CHANNELS[:downsamples + 1])


def mask_condition(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """0/1 masks N×H×W → the ControlNet's conditioning images N×3×H×W in [0, 1] (float32)."""
    return torch.as_tensor(masks).float()[:, None].expand(-1, 3, -1, -1).contiguous()


def save_controlnet(folder: str | Path, controlnet, base_model: str | Path, training_config: dict,
                    resolution: int | None = None, prompt_template: str = DEFAULT_TEMPLATE,
                    prompt_attributes: dict | None = None, fingerprint: str = "") -> AdapterInfo:
    """Write a ControlNet's adapter folder: ``controlnet/`` by `ControlNetModel.save_pretrained` (safetensors),
    then ``skindual_adapter.json`` last (``train: controlnet``, no layout, every file's sha256), as
    `model.save_adapter` does for the joint model's."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    try:
        controlnet.save_pretrained(tmp / CONTROLNET_DIR, safe_serialization=True)
        files = {f"{CONTROLNET_DIR}/{p.name}": file_sha256(p) for p in sorted((tmp / CONTROLNET_DIR).iterdir())}
        write_adapter_json(tmp, adapter_record(base_model, None, "controlnet", training_config, files, resolution,
                                               prompt_template, prompt_attributes, fingerprint))
        (folder / ADAPTER_JSON).unlink(missing_ok=True)  # a half-replaced folder never looks complete
        shutil.rmtree(folder / CONTROLNET_DIR, ignore_errors=True)
        os.replace(tmp / CONTROLNET_DIR, folder / CONTROLNET_DIR)
        os.replace(tmp / ADAPTER_JSON, folder / ADAPTER_JSON)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_adapter(folder)


def load_controlnet_info(folder: str | Path, flag: str = "--controlnet", url: str | None = None) -> AdapterInfo:
    """A ControlNet's adapter folder, verified (`model.load_adapter`: plain names, every sha256); a folder that
    is not a ControlNet output (a joint model's adapter, say) is one `UserError` naming `flag` and `url` (where the
    folder was fetched from; the folder itself without one)."""
    info = load_adapter(folder)
    if info.train != "controlnet" or f"{CONTROLNET_DIR}/config.json" not in info.files:
        raise UserError(f"{flag} {url or folder}: an adapter of --train {info.train}, not a ControlNet; give the "
                        "adapter folder of a fine-tune run with --train controlnet")
    return info


def load_controlnet(info: AdapterInfo, dtype: torch.dtype = torch.float32):
    """The `ControlNetModel` of a verified ControlNet folder (`load_controlnet_info`)."""
    from diffusers import ControlNetModel

    return ControlNetModel.from_pretrained(str(info.folder / CONTROLNET_DIR), torch_dtype=dtype)


def controlnet_misfit(info: AdapterInfo, base_model: str | Path, s3_endpoint: str | None = None) -> str | None:
    """Why the ControlNet cannot drive `base_model`'s UNet (its architecture differs: `ARCHITECTURE`), or None.
    Reads configs only."""
    try:
        mine = json.loads((info.folder / CONTROLNET_DIR / "config.json").read_text())
    except ValueError:
        raise UserError(f"{info.folder / CONTROLNET_DIR / 'config.json'} is unreadable; {ADAPTER_REDO}") from None
    unet = base_config(base_model, "unet", s3_endpoint)

    def plain(value):
        return list(value) if isinstance(value, (list, tuple)) else value

    for key in ARCHITECTURE:
        if plain(mine.get(key)) != plain(unet.get(key)):
            return f"its {key} is {plain(mine.get(key))}, the base UNet's {plain(unet.get(key))}"
    return None


class ControlNetPipeline:
    """Images drawn for given masks: the stock base UNet, with a ControlNet's residuals, denoises image latents
    under classifier-free guidance (as diffusers' `StableDiffusionControlNetPipeline`), each sample from its own
    seeded noise.  With a `masker` (a joint model's `DualPipeline`) and no masks given, the joint pair is sampled
    first and its mask kept: mask first, then its image, from the same seed (the ControlNet's noise is the image
    half of the joint sample's)."""

    def __init__(self, pipe, controlnet, info: AdapterInfo | None = None, scheduler: str = "ddim",
                 resolution: int | None = None, decode_batch: int = 4, masker: DualPipeline | None = None,
                 control_scale: float = 1.0, control_end: float = 1.0):
        self.pipe, self.controlnet, self.info, self.masker = pipe, controlnet, info, masker
        if control_scale < 0 or not 0 < control_end <= 1:
            raise ValueError(f"control_scale {control_scale} must be ≥ 0 and control_end {control_end} in (0, 1]")
        self.control_scale, self.control_end = control_scale, control_end
        self.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
        self.resolution = resolution or pipe.unet.config.sample_size * pipe.vae_scale_factor
        if masker is not None and masker.resolution != self.resolution:
            raise ValueError(f"the joint model samples {masker.resolution}², the ControlNet {self.resolution}²")
        self.decode_batch = max(1, decode_batch)
        self.guide: SegmenterGuidance | None = None  # set it to refine each image for its mask while sampling

    @classmethod
    def from_pretrained(cls, base_model: str | Path, controlnet: str | Path, device="cpu",
                        dtype: torch.dtype = torch.float32, scheduler: str = "ddim", resolution: int | None = None,
                        decode_batch: int = 4, s3_endpoint: str | None = None,
                        masker: DualPipeline | None = None, control_scale: float = 1.0,
                        control_end: float = 1.0) -> "ControlNetPipeline":
        """The stock base model (its own UNet beside a `masker`'s adapted one, the rest shared with the masker) with a
        ControlNet folder's model; samples at `resolution`, else the masker's, else the ControlNet's trained one
        (`control_scale`, `control_end`: `denoise`'s control schedule)."""
        info = load_controlnet_info(controlnet)
        if masker is not None:  # the masker's VAE and text encoder serve both: only the stock UNet is loaded again
            pipe = stock_pipeline_beside(masker.pipe, base_model, dtype, s3_endpoint)
        else:
            pipe = load_pipeline(base_model, torch_dtype=dtype, s3_endpoint=s3_endpoint)
        pipe.to(device)
        pipe.set_progress_bar_config(disable=True)
        model = load_controlnet(info, dtype).to(device).eval()
        size = resolution or (masker.resolution if masker is not None else info.resolution)
        return cls(pipe, model, info, scheduler, size, decode_batch, masker, control_scale, control_end)

    unet = property(lambda self: self.pipe.unet)
    vae = property(lambda self: self.pipe.vae)
    device = property(lambda self: self.pipe.unet.device)
    dtype = property(lambda self: self.pipe.unet.dtype)
    adapter = property(lambda self: self.masker.adapter if self.masker is not None else None)

    def initial_noise(self, seeds: list[int]) -> torch.Tensor:
        """Per-sample image-latent noise, each from its own CPU generator (the first channels of the joint
        model's noise for the same seed)."""
        side = self.resolution // self.pipe.vae_scale_factor
        shape = (self.unet.config.in_channels, side, side)
        return torch.stack([torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(s)))
                            for s in seeds]).to(self.device, self.dtype)

    @torch.no_grad()
    def denoise(self, prompts: list[str], seeds: list[int], masks: np.ndarray, steps: int = 25,
                guidance: float = 4.0) -> torch.Tensor:
        """The final image latents for `masks` (0/1 N×H×W at `resolution`).  The ControlNet's residuals enter
        scaled by ``control_scale`` over the first ``control_end`` share of the steps (diffusers'
        ``controlnet_conditioning_scale`` and ``control_guidance_end``); the steps after it are the stock base's alone,
        where the fine texture forms on the outline the mask has already set.  With a `guide` (DDIM only), the
        predicted clean latents of its steps are refined for the masks (`guidance.SegmenterGuidance`)."""
        if not len(prompts) == len(seeds) == len(masks):
            raise ValueError(f"{len(prompts)} prompts, {len(seeds)} seeds, {len(masks)} masks")
        if tuple(masks.shape[1:]) != (self.resolution, self.resolution):
            raise ValueError(f"given masks are {masks.shape[1:]}, the pipeline samples {self.resolution}²")
        cfg = guidance > 1.0
        cond, uncond = self.pipe.encode_prompt(list(prompts), self.device, 1, cfg)
        embeds = torch.cat([uncond, cond]) if cfg else cond
        control = mask_condition(np.ascontiguousarray(masks)).to(self.device, self.dtype)
        control = torch.cat([control, control]) if cfg else control
        sched = self.scheduler
        sched.set_timesteps(steps, device=self.device)
        latents = self.initial_noise(seeds) * sched.init_noise_sigma
        timesteps = sched.timesteps
        guided = self._guided_steps(len(timesteps))
        for i, t in enumerate(timesteps):
            x = sched.scale_model_input(torch.cat([latents, latents]) if cfg else latents, t)
            down = mid = None
            if (i + 1) / len(timesteps) <= self.control_end and self.control_scale > 0:  # as diffusers' keeps a step
                down, mid = self.controlnet(x, t, encoder_hidden_states=embeds, controlnet_cond=control,
                                            conditioning_scale=self.control_scale, return_dict=False)
            pred = self.unet(x, t, encoder_hidden_states=embeds, down_block_additional_residuals=down,
                             mid_block_additional_residual=mid).sample
            if cfg:
                uncond_pred, cond_pred = pred.chunk(2)
                pred = uncond_pred + guidance * (cond_pred - uncond_pred)
            out = sched.step(pred, t, latents)
            latents = out.prev_sample
            if i in guided:  # DDIM's next latents, for the refined x̂0 (the predicted noise kept)
                x0 = out.pred_original_sample
                a_next = float(sched.alphas_cumprod[timesteps[i + 1]])
                latents = latents + a_next ** 0.5 * (self.guide.refine(self.vae, x0, masks) - x0)
        return latents

    def _guided_steps(self, n: int) -> set[int]:
        if self.guide is None:
            return set()
        from diffusers import DDIMScheduler

        if not isinstance(self.scheduler, DDIMScheduler):
            raise ValueError(f"segmenter guidance updates latents as DDIM does; the scheduler is "
                             f"{type(self.scheduler).__name__}")
        return self.guide.guided_steps(n)

    @torch.no_grad()
    def __call__(self, prompts: list[str], seeds: list[int], steps: int = 25, guidance: float = 4.0,
                 clean_masks: bool = True, mask_smoothing: float = MASK_SMOOTHING,
                 masks: np.ndarray | None = None) -> DualSample:
        """One image per (prompt, seed) for its mask: the given `masks` (0/1 N×H×W), returned as they are, or
        without them the `masker`'s masks of the same prompts and seeds (cleaned as `DualPipeline` cleans them);
        ``latents`` are the image latents."""
        if masks is None:
            if self.masker is None:
                raise ValueError("no masks given and no joint model (masker) to sample them")
            masks = self.masker(prompts, seeds, steps, guidance, clean_masks, mask_smoothing).masks
        latents = self.denoise(prompts, seeds, np.asarray(masks), steps, guidance)
        scaled = latents / self.vae.config.scaling_factor
        images = torch.cat([self.vae.decode(scaled[i:i + self.decode_batch]).sample.float()
                            for i in range(0, len(scaled), self.decode_batch)]).clamp(-1, 1)
        return DualSample(images=pixels(images), masks=np.asarray(masks, np.uint8), latents=latents.float().cpu())
