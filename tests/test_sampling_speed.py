"""skindual.sampling_speed: the masks' clean-up in torch (what a GPU runs) against scipy's, and generation's
``--compile`` levers against eager sampling on the demo."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from skindual import sampling_speed
from skindual.quality import largest_component

torch.set_num_threads(1)


def blobs(n: int, side: int, seed: int) -> np.ndarray:
    """N×side×side float32 logits with several smooth blobs and pixel noise: masks with many components, holes
    and ragged edges once thresholded."""
    rng = np.random.default_rng(seed)
    smooth = ndimage.gaussian_filter(rng.normal(size=(n, side, side)), (0, side / 20, side / 20)) * 10
    return (smooth + rng.normal(scale=0.3, size=(n, side, side))).astype(np.float32)


@pytest.mark.parametrize("n,side,sigma", [(6, 64, 3.0), (3, 48, 0.0), (2, 17, 30.0), (2, 96, 6.0)])
def test_torch_cleanup_gives_scipys_masks_exactly(n, side, sigma):
    """Smoothing (scipy's kernel and reflect edges, a radius beyond the image too), threshold, largest component and
    filled holes: the same masks, pixel for pixel, as the scipy path the CPU runs."""
    logits = blobs(n, side, seed=side)
    smoothed = sampling_speed.smooth_logits(torch.from_numpy(logits), sigma).numpy()
    assert np.array_equal(smoothed, sampling_speed.smooth_mask_logits(logits, sigma))
    expected = sampling_speed.finish_masks(torch.from_numpy(logits), sigma, where="scipy")
    assert expected.dtype == np.uint8 and (expected.any() or sigma > side)  # σ 30 on 17 px: the mean, below 0
    for largest in (True, False):
        got = sampling_speed.finish_masks(torch.from_numpy(logits), sigma, largest, where="torch")
        want = expected if largest else (sampling_speed.smooth_mask_logits(logits, sigma) > 0).astype(np.uint8)
        assert got.dtype == np.uint8 and np.array_equal(got, want)


def test_components_match_scipys_labels_ties_holes_and_empty_masks():
    rng = np.random.default_rng(0)
    masks = rng.random((24, 40, 40)) < np.linspace(0.3, 0.7, 24)[:, None, None]  # from specks to one web
    tie = np.zeros((40, 40), bool)
    tie[5:10, 20:25] = tie[20:25, 5:10] = True  # two equal squares: scipy keeps the first in raster order
    ring = np.zeros((40, 40), bool)
    ring[5:30, 5:30], ring[10:25, 10:25], ring[15, 15] = True, False, True  # a ring with a speck in its hole
    spiral = np.zeros((40, 40), bool)
    for k in range(0, 20, 4):  # a long winding component: union-find must still join it
        spiral[k, k:40 - k] = spiral[k:40 - k, 39 - k] = spiral[39 - k, k:40 - k] = True
        spiral[k + 2:40 - k, k] = True
    masks = np.concatenate([masks, [tie, ring, spiral, np.zeros((40, 40), bool), np.ones((40, 40), bool)]])
    labels = sampling_speed.component_labels(torch.from_numpy(masks)).numpy()
    first_pixel = np.arange(40 * 40).reshape(40, 40)
    for mask, got in zip(masks, labels):
        ref, count = ndimage.label(mask)
        firsts = ndimage.minimum(first_pixel, ref, np.arange(1, count + 1)) if count else []
        assert np.array_equal(got, np.where(ref > 0, np.concatenate([[1600], firsts]).astype(int)[ref], 1600))
    for fill in (True, False):
        got = sampling_speed.largest_components(torch.from_numpy(masks), fill).numpy()
        assert np.array_equal(got, np.stack([largest_component(m.astype(np.uint8), fill) for m in masks]).astype(bool))
    assert sampling_speed.largest_components(torch.zeros(0, 8, 8, dtype=torch.bool)).shape == (0, 8, 8)
    with pytest.raises(ValueError, match="clean-up 'gpu'"):
        sampling_speed.finish_masks(torch.zeros(1, 8, 8), 1.0, where="gpu")


def test_the_eager_levers_keep_the_samples_and_compile_enters_the_fingerprint_only_when_on():
    """Fused QKV projections and channels-last weights (``--compile`` without the compiler) on the demo adapter: the
    same masks, images within a grey level; ``--compile`` is in a run's fingerprint when on, absent when off, so runs
    without it keep the fingerprint they had."""
    from dataclasses import replace

    from skindual import generate, generate_model
    from skindual.demo.world import DEMO_ADAPTER
    from skindual.generate_config import GenerateConfig
    from skindual.dual_pipeline import DualPipeline

    prompts, seeds = ["a dermoscopy image of melanoma", "a dermoscopy image of vascular lesion"], [3, 4]
    eager = DualPipeline.from_pretrained("demo", DEMO_ADAPTER)(prompts, seeds, steps=3)
    fast = DualPipeline.from_pretrained("demo", DEMO_ADAPTER)
    sampling_speed.speed_up(fast.pipe, ("fuse_qkv", "channels_last"))
    assert not getattr(fast.unet, "peft_config", None)  # the fused LoRA stays in the weights, its wrappers gone
    levered = fast(prompts, seeds, steps=3)
    assert np.array_equal(levered.masks, eager.masks)
    assert np.abs(levered.images.astype(int) - eager.images).max() <= 1
    with pytest.raises(ValueError, match="unknown levers"):
        sampling_speed.speed_up(fast.pipe, ("cudagraphs",))

    cfg = GenerateConfig(per_class="df=1", adapter=str(DEMO_ADAPTER))
    spec = generate_model.resolve_model(cfg)
    eager_settings, compiled_settings = (generate.fingerprint_config(replace(cfg, compile=on), spec)
                                         for on in (False, True))
    assert "compile" not in eager_settings and compiled_settings == eager_settings | {"compile": True}


@pytest.mark.slow  # torch.compile of the demo UNet and VAE decoder (and ControlNet) takes minutes on a 2-core CPU
@pytest.mark.parametrize("drawn_by", ["joint", "controlnet"])
def test_compiled_sampling_gives_the_eager_pairs_and_shard_layout(demo_real, drawn_by, tmp_path):
    """``generate --compile`` through the real generator actor and shard writer (no Ray), on the demo adapter (image
    and mask sampled together) and on the demo ControlNet (images drawn for the real train masks: the base, its
    ControlNet and the VAE decoder compiled): the same samples in the same shard layout as eager sampling, each mask
    within Dice 0.99 of its eager twin (a given mask: the same), each image within two grey levels."""
    from dataclasses import replace

    import pyarrow as pa

    from skindual import generate, generate_actors
    from skindual.cluster import this_machine
    from skindual.demo.world import DEMO_ADAPTER, DEMO_CONTROLNET_ADAPTER
    from skindual.generate_config import GenerateConfig
    from skindual.mask_source import load_masks
    from skindual.quality import dice
    from skindual.shards import read_shards
    from skindual.storage import LocalStorage

    drawn = ({"adapter": str(DEMO_ADAPTER)} if drawn_by == "joint" else
             {"controlnet": str(DEMO_CONTROLNET_ADAPTER), "mask_source": str(demo_real)})
    cfg = GenerateConfig(per_class="mel=2,nv=2", **drawn, samples_per_shard=4, steps=4, batch_size=4,
                         min_mask_area=0.0, max_mask_area=1.0, min_main_share=0.0)  # no redraws: one batch size
    plan = generate.plan_generate(replace(cfg, output=str(tmp_path / "plan")))
    spec, prompts = plan.model, generate.generation_prompts(plan.config, plan.model, plan.masks)
    masks = (load_masks(plan.masks, prompts.column("source_key").to_pylist(), None) if plan.masks is not None
             else None)
    (item,) = generate_actors.shard_items(prompts, [0], masks)
    batch = pa.table({"shard": [0], "rows": [item["rows"]], "masks": [item["masks"]]})
    shards = {}
    for compiled in (False, True):
        actor = generate_actors.ShardGenerator(generate.resolve_devices(replace(plan.config, compile=compiled),
                                                                        this_machine()),
                                               spec)
        out = LocalStorage(tmp_path / str(compiled))
        generate_actors.write_shard_rows(actor(batch), out, generate.shard_run_info(cfg, spec, "fp"))
        shards[compiled] = {pair["key"]: pair for pair in read_shards(out.url)}
        members = sorted(p.name for p in (tmp_path / str(compiled)).iterdir())
        assert members == ["00000.parquet", "00000.tar", "00000_stats.json"]
    assert list(shards[True]) == list(shards[False]) and len(shards[False]) == 4
    for key, eager in shards[False].items():
        compiled = shards[True][key]
        assert [compiled["meta"][k] for k in ("seed", "attempts")] == [eager["meta"][k] for k in ("seed", "attempts")]
        assert dice(compiled["mask"], eager["mask"]) >= 0.99, key
        assert np.abs(compiled["image"].astype(int) - eager["image"]).mean() < 2
