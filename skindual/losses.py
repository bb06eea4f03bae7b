"""The multi-objective loss of the joint image–mask model (pure tensor maths).

``total = w_img·L(image latents) + w_mask·L(mask latents) + w_geo·(Dice + BCE) + w_prior·L(prior)
+ w_consistency·(Dice + BCE)``, where the two denoising terms are MSE against the target the scheduler's
``prediction_type`` asks for (optionally min-SNR-γ weighted per sample), the geometry term decodes the
model's predicted x0 of the mask latents and compares it with the true binary mask, and the consistency
reward (ControlNet++'s) decodes the predicted x0 of the IMAGE latents of the samples at low noise and
scores a frozen segmenter's output on it against the true mask, so that the image learns to follow the
mask (docs/architecture.md, "The joint image–mask model").  ``ᾱ`` below is the scheduler's ``alphas_cumprod`` at each sample's timestep.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from skindual.model import unpack_latents

PREDICTION_TYPES = ("epsilon", "v_prediction")
MASK_SHARPNESS = 4.0  # k in sigmoid(k · mean decoded channel): a decoded mask is about ±1


def _check(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; expected one of {PREDICTION_TYPES}")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (N,) tensor shaped to broadcast against `like` (N, ...)."""
    return values.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def alpha_bar(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """ᾱ_t of each sample, shape (N,)."""
    return alphas_cumprod.to(timesteps.device)[timesteps].float()


def noisy(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε (what the scheduler's `add_noise` computes)."""
    a = _per_sample(abar, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(ᾱ)·ε − sqrt(1−ᾱ)·x0."""
    a = _per_sample(abar, x0)
    return a.sqrt() * noise - (1 - a).sqrt() * x0


def target(x0: torch.Tensor, noise: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """What the model is trained to predict: ε for ``epsilon``, v for ``v_prediction``."""
    _check(prediction_type)
    return noise if prediction_type == "epsilon" else velocity(x0, noise, abar)


def predicted_x0(model_pred: torch.Tensor, x_t: torch.Tensor, abar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x0 recovered from a model output: ε: (x_t − sqrt(1−ᾱ)ε̂)/sqrt(ᾱ); v: sqrt(ᾱ)x_t − sqrt(1−ᾱ)v̂."""
    _check(prediction_type)
    a = _per_sample(abar, x_t)
    if prediction_type == "epsilon":
        return (x_t - (1 - a).sqrt() * model_pred) / a.sqrt()
    return a.sqrt() * x_t - (1 - a).sqrt() * model_pred


def snr(abar: torch.Tensor) -> torch.Tensor:
    return abar / (1 - abar)


def min_snr_weights(abar: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights per sample: min(snr, γ)/snr (ε) or min(snr, γ)/(snr + 1) (v)."""
    _check(prediction_type)
    s = snr(abar)
    clipped = torch.minimum(s, torch.full_like(s, gamma))
    return clipped / s if prediction_type == "epsilon" else clipped / (s + 1)


def soft_dice_loss(prob: torch.Tensor, truth: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − (2Σpm + eps)/(Σp + Σm + eps) per sample (N×H×W), averaged over the batch."""
    p, m = prob.flatten(1), truth.flatten(1).to(prob.dtype)
    dice = (2 * (p * m).sum(1) + eps) / (p.sum(1) + m.sum(1) + eps)
    return (1 - dice).mean()


def mask_geometry_loss(decoded: torch.Tensor, truth: torch.Tensor, k: float = MASK_SHARPNESS) -> torch.Tensor:
    """Soft Dice + BCE of a decoded mask image (N×3×H×W in [-1, 1]) against a binary mask (N×H×W).

    The mask probability is sigmoid(k · mean over the 3 channels); BCE is taken on the logits.
    """
    logits = k * decoded.float().mean(1)
    truth = truth.to(logits.dtype)
    return soft_dice_loss(torch.sigmoid(logits), truth) + F.binary_cross_entropy_with_logits(logits, truth)


def segmentation_loss(logits: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Soft Dice + BCE of a segmenter's logits (N×1×h×w or N×h×w) against a mask (N×H×W, 0/1), the mask
    area-averaged to the logits' size when they are smaller (a soft target)."""
    logits = logits.float().reshape(len(logits), *logits.shape[-2:])
    truth = truth.float()
    if truth.shape[-2:] != logits.shape[-2:]:
        truth = F.interpolate(truth[:, None], size=logits.shape[-2:], mode="area")[:, 0]
    return soft_dice_loss(torch.sigmoid(logits), truth) + F.binary_cross_entropy_with_logits(logits, truth)


def crop_pairs(mask_latents: torch.Tensor, true_masks: torch.Tensor, offsets: torch.Tensor,
               size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sample, the `size`×`size` latent window at `offsets` (N×2: top, left, in latent cells) of
    N×C×h×w mask latents, and the matching window of the N×H×W true masks (H/h pixels a cell)."""
    scale = true_masks.shape[-2] // mask_latents.shape[-2]
    latents = torch.stack([m[:, t:t + size, x:x + size] for m, (t, x) in zip(mask_latents, offsets.tolist())])
    masks = torch.stack([m[t * scale:(t + size) * scale, x * scale:(x + size) * scale]
                         for m, (t, x) in zip(true_masks, offsets.tolist())])
    return latents, masks


def _mse(pred: torch.Tensor, tgt: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    per_sample = F.mse_loss(pred.float(), tgt.float(), reduction="none").flatten(1).mean(1)
    return (per_sample * weights).mean() if weights is not None else per_sample.mean()


def image_loss(model_pred: torch.Tensor, latents_x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor, prediction_type: str, snr_gamma: float | None = None) -> torch.Tensor:
    """The denoising term of image latents alone (a ControlNet's loss): MSE against the target of
    `prediction_type`, min-SNR-γ weighted per sample with `snr_gamma`; `joint_loss`'s ``img`` term."""
    abar = alpha_bar(alphas_cumprod, timesteps)
    weights = min_snr_weights(abar, snr_gamma, prediction_type) if snr_gamma else None
    return _mse(model_pred, target(latents_x0, noise, abar, prediction_type), weights)


def joint_loss(
    model_pred: torch.Tensor,
    latents_x0: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction_type: str,
    layout: str,
    true_masks: torch.Tensor | None = None,
    decode_mask: Callable[[torch.Tensor], torch.Tensor] | None = None,
    w_img: float = 1.0,
    w_mask: float = 1.0,
    w_geo: float = 0.1,
    snr_gamma: float | None = None,
    noisy_latents: torch.Tensor | None = None,
    mask_sharpness: float = MASK_SHARPNESS,
    prior_pred: torch.Tensor | None = None,
    w_prior: float = 0.0,
    geo_crop: int = 0,
    geo_offsets: torch.Tensor | None = None,
    segment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    w_consistency: float = 0.0,
    consistency_max_t: int = 200,
    conditioned: torch.Tensor | None = None,
    prior_min_t: int = 0,
) -> dict[str, torch.Tensor]:
    """The loss of one batch of joint latents, each term returned separately for logging.

    `model_pred`, `latents_x0` (the clean, scaled joint latents) and `noise` share the packed
    shape of `layout`; `noisy_latents` defaults to sqrt(ᾱ)·x0 + sqrt(1−ᾱ)·ε (the scheduler's
    `add_noise`).  The geometry term needs `true_masks` (N×H×W, 0/1) and `decode_mask` (scaled
    latents → decoded N×3×H×W image, e.g. `skindual.model.vae_decoder(vae)`); it is skipped —
    0, nothing decoded — when ``w_geo == 0``.  With `geo_crop` > 0 it decodes only a `geo_crop`×`geo_crop`
    window of each predicted mask latent, at `geo_offsets` (N×2 latent cells, `crop_pairs`), and
    compares it with the same window of the true mask: the decoder's memory and compute shrink with
    the window's area (a window as large as the latent is the whole mask).
    The consistency reward (``w_consistency`` != 0) needs `segment` (a frozen segmenter: decoded N×3×H×W
    images in [-1, 1] → lesion logits): for the samples with timestep ≤ `consistency_max_t` it decodes the
    predicted x0 of their image latents (the same window as the geometry term's, through the same
    `decode_mask`) and takes `segmentation_loss` of the segmenter's logits against the true mask's window,
    averaged over those samples (0 when the batch has none).
    `conditioned` (N bools) marks the samples whose mask half was given clean (mask-conditioned training): only
    their image term counts; the mask, geometry and prior terms average over the other samples (0 when none).
    The prior term counts only the samples with timestep ≥ `prior_min_t` (0: all), averaged over them (0 when
    none); `prior_pred` holds a row for every sample, those of the others unread.
    Returns ``total``, ``img``, ``mask``, ``geo``, ``prior``, ``consistency``, ``low_t`` (how many samples
    the consistency reward scored) and ``high_t`` (how many the prior term counted).
    """
    abar = alpha_bar(alphas_cumprod, timesteps)
    tgt = target(latents_x0, noise, abar, prediction_type)
    weights = min_snr_weights(abar, snr_gamma, prediction_type) if snr_gamma else None
    pred_img, pred_mask = unpack_latents(model_pred, layout)
    tgt_img, tgt_mask = unpack_latents(tgt, layout)
    img = _mse(pred_img, tgt_img, weights)
    joint = torch.ones(len(model_pred), dtype=torch.bool, device=model_pred.device) if conditioned is None else ~conditioned
    mask = _mse(pred_mask[joint], tgt_mask[joint], None if weights is None else weights[joint]) if joint.any() \
        else model_pred.new_zeros((), dtype=torch.float32)
    x_t = noisy_latents if noisy_latents is not None else noisy(latents_x0, noise, abar)
    x_t_img, x_t_mask = unpack_latents(x_t, layout)
    cropping = bool(geo_crop) and geo_crop < min(x_t_mask.shape[-2:])
    if (w_geo or w_consistency) and cropping and geo_offsets is None:
        raise ValueError("a decoded window (geo_crop > 0) needs geo_offsets")
    if w_geo and joint.any():
        if true_masks is None or decode_mask is None:
            raise ValueError("the geometry term (w_geo != 0) needs true_masks and decode_mask")
        x0_mask, truth = predicted_x0(pred_mask[joint], x_t_mask[joint], abar[joint], prediction_type), true_masks[joint]
        if cropping:
            x0_mask, truth = crop_pairs(x0_mask, truth, geo_offsets[joint.to(geo_offsets.device)], geo_crop)
        geo = mask_geometry_loss(decode_mask(x0_mask), truth, mask_sharpness)
    else:
        geo = model_pred.new_zeros((), dtype=torch.float32)
    consistency = model_pred.new_zeros((), dtype=torch.float32)
    low = timesteps <= consistency_max_t
    if w_consistency:
        if true_masks is None or decode_mask is None or segment is None:
            raise ValueError("the consistency reward (w_consistency != 0) needs true_masks, decode_mask and segment")
        if low.any():
            x0_img = predicted_x0(pred_img[low], x_t_img[low], abar[low], prediction_type)
            truth = true_masks[low]
            if cropping:
                x0_img, truth = crop_pairs(x0_img, truth, geo_offsets[low.to(geo_offsets.device)], geo_crop)
            consistency = segmentation_loss(segment(decode_mask(x0_img).float().clamp(-1, 1)), truth)
    pinned = joint & (timesteps >= prior_min_t)  # the samples the prior term counts
    if w_prior and pinned.any():
        if prior_pred is None:
            raise ValueError("the prior-preservation term (w_prior != 0) needs prior_pred")
        prior = _mse(pred_img[pinned], prior_pred[pinned], None if weights is None else weights[pinned])
    else:
        prior = model_pred.new_zeros((), dtype=torch.float32)
    total = w_img * img + w_mask * mask + w_geo * geo + w_prior * prior + w_consistency * consistency
    return {"total": total, "img": img, "mask": mask, "geo": geo, "prior": prior, "consistency": consistency,
            "low_t": low.sum().float() if w_consistency else model_pred.new_zeros((), dtype=torch.float32),
            "high_t": pinned.sum().float() if w_prior else model_pred.new_zeros((), dtype=torch.float32)}
