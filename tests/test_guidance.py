"""Segmenter guidance (skindual/guidance.py, --segmenter-guidance): a ControlNet's image is nudged while it is
sampled towards one the QC segmenter reads as its mask; on the demo base, in this process."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from skindual.controlnet import ControlNetPipeline, controlnet_from_unet
from skindual.downstream import SmallUNet
from skindual.errors import UserError
from skindual.guidance import GUIDED_AT, SegmenterGuidance
from skindual.model import load_pipeline

torch.set_num_threads(1)


def discs(side: int, centres: list[float]) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return np.stack([(((yy - side / 2) ** 2 + (xx - c * side) ** 2) < (0.2 * side) ** 2).astype(np.uint8)
                     for c in centres])


@pytest.fixture(scope="module")
def pipeline():
    """The demo base with a ControlNet initialised from its UNet (its zero convolutions at zero: the base's own
    images), and a seeded random segmenter of the QC's architecture at 32²."""
    pipe = load_pipeline("demo")
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)
    controlnet = controlnet_from_unet(pipe.unet, pipe.vae_scale_factor).eval()
    torch.manual_seed(1)
    return ControlNetPipeline(pipe, controlnet, resolution=64), SmallUNet(8).eval()


def bce(segmenter, vae, latents: torch.Tensor, masks: np.ndarray) -> np.ndarray:
    """Each sample's loss the guidance lowers: the segmenter's BCE against its mask on the decoded image."""
    with torch.no_grad():
        image = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
        logits = F.interpolate(segmenter(F.interpolate(image, size=(32, 32), mode="bilinear", antialias=True)),
                               size=image.shape[-2:], mode="bilinear")
        target = torch.from_numpy(masks.astype(np.float32))[:, None]
        return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean((1, 2, 3)).numpy()


def test_refining_lowers_each_samples_loss_and_does_not_depend_on_the_batch(pipeline):
    cn, segmenter = pipeline
    masks = discs(64, [0.3, 0.5, 0.7])
    x0 = torch.randn((3, *cn.initial_noise([0]).shape[1:]), generator=torch.Generator().manual_seed(0))
    guide = SegmenterGuidance(segmenter, 32, steps=5, batch=3)
    refined = guide.refine(cn.vae, x0, masks)
    assert refined.shape == x0.shape and refined.dtype == x0.dtype and not torch.equal(refined, x0)
    assert np.all(bce(segmenter, cn.vae, refined, masks) < bce(segmenter, cn.vae, x0, masks))
    # a sample's refinement is its own: alone, or in micro-batches of 2 and 1, it ends where it did in the batch of 3
    alone = SegmenterGuidance(segmenter, 32, steps=5, batch=1).refine(cn.vae, x0[1:2], masks[1:2])
    torch.testing.assert_close(alone, refined[1:2], atol=1e-4, rtol=1e-4)
    split = SegmenterGuidance(segmenter, 32, steps=5, batch=2).refine(cn.vae, x0, masks)
    torch.testing.assert_close(split, refined, atol=1e-4, rtol=1e-4)
    assert not any(p.requires_grad for p in segmenter.parameters())  # frozen: only the latents move


def test_the_guided_steps_are_shares_of_the_loop_and_never_its_last(pipeline):
    guide = SegmenterGuidance(pipeline[1], 32, steps=1)
    assert GUIDED_AT == (0.5, 0.7) and guide.guided_steps(25) == {12, 18} and guide.guided_steps(10) == {5, 7}
    assert SegmenterGuidance(pipeline[1], 32, steps=1, at=(0.5, 0.99)).guided_steps(10) == {5}
    for bad in ({"steps": 0}, {"steps": 1, "lr": 0.0}, {"steps": 1, "at": (0.0,)}, {"steps": 1, "at": (1.0,)}):
        with pytest.raises(ValueError):
            SegmenterGuidance(pipeline[1], 32, **bad)


def test_a_guided_pipeline_draws_images_the_segmenter_reads_closer_to_their_masks(pipeline):
    cn, segmenter = pipeline
    masks, prompts, seeds = discs(64, [0.35, 0.65]), ["a dermoscopy image of a dermatofibroma"] * 2, [3, 4]
    plain = cn(prompts, seeds, steps=6, guidance=2.0, masks=masks)
    cn.guide = SegmenterGuidance(segmenter, 32, steps=4)
    try:
        guided = cn(prompts, seeds, steps=6, guidance=2.0, masks=masks)
        again = cn(prompts, seeds, steps=6, guidance=2.0, masks=masks)
        assert np.array_equal(guided.images, again.images)  # deterministic
        assert np.array_equal(guided.masks, masks) and not np.array_equal(guided.images, plain.images)
        assert np.all(bce(segmenter, cn.vae, guided.latents, masks) < bce(segmenter, cn.vae, plain.latents, masks))
        from skindual.dual_pipeline import make_scheduler

        ddim = cn.scheduler
        cn.scheduler = make_scheduler("euler", cn.pipe.scheduler.config)
        with pytest.raises(ValueError, match="segmenter guidance updates latents as DDIM does; the scheduler is Euler"):
            cn(prompts, seeds, steps=6, guidance=2.0, masks=masks)
        cn.scheduler = ddim
    finally:
        cn.guide = None
    assert np.array_equal(cn(prompts, seeds, steps=6, guidance=2.0, masks=masks).images, plain.images)


def test_the_flag_needs_a_controlnet_a_qc_segmenter_and_ddim_and_enters_the_fingerprint(demo_real, tmp_path):
    from skindual import generate
    from skindual.demo.world import DEMO_ADAPTER, DEMO_CONTROLNET_ADAPTER
    from skindual.generate_config import GenerateConfig

    masked = GenerateConfig(per_class="df=1", mask_source=str(demo_real), controlnet=str(DEMO_CONTROLNET_ADAPTER),
                            qc_segmenter=str(tmp_path / "qc"), output=str(tmp_path / "out"))
    hint = ("it nudges each image towards what the QC segmenter reads, on DDIM's steps; pass --qc-segmenter with "
            "--scheduler ddim, or leave it out$")
    for changes in ({"qc_segmenter": ""}, {"scheduler": "euler"}):
        with pytest.raises(UserError, match=f"^--segmenter-guidance 5: {hint}"):
            replace(masked, segmenter_guidance=5, **changes)
    joint = replace(masked, controlnet="", mask_source="", adapter=str(DEMO_ADAPTER), segmenter_guidance=5)
    with pytest.raises(UserError, match="^--segmenter-guidance 5: it steers a ControlNet; pass --controlnet, or leave it "
                                        "out$"):
        generate.resolve_model(joint)
    with pytest.raises(UserError, match="^--control-end 0.5 / --segmenter-guidance 5: they steer a ControlNet; pass "
                                        "--controlnet, or leave them out$"):
        generate.resolve_model(replace(joint, control_end=0.5))
    for off in (-1, 0):  # the default (-1: off outside the embedded default) and off are no ControlNet flags
        assert generate.resolve_model(replace(joint, segmenter_guidance=off, qc_segmenter="")).controlnet_sha256 is None
    with pytest.raises(UserError, match=r"^--segmenter-guidance -2: must be 0 \(off\) or more Adam steps \(or -1: "
                                        r"the embedded default's choice\)$"):
        replace(masked, segmenter_guidance=-2)
    spec = generate.resolve_model(replace(masked, qc_segmenter=""))
    plain = generate.fingerprint_config(masked, spec)
    assert "segmenter_guidance" not in plain  # off: a run made before the flag existed keeps its fingerprint
    assert generate.fingerprint_config(replace(masked, segmenter_guidance=0), spec) == plain
    assert generate.fingerprint_config(replace(masked, segmenter_guidance=5), spec) == plain | {"segmenter_guidance": 5}
