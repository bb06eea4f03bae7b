"""The demo base model: a tiny Stable-Diffusion-2-shaped pipeline that runs offline.

It has SD-2's parts and conventions -- a CLIP text encoder (frozen) with a BPE
tokenizer built here from the prompt vocabulary, an `AutoencoderKL`, a
`UNet2DConditionModel` with linear attention projections, v-prediction -- at
about 1/300 of the size, and is pretrained on procedural lesions so that its
samples mean something.  This module is its pretraining recipe.

Pretraining for class control takes longer than a fresh machine should wait,
so the trained weights ship as `skindual/assets/demo_base.safetensors` (fp16;
its metadata holds the configs, the tokenizer and the recipe, so the file alone
rebuilds the pipeline: `skindual.base_models` reads it, and materialises it as a
`from_pretrained` folder cached under the file's sha256).
`python lab/build_demo_base.py` trains it again with the recipe's defaults and writes the
artifact with `save_artifact`.  The demo bases are fixed test beds: this is kept so that they can
be rebuilt exactly, not to be tuned.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from skindual.base_models import (REBUILD_COMMAND, artifact_metadata, assemble_pipeline, build_components,
                                  pipeline_from_artifact)
from skindual.cli import option
from skindual.demo.render import render_batch
from skindual.demo.world import encode_latents
from skindual.joint_trainer import lr_factor
from skindual.model import mask_to_image
from skindual.prompts import CLASSES, LOCALIZATIONS, SEXES, build_prompt
from skindual.quality import images_to_tensor
from skindual.storage import file_sha256

log = logging.getLogger(__name__)

DEMO_RESOLUTION = 64


@dataclass
class PretrainRecipe:
    """How a demo base is pretrained; the defaults are what the shipped easy artifact used.  Each field is a
    flag of lab/build_demo_base.py (`rebuild_command` names those a recipe changes)."""

    seed: int = option(0, "seed of the pretraining data, the initialisation and the batches")
    per_class: int = option(300, "class-balanced pretraining lesions per class")
    vae_steps: int = option(800, "VAE pretraining steps")
    vae_lr: float = option(1e-3, "VAE learning rate")
    vae_batch_size: int = option(16, "VAE batch size")
    unet_steps: int = option(3000, "UNet pretraining steps")
    unet_lr: float = option(5e-4, "UNet learning rate")
    batch_size: int = option(32, "UNet batch size")
    uncond_prob: float = option(0.1, "share of prompts dropped to '' (classifier-free guidance)")
    ema_decay: float = option(0.999, "EMA of the UNet's weights")
    difficulty: str = option("easy", "the demo world it is pretrained on (skindual.demo.render.DIFFICULTIES)")
    start_from: str = option("", "an artifact whose weights pretraining continues from (empty: random initialisation)")
    vae_channels: str = option("", "the VAE's block widths, comma-separated multiples of 16 (e.g. 64,64,128): a fresh "
                                   "VAE where they differ from --start-from's (empty: the start's, or 32,32,64)")
    vae_colour_weight: float = option(0.0, "weight of the VAE's low-frequency colour term (4 × 4-pooled L1; 0: none)")
    vae_lesion_weight: float = option(0.0, "weight of the VAE's colour term on the lesion alone (0: none)")
    vae_lesion_smooth: bool = option(False, "that term on a Gaussian low band (σ 2 px) instead of the latent's 4 × 4 "
                                            "cells")

    def channels(self) -> tuple[int, ...]:
        return tuple(int(c) for c in str(self.vae_channels).split(",") if c.strip())


# --------------------------------------------------------------------------- components


def prompt_corpus() -> list[str]:
    """Every class with every body site and a spread of patients: what the tokenizer is trained on."""
    texts = []
    for cls in CLASSES:
        texts.append(build_prompt(cls.code))
        for i, site in enumerate(LOCALIZATIONS):
            texts.append(build_prompt(cls.code, site, 5 * (i % 18), SEXES[i % 3]))
    return texts + [" ".join(str(d) for d in range(10))]


def build_tokenizer():
    """A CLIP BPE tokenizer trained on the prompt corpus: every prompt word is one token."""
    from tokenizers import pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    backend = CLIPTokenizer().backend_tokenizer
    trainer = trainers.BpeTrainer(
        vocab_size=2048, min_frequency=1, show_progress=False, end_of_word_suffix="</w>",
        special_tokens=["<|startoftext|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(prompt_corpus(), trainer)
    model = json.loads(backend.to_str())["model"]
    return CLIPTokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]], model_max_length=77)


def component_configs(vocab_size: int, bos: int, eos: int) -> dict[str, dict]:
    """The configs of the demo base's parts (SD-2 shapes, tiny widths)."""
    return {
        "text_encoder": dict(
            vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=64,
            bos_token_id=bos, eos_token_id=eos, pad_token_id=eos, hidden_act="gelu",
        ),
        "vae": dict(
            in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
            down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
            block_out_channels=[32, 32, 64], norm_num_groups=16, sample_size=DEMO_RESOLUTION,
            mid_block_add_attention=False,
        ),
        "unet": dict(
            sample_size=DEMO_RESOLUTION // 4, in_channels=4, out_channels=4, layers_per_block=2,
            block_out_channels=[32, 64],
            down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
            up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"],
            cross_attention_dim=64, attention_head_dim=8, use_linear_projection=True,
            norm_num_groups=16,
        ),
        "scheduler": dict(
            num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
            prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False, steps_offset=1,
        ),
    }


# --------------------------------------------------------------------------- artifact and cache


def recorded_recipe(recipe: PretrainRecipe) -> dict:
    """The recipe as an artifact records it: the artifact it started from by file name and sha256, not by a
    path that only the building machine has."""
    fields = asdict(recipe) | {"vae_channels": list(recipe.channels())}
    if recipe.start_from:
        fields["start_from"] = {"file": Path(recipe.start_from).name, "sha256": file_sha256(recipe.start_from)}
    return fields


def rebuild_command(recipe: PretrainRecipe) -> str:
    """The lab/build_demo_base.py command that rebuilds an artifact of `recipe`: the flag of every field the
    recipe changes (not ``--start-from``: the recipe records that artifact by name and sha256)."""
    from dataclasses import fields

    parts = [REBUILD_COMMAND]
    for f in fields(PretrainRecipe):
        value = getattr(recipe, f.name)
        if f.name == "start_from" or value == f.default:
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):  # a switch: its flag alone
            parts.append(flag)
        else:
            parts.append(f"{flag} {value:g}" if isinstance(value, float) else f"{flag} {value}")
    return " ".join(parts)


def save_artifact(pipe, recipe: PretrainRecipe, path: str | Path, configs: dict[str, dict]) -> None:
    """Weights in fp16 plus everything needed to rebuild the pipeline, in one safetensors file."""
    tensors = {}
    for name in ("text_encoder", "vae", "unet"):
        for key, value in getattr(pipe, name).state_dict().items():
            tensors[f"{name}.{key}"] = value.detach().to(torch.float16).contiguous()
    tok_model = json.loads(pipe.tokenizer.backend_tokenizer.to_str())["model"]
    configs = dict(configs, vae=dict(configs["vae"], scaling_factor=pipe.vae.config.scaling_factor))
    metadata = {
        "configs": json.dumps(configs, sort_keys=True),
        "tokenizer": json.dumps({"vocab": tok_model["vocab"], "merges": tok_model["merges"]}, sort_keys=True),
        "recipe": json.dumps(recorded_recipe(recipe), sort_keys=True),
        "rebuild_command": rebuild_command(recipe),
    }
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{path}.tmp"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- pretraining


def warmup_cosine(opt, steps: int, warmup_fraction: float = 0.03):
    """Linear warm-up over the first `warmup_fraction` of `steps`, then cosine decay to 0 (`lr_factor`)."""
    warmup = max(1, int(steps * warmup_fraction))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, warmup, steps, "cosine"))


def low_band(x: torch.Tensor, pool: int, smooth: bool = False) -> torch.Tensor:
    """The low frequencies of N×C×H×W `x`: `pool` × `pool` average pooling (the cells of the latent's grid),
    or with `smooth` a Gaussian blur of σ = `pool` / 2 at full resolution, which has no cell borders for a
    decoder to fit cell-wide colour offsets to."""
    if not smooth:
        return F.avg_pool2d(x, pool)
    sigma, radius = pool / 2, pool
    taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device) / sigma) ** 2)
    taps = (taps / taps.sum()).view(1, 1, -1)
    for _ in range(2):  # separable: along the rows, then (transposed) along the columns
        x = F.conv1d(F.pad(x.flatten(0, 2)[:, None], (radius, radius), mode="reflect"), taps).view_as(x)
        x = x.transpose(-1, -2)
    return x


def vae_batch_loss(vae, data: torch.Tensor, batch_size: int, g: torch.Generator, colour_weight: float = 0.0,
                   pool: int = 4) -> torch.Tensor:
    """One VAE training batch drawn from `data` (flipped half the time) and its loss: reconstruction (L1 + MSE)
    with a small KL term, plus, with `colour_weight`, that weight × L1 between the `pool` × `pool`
    average-pooled images (their low frequencies, where a lesion's colour is)."""
    batch = data[torch.randint(len(data), (batch_size,), generator=g)]
    if torch.rand((), generator=g) < 0.5:
        batch = batch.flip(-1)
    posterior = vae.encode(batch).latent_dist
    recon = vae.decode(posterior.sample(generator=g)).sample
    loss = F.l1_loss(recon, batch) + F.mse_loss(recon, batch) + 1e-6 * posterior.kl().mean()
    if colour_weight:
        loss = loss + colour_weight * F.l1_loss(low_band(recon, pool), low_band(batch, pool))
    return loss


def lesion_colour_loss(vae, images: torch.Tensor, lesions: torch.Tensor, batch_size: int, g: torch.Generator,
                       pool: int = 4, smooth: bool = False) -> torch.Tensor:
    """A batch of `images` (N×3×H×W in [-1, 1]) and their binary lesion masks (N×H×W): L1 between the
    low bands (`low_band`) of the images and of their round trip, weighted by the mask's low band (each
    cell's lesion share) and averaged over the lesion.  Where a lesion differs from the skin by a faint
    tint, a loss over the whole image is dominated by the skin and the hair; this one weighs the lesion's
    own colour, which is what tells the classes apart."""
    pick = torch.randint(len(images), (batch_size,), generator=g)
    batch, weight = images[pick], low_band(lesions[pick][:, None].float(), pool, smooth)
    recon = vae.decode(vae.encode(batch).latent_dist.sample(generator=g)).sample
    error = (low_band(recon, pool, smooth) - low_band(batch, pool, smooth)).abs().mean(1, keepdim=True)
    return (error * weight).sum() / weight.sum().clamp_min(1.0)


def train_vae(vae, images: torch.Tensor, masks: torch.Tensor, recipe: PretrainRecipe) -> None:
    """Reconstruction (L1 + MSE) with a small KL term, on lesion images and masks alike (`vae_batch_loss`),
    and with `recipe.vae_lesion_weight` that weight × `lesion_colour_loss` on a second batch of images."""
    data = torch.cat([images, masks])
    lesions = masks[:, 0] > 0  # masks as the VAE sees them: {-1, 1} on 3 channels
    g = torch.Generator().manual_seed(recipe.seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = warmup_cosine(opt, recipe.vae_steps)
    vae.train()
    start = time.time()
    for step in range(recipe.vae_steps):
        loss = vae_batch_loss(vae, data, recipe.vae_batch_size, g, recipe.vae_colour_weight)
        if recipe.vae_lesion_weight:
            loss = loss + recipe.vae_lesion_weight * lesion_colour_loss(vae, images, lesions, recipe.vae_batch_size, g,
                                                                        smooth=recipe.vae_lesion_smooth)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == recipe.vae_steps - 1:
            log.info("vae step %d/%d loss %.4f (%.2f s/step)", step + 1, recipe.vae_steps, loss.item(),
                     (time.time() - start) / (step + 1))
    vae.eval()


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids)[0]


def train_unet(pipe, latents: torch.Tensor, prompt_embeds: torch.Tensor, uncond: torch.Tensor,
               recipe: PretrainRecipe) -> None:
    """Text-to-image denoising (v-prediction) on scaled latents with prompt dropout and an EMA copy."""
    from diffusers import DDPMScheduler

    unet, noise_sched = pipe.unet, DDPMScheduler.from_config(pipe.scheduler.config)
    ema = {k: v.detach().clone() for k, v in unet.state_dict().items()}
    g = torch.Generator().manual_seed(recipe.seed + 1)
    opt = torch.optim.AdamW(unet.parameters(), lr=recipe.unet_lr, weight_decay=1e-2)
    sched = warmup_cosine(opt, recipe.unet_steps)
    unet.train()
    start = time.time()
    for step in range(recipe.unet_steps):
        idx = torch.randint(len(latents), (recipe.batch_size,), generator=g)
        x0 = latents[idx]
        if torch.rand((), generator=g) < 0.5:
            x0 = x0.flip(-1)
        cond = prompt_embeds[idx].clone()
        drop = torch.rand(len(idx), generator=g) < recipe.uncond_prob
        cond[drop] = uncond
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, noise_sched.config.num_train_timesteps, (len(idx),), generator=g)
        noisy = noise_sched.add_noise(x0, noise, t)
        target = noise_sched.get_velocity(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, cond).sample, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in unet.state_dict().items():
                if v.dtype.is_floating_point:
                    ema[k].lerp_(v, 1 - decay)
        if step % 100 == 0 or step == recipe.unet_steps - 1:
            rate = (time.time() - start) / (step + 1)
            log.info("unet step %d/%d loss %.4f (%.2f s/step, ETA %.0f s)", step + 1, recipe.unet_steps,
                     loss.item(), rate, rate * (recipe.unet_steps - step - 1))
    unet.load_state_dict(ema)
    unet.eval()


def fresh_vae(configs: dict[str, dict], channels, seed: int):
    """A freshly initialised VAE of `configs`' VAE with other block widths, and the configs that record it."""
    from diffusers import AutoencoderKL

    vae_config = {k: v for k, v in configs["vae"].items() if k != "scaling_factor" and not k.startswith("_")}
    vae_config["block_out_channels"] = [int(c) for c in channels]
    torch.manual_seed(seed)
    return AutoencoderKL.from_config(vae_config), dict(configs, vae=vae_config)


def pretrain_demo_base(recipe: PretrainRecipe):
    """Pretrain the demo base: VAE reconstruction, then text-to-image (text encoder frozen); from a random
    initialisation, or (``recipe.start_from``) from another demo base's weights, as the hard world's base
    continues from the easy one's: a base that already knows the classes learns hair and light on top."""
    torch.manual_seed(recipe.seed)
    if recipe.start_from:
        pipe = pipeline_from_artifact(recipe.start_from)
        tokenizer, configs = pipe.tokenizer, json.loads(artifact_metadata(recipe.start_from)["configs"])
    else:
        tokenizer = build_tokenizer()
        configs = component_configs(len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id)
        pipe = assemble_pipeline(build_components(configs, recipe.seed), tokenizer)
    if recipe.channels() and list(recipe.channels()) != list(configs["vae"]["block_out_channels"]):
        pipe.vae, configs = fresh_vae(configs, recipe.channels(), recipe.seed)
    pipe.text_encoder.requires_grad_(False)

    images_np, masks_np, labels = render_batch(recipe.per_class, seed=10_000 + recipe.seed, size=DEMO_RESOLUTION,
                                               difficulty=recipe.difficulty)
    images, masks = images_to_tensor(images_np), mask_to_image(masks_np)
    train_vae(pipe.vae, images, masks, recipe)
    latents = encode_latents(pipe.vae, images)
    pipe.vae.register_to_config(scaling_factor=float(1.0 / latents.std()))
    latents = latents * pipe.vae.config.scaling_factor

    rng = np.random.default_rng(recipe.seed)
    prompts = []
    for label in labels:  # a class word with a random site and patient, or the class alone
        code = CLASSES[label].code
        if rng.random() < 0.3:
            prompts.append(build_prompt(code))
        else:
            prompts.append(build_prompt(code, str(rng.choice(LOCALIZATIONS)), int(rng.integers(0, 18)) * 5,
                                        str(rng.choice(SEXES))))
    embeds = encode_prompts(tokenizer, pipe.text_encoder, prompts)
    uncond = encode_prompts(tokenizer, pipe.text_encoder, [""])[0]
    train_unet(pipe, latents, embeds, uncond, recipe)
    return pipe, configs
