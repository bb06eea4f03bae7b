"""The loss maths on small tensors against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from skindual import losses

torch.set_num_threads(1)

ABAR = 0.64  # sqrt(ᾱ) = 0.8, sqrt(1 − ᾱ) = 0.6, snr = 0.64 / 0.36 = 16/9


def one(value: float) -> torch.Tensor:
    return torch.tensor([[value]])  # N=1, one element


def test_velocity_and_target_by_hand():
    x0, eps, abar = one(2.0), one(1.0), torch.tensor([ABAR])
    v = losses.velocity(x0, eps, abar)
    assert v.item() == pytest.approx(0.8 * 1.0 - 0.6 * 2.0)  # -0.4
    assert losses.target(x0, eps, abar, "epsilon").item() == 1.0
    assert losses.target(x0, eps, abar, "v_prediction").item() == pytest.approx(-0.4)
    assert losses.noisy(x0, eps, abar).item() == pytest.approx(0.8 * 2 + 0.6 * 1)  # 2.2


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_recovers_x0_from_the_exact_target(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 2, 2, generator=g), torch.randn(3, 4, 2, 2, generator=g)
    abar = torch.tensor([0.9, 0.5, 0.05])
    x_t = losses.noisy(x0, eps, abar)
    exact = losses.target(x0, eps, abar, prediction_type)
    torch.testing.assert_close(losses.predicted_x0(exact, x_t, abar, prediction_type), x0, atol=1e-5, rtol=1e-5)


def test_predicted_x0_by_hand():
    x_t, abar = one(2.2), torch.tensor([ABAR])
    assert losses.predicted_x0(one(1.0), x_t, abar, "epsilon").item() == pytest.approx((2.2 - 0.6) / 0.8)  # 2.0
    assert losses.predicted_x0(one(-0.4), x_t, abar, "v_prediction").item() == pytest.approx(0.8 * 2.2 + 0.6 * 0.4)


def test_matches_the_scheduler():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    t = torch.tensor([10, 900])
    abar = losses.alpha_bar(sched.alphas_cumprod, t)
    torch.testing.assert_close(losses.noisy(x0, eps, abar), sched.add_noise(x0, eps, t))
    torch.testing.assert_close(losses.velocity(x0, eps, abar), sched.get_velocity(x0, eps, t))


def test_min_snr_weights_by_hand():
    s = 16 / 9  # snr at ᾱ = 0.64
    abar = torch.tensor([ABAR, ABAR])
    eps_w = losses.min_snr_weights(abar, 5.0, "epsilon")
    torch.testing.assert_close(eps_w, torch.tensor([1.0, 1.0]))  # snr < γ: unweighted
    assert losses.min_snr_weights(abar, 1.0, "epsilon")[0].item() == pytest.approx(1.0 / s)
    assert losses.min_snr_weights(abar, 5.0, "v_prediction")[0].item() == pytest.approx(s / (s + 1))
    assert losses.min_snr_weights(abar, 1.0, "v_prediction")[0].item() == pytest.approx(1.0 / (s + 1))


def test_soft_dice_by_hand():
    truth = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]])
    assert losses.soft_dice_loss(truth, truth, eps=0.0).item() == pytest.approx(0.0)
    assert losses.soft_dice_loss(1 - truth, truth, eps=0.0).item() == pytest.approx(1.0)
    half = torch.full((1, 2, 2), 0.5)  # Σpm = 1, Σp = 2, Σm = 2: dice = 2/4
    assert losses.soft_dice_loss(half, truth, eps=0.0).item() == pytest.approx(0.5)
    assert losses.soft_dice_loss(half, truth, eps=1.0).item() == pytest.approx(1 - 3 / 5)


def test_mask_geometry_loss_by_hand():
    truth = torch.tensor([[[1.0, 0.0]]])  # 1×1×2
    decoded = torch.tensor([[1.0, -1.0], [1.0, -1.0], [1.0, -1.0]])[None, :, None, :]  # 1×3×1×2, ±1
    p = 1 / (1 + math.exp(-4.0))  # sigmoid(4)
    dice = 1 - (2 * p + 1) / (p + (1 - p) + 1 + 1)
    bce = -math.log(p)  # both pixels are right with probability p
    assert losses.mask_geometry_loss(decoded, truth).item() == pytest.approx(dice + bce, rel=1e-5)


def _batch(layout: str, n: int = 2):
    g = torch.Generator().manual_seed(3)
    shape = (n, 8, 4, 4) if layout == "channels" else (n, 4, 4, 8)
    return (torch.randn(shape, generator=g), torch.randn(shape, generator=g), torch.randn(shape, generator=g),
            torch.tensor([100, 700][:n]), torch.linspace(0.999, 0.01, 1000))


def _decode(latents):  # a stand-in decoder: 4 latent channels → 3 image channels, 2× upsampled
    return torch.tanh(F.interpolate(latents[:, :3], scale_factor=2))


@pytest.mark.parametrize("layout", ["channels", "side-by-side"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_terms_are_separate_and_total_is_the_weighted_sum(layout, prediction_type):
    pred, x0, eps, t, ac = _batch(layout)
    masks = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    out = losses.joint_loss(pred, x0, eps, t, ac, prediction_type, layout, masks, _decode,
                            w_img=0.7, w_mask=1.3, w_geo=0.2)
    assert set(out) == {"total", "img", "mask", "geo", "prior", "consistency", "low_t", "high_t"}
    assert out["consistency"] == 0  # off unless w_consistency
    assert out["prior"] == 0  # off unless w_prior
    abar = ac[t]
    tgt = losses.target(x0, eps, abar, prediction_type)
    dim = 1 if layout == "channels" else 3
    img_ref = F.mse_loss(pred.narrow(dim, 0, 4), tgt.narrow(dim, 0, 4))
    mask_ref = F.mse_loss(pred.narrow(dim, 4, 4), tgt.narrow(dim, 4, 4))
    torch.testing.assert_close(out["img"], img_ref)
    torch.testing.assert_close(out["mask"], mask_ref)
    x_t = losses.noisy(x0, eps, abar).narrow(dim, 4, 4)
    x0_hat = losses.predicted_x0(pred.narrow(dim, 4, 4), x_t, abar, prediction_type)
    torch.testing.assert_close(out["geo"], losses.mask_geometry_loss(_decode(x0_hat), masks))
    torch.testing.assert_close(out["total"], 0.7 * out["img"] + 1.3 * out["mask"] + 0.2 * out["geo"])


def test_noisy_latents_given_or_derived_agree():
    pred, x0, eps, t, ac = _batch("channels")
    masks = torch.ones(2, 8, 8)
    derived = losses.joint_loss(pred, x0, eps, t, ac, "v_prediction", "channels", masks, _decode)
    given = losses.joint_loss(pred, x0, eps, t, ac, "v_prediction", "channels", masks, _decode,
                              noisy_latents=losses.noisy(x0, eps, ac[t]))
    torch.testing.assert_close(derived["geo"], given["geo"])


def test_min_snr_weighting_is_per_sample():
    pred, x0, eps, t, ac = _batch("channels")
    out = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", w_geo=0.0, snr_gamma=1.0)
    w = losses.min_snr_weights(ac[t], 1.0, "epsilon")
    per = (pred[:, :4] - eps[:, :4]).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(out["img"], (per * w).mean())


def test_geo_is_skipped_when_its_weight_is_zero():
    pred, x0, eps, t, ac = _batch("channels")

    def never(_):
        raise AssertionError("decode_mask called with w_geo=0")

    out = losses.joint_loss(pred, x0, eps, t, ac, "v_prediction", "channels", None, never, w_geo=0.0)
    assert out["geo"].item() == 0.0
    torch.testing.assert_close(out["total"], out["img"] + out["mask"])
    with pytest.raises(ValueError, match="geometry"):
        losses.joint_loss(pred, x0, eps, t, ac, "v_prediction", "channels", None, None, w_geo=0.1)


def test_gradients_reach_the_model_prediction_through_every_term():
    pred, x0, eps, t, ac = _batch("channels")
    masks = torch.ones(2, 8, 8)
    for term in ("img", "mask", "geo"):
        p = pred.clone().requires_grad_(True)
        out = losses.joint_loss(p, x0, eps, t, ac, "v_prediction", "channels", masks, _decode)
        out[term].backward()
        channels = slice(0, 4) if term == "img" else slice(4, 8)
        assert p.grad[:, channels].abs().sum() > 0
        other = slice(4, 8) if term == "img" else slice(0, 4)
        assert p.grad[:, other].abs().sum() == 0


def test_unknown_prediction_type_is_refused():
    with pytest.raises(ValueError, match="sample"):
        losses.target(one(1.0), one(1.0), torch.tensor([0.5]), "sample")


def test_prior_preservation_term_by_hand():
    pred, x0, eps, t, ac = _batch("channels")
    teacher = torch.zeros(2, 4, 4, 4)
    teacher[:, 0] = 1.0  # the frozen base predicted 1 in channel 0, 0 elsewhere
    out = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", w_geo=0, prior_pred=teacher, w_prior=2.0)
    by_hand = ((pred[:, :4] - teacher) ** 2).mean()  # the image half only: the mask half has no prior
    torch.testing.assert_close(out["prior"], by_hand)
    torch.testing.assert_close(out["total"], out["img"] + out["mask"] + 2.0 * by_hand)
    with pytest.raises(ValueError, match="prior_pred"):
        losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", w_geo=0, w_prior=1.0)


def test_the_prior_counts_only_the_samples_at_high_noise():
    """With ``prior_min_t`` the prior term is the mean over the samples whose timestep reaches it (t = 100 and
    700 here): the low-noise sample's image is free of the base; no such sample, no term."""
    pred, x0, eps, t, ac = _batch("channels")
    teacher = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(6))
    everywhere = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", w_geo=0, prior_pred=teacher, w_prior=1.0)
    torch.testing.assert_close(everywhere["prior"], F.mse_loss(pred[:, :4], teacher))
    assert everywhere["high_t"] == 2
    high = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", w_geo=0, prior_pred=teacher, w_prior=1.0,
                             prior_min_t=500)
    torch.testing.assert_close(high["prior"], F.mse_loss(pred[1:, :4], teacher[1:]))
    torch.testing.assert_close(high["total"], high["img"] + high["mask"] + high["prior"])
    assert high["high_t"] == 1 and high["img"] == everywhere["img"]
    none = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", w_geo=0, prior_pred=teacher, w_prior=1.0,
                             prior_min_t=800)
    assert none["prior"] == 0 and none["high_t"] == 0


@pytest.mark.parametrize("layout", ["channels", "side-by-side"])
def test_the_consistency_reward_scores_the_low_noise_samples_decoded_images(layout):
    """Only the samples at t <= consistency_max_t count; their predicted x0 IMAGE latents are decoded, segmented
    by the frozen segmenter and scored against the true masks; the gradient reaches the image prediction of
    those samples only (none reaches the mask half, nor the high-noise sample)."""
    pred, x0, eps, t, ac = _batch(layout)  # t = 100 (low) and 700 (high)
    pred.requires_grad_(True)
    masks = (torch.rand(2, 8, 8, generator=torch.Generator().manual_seed(4)) > 0.5).float()
    seen = []

    def segment(images):  # a frozen stand-in segmenter: lesion logits from the image's mean channel
        seen.append(images.shape)
        return 3 * images.mean(1, keepdim=True)

    out = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", layout, masks, _decode, w_img=0, w_mask=0, w_geo=0,
                            segment=segment, w_consistency=0.5, consistency_max_t=200)
    assert seen == [(1, 3, 8, 8)] and out["low_t"] == 1
    dim = 1 if layout == "channels" else 3
    x_t_img = losses.noisy(x0, eps, ac[t]).narrow(dim, 0, 4)
    x0_img = losses.predicted_x0(pred.narrow(dim, 0, 4), x_t_img, ac[t], "epsilon")[:1]
    expected = losses.segmentation_loss(segment(_decode(x0_img).clamp(-1, 1)), masks[:1])
    torch.testing.assert_close(out["consistency"], expected)
    torch.testing.assert_close(out["total"], 0.5 * expected)
    out["total"].backward()
    grad_img, grad_mask = pred.grad.narrow(dim, 0, 4), pred.grad.narrow(dim, 4, 4)
    assert grad_img[0].abs().sum() > 0 and grad_img[1].abs().sum() == 0 and grad_mask.abs().sum() == 0
    # no low-noise sample in the batch: the reward is 0 and nothing is decoded
    seen.clear()
    none = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", layout, masks, _decode, w_geo=0, segment=segment,
                             w_consistency=0.5, consistency_max_t=50)
    assert none["consistency"] == 0 and none["low_t"] == 0 and seen == []
    with pytest.raises(ValueError, match="needs true_masks, decode_mask and segment"):
        losses.joint_loss(pred, x0, eps, t, ac, "epsilon", layout, masks, _decode, w_geo=0, w_consistency=0.5)


def test_segmentation_loss_takes_the_mask_to_the_logits_size():
    logits = torch.zeros(1, 1, 2, 2)
    mask = torch.zeros(1, 4, 4)
    mask[0, :2, :2] = 1  # area-averaged: [[1, 0], [0, 0]]
    soft = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    expected = losses.soft_dice_loss(torch.full((1, 2, 2), 0.5), soft) + F.binary_cross_entropy_with_logits(
        torch.zeros(1, 2, 2), soft)
    torch.testing.assert_close(losses.segmentation_loss(logits, mask), expected)


def test_mask_conditioned_samples_count_only_their_image_term():
    """A sample trained with its mask half given clean has no mask target to learn: the mask, geometry and prior
    terms average over the other samples, the image term over all."""
    pred, x0, eps, t, ac = _batch("channels")
    masks = torch.ones(2, 8, 8)
    prior = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    decoded = []

    def decode(latents):
        decoded.append(len(latents))
        return _decode(latents)

    both = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", masks, decode, prior_pred=prior, w_prior=1.0)
    decoded.clear()
    out = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", masks, decode, prior_pred=prior, w_prior=1.0,
                            conditioned=torch.tensor([True, False]))
    torch.testing.assert_close(out["img"], both["img"])
    torch.testing.assert_close(out["mask"], F.mse_loss(pred[1:, 4:], eps[1:, 4:]))
    torch.testing.assert_close(out["prior"], F.mse_loss(pred[1:, :4], prior[1:]))
    assert decoded == [1]  # the geometry term decodes the joint sample only
    none = losses.joint_loss(pred, x0, eps, t, ac, "epsilon", "channels", masks, decode, prior_pred=prior, w_prior=1.0,
                             conditioned=torch.tensor([True, True]))
    assert none["mask"] == 0 and none["geo"] == 0 and none["prior"] == 0 and none["img"] == both["img"]
