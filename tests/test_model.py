"""The joint image–mask model (skindual/model.py) and its sampling (skindual/dual_pipeline.py) on a tiny, randomly
initialised SD-2-shaped pipeline."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from skindual import model, sampling_speed
from skindual.base_models import ARTIFACT, artifact_metadata, artifact_tokenizer, assemble_pipeline, build_components
from skindual.demo.world import DEMO_ADAPTER
from skindual.errors import UserError
from skindual.dual_pipeline import DualPipeline
from skindual.model import (load_adapter, load_pipeline, pack_latents, prepare_unet, save_adapter,
                            unpack_latents)
from skindual.quality import largest_component
from skindual.storage import file_sha256

torch.set_num_threads(1)

PROMPTS = ["a dermoscopy image of melanoma", "a dermoscopy image of melanocytic nevus", ""]
STEPS = 2


def tiny_pipeline(seed: int = 0):
    """The demo base's architecture (its artifact's configs and tokenizer) with random weights."""
    configs = json.loads(artifact_metadata(ARTIFACT)["configs"])
    pipe = assemble_pipeline(build_components(configs, seed), artifact_tokenizer())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random base pipeline saved as a `from_pretrained` folder (the stand-in for an SD-2 id)."""
    path = tmp_path_factory.mktemp("base")
    tiny_pipeline().save_pretrained(path, safe_serialization=True)
    return path


def base(base_dir):
    pipe = load_pipeline(base_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def perturb(unet, seed: int = 1) -> None:
    """Make the trainable weights non-trivial (LoRA B starts at zero, mask inputs at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def unet_inputs(latent_channels: int = 4, width: int = 16):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(2, latent_channels, 16, width, generator=g), torch.tensor([999, 10]),
            torch.randn(2, 77, 64, generator=g))


def test_pack_unpack_roundtrip():
    img, mask = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    assert pack_latents(img, mask, "channels").shape == (2, 8, 3, 3)
    assert pack_latents(img, mask, "side-by-side").shape == (2, 4, 3, 6)
    for layout in model.LAYOUTS:
        back = unpack_latents(pack_latents(img, mask, layout), layout)
        assert torch.equal(back[0], img) and torch.equal(back[1], mask)
    with pytest.raises(UserError, match="layout"):
        pack_latents(img, mask, "stacked")


def test_trainable_parameters_lora_vs_full(base_dir):
    unet = base(base_dir).unet
    params = prepare_unet(unet, "channels", lora_rank=4)
    names = {id(p): n for n, p in unet.named_parameters()}
    trainable = {names[id(p)] for p in params}
    assert len(trainable) == len(params)
    assert {"conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"} <= trainable
    rest = trainable - {"conv_in.weight", "conv_in.bias", "conv_out.weight", "conv_out.bias"}
    assert rest and all("lora_" in n for n in rest)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in rest} == {"to_q", "to_k", "to_v", "0"}

    stock = base(base_dir).unet
    params = prepare_unet(stock, "side-by-side", lora_rank=4)
    assert stock.config.in_channels == 4
    assert all("lora_" in n for n, p in stock.named_parameters() if p.requires_grad)
    assert len(params) == len(rest)

    full = base(base_dir).unet
    params = prepare_unet(full, "channels", train="full")
    assert len(params) == len(list(full.parameters()))
    assert not any("lora_" in n for n, _ in full.named_parameters())

    with pytest.raises(UserError, match="unknown LoRA targets 'everything'"):
        prepare_unet(base(base_dir).unet, "channels", lora_targets="everything")


def adapted_modules(unet) -> dict[str, int]:
    """How many modules of each kind (the `model.LORA_TARGETS` entry its name ends with) carry a LoRA."""
    from collections import Counter

    from peft.tuners.tuners_utils import BaseTunerLayer

    kinds = model.LORA_TARGETS["attention+resnet"]
    return dict(Counter(next(k for k in kinds if n.endswith("." + k)) for n, m in unet.named_modules()
                        if isinstance(m, BaseTunerLayer)))


def test_lora_on_the_resnet_blocks_and_feed_forwards_of_sd2s_unet():
    """SD-2's UNet (its structure at 1/16 width): ``attention`` adapts its 128 attention projections;
    ``attention+resnet`` also the 22 ResNet blocks' two convolutions and time-embedding projection, the 14 1×1
    shortcut convolutions where a block changes width, and the 16 transformer blocks' two feed-forward layers;
    step 0 is the base either way (every LoRA B starts at zero)."""
    from diffusers import UNet2DConditionModel

    from skindual.sd2 import sd2_configs

    torch.manual_seed(0)
    attention = {"to_q": 32, "to_k": 32, "to_v": 32, "to_out.0": 32}
    for targets, expected in (("attention", attention),
                              ("attention+resnet", attention | {"conv1": 22, "conv2": 22, "conv_shortcut": 14,
                                                                "time_emb_proj": 22, "ff.net.0.proj": 16,
                                                                "ff.net.2": 16})):
        unet = UNet2DConditionModel(**sd2_configs("base", 16)["unet"])
        g = torch.Generator().manual_seed(1)
        x, emb = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 77, 1024, generator=g)
        with torch.no_grad():
            before = unet(x, torch.tensor([500]), emb).sample
        params = prepare_unet(unet, "side-by-side", lora_rank=4, lora_targets=targets)
        assert adapted_modules(unet) == expected
        assert len(params) == 2 * sum(expected.values())  # each module's lora_A and lora_B, nothing else
        with torch.no_grad():
            assert torch.equal(unet(x, torch.tensor([500]), emb).sample, before)


@pytest.fixture(scope="module")
def dual(base_dir):
    """Adapted pipelines of both layouts with perturbed (non-trivial) trainable weights."""
    out = {}
    for layout in model.LAYOUTS:
        pipe = base(base_dir)
        prepare_unet(pipe.unet, layout, lora_rank=4, lora_alpha=8)
        perturb(pipe.unet)
        out[layout] = DualPipeline(pipe, layout)
    return out


@pytest.mark.parametrize("layout", model.LAYOUTS)
def test_sampling_shapes_determinism_and_batch_independence(dual, layout):
    pipe = dual[layout]
    assert pipe.resolution == 64 and pipe.layout == layout
    batch = pipe(PROMPTS, seeds=[11, 22, 33], steps=STEPS, guidance=3.0)
    assert batch.images.shape == (3, 64, 64, 3) and batch.images.dtype == np.uint8
    assert batch.masks.shape == (3, 64, 64) and batch.masks.dtype == np.uint8
    assert set(np.unique(batch.masks)) <= {0, 1}
    alone = pipe(PROMPTS[1:2], seeds=[22], steps=STEPS, guidance=3.0)
    torch.testing.assert_close(alone.latents[0], batch.latents[1], atol=1e-4, rtol=1e-4)
    assert np.abs(alone.images[0].astype(int) - batch.images[1]).max() <= 1
    again = pipe(PROMPTS[1:2], seeds=[22], steps=STEPS, guidance=3.0)
    assert torch.equal(again.latents, alone.latents)
    other = pipe(PROMPTS[1:2], seeds=[23], steps=STEPS, guidance=3.0)
    assert not torch.allclose(other.latents, alone.latents)


def test_other_schedulers_and_no_guidance(dual):
    pipe = dual["channels"]
    for name in ("dpm", "euler"):
        sample = DualPipeline(pipe.pipe, "channels", scheduler=name)(PROMPTS[:1], [1], steps=STEPS, guidance=1.0)
        assert sample.images.shape == (1, 64, 64, 3) and np.isfinite(sample.latents).all()
    with pytest.raises(UserError, match="scheduler"):
        DualPipeline(pipe.pipe, "channels", scheduler="plms")


def disc_masks(side: int, centres: list[float]) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return np.stack([(((yy - side / 2) ** 2 + (xx - c * side) ** 2) < (0.18 * side) ** 2).astype(np.uint8)
                     for c in centres])


@pytest.mark.parametrize("layout", model.LAYOUTS)
@pytest.mark.parametrize("scheduler", ["ddim", "dpm", "euler"])
def test_mask_conditioned_sampling_holds_the_given_masks(dual, layout, scheduler):
    pipe = DualPipeline(dual[layout].pipe, layout, scheduler=scheduler)
    given = disc_masks(64, [0.3, 0.7])
    out = pipe(PROMPTS[:2], [5, 6], steps=3, guidance=3.0, masks=given)
    assert np.array_equal(out.masks, given) and out.masks.dtype == np.uint8
    # the mask half of the final latents is the given masks' encoding; the image half was sampled for it
    torch.testing.assert_close(unpack_latents(out.latents, layout)[1], pipe.encode_masks(given).float())
    again = pipe(PROMPTS[:2], [5, 6], steps=3, guidance=3.0, masks=given)
    assert np.array_equal(again.images, out.images)
    swapped = pipe(PROMPTS[:2], [5, 6], steps=3, guidance=3.0, masks=given[::-1].copy())
    assert not np.array_equal(swapped.images, out.images)
    with pytest.raises(ValueError, match="given masks are"):
        pipe(PROMPTS[:1], [5], steps=1, masks=given[:1, :32, :32])


@pytest.mark.parametrize("layout", model.LAYOUTS)
def test_encode_pair_and_geometry_loss_through_the_frozen_vae(base_dir, layout):
    from skindual.losses import joint_loss

    pipe = base(base_dir)
    pipe.vae.requires_grad_(False)
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    masks = torch.zeros(2, 64, 64)
    masks[:, 16:48, 16:48] = 1
    with torch.no_grad():
        x0 = model.encode_pair(pipe.vae, images, masks, layout)
    assert x0.shape == ((2, 8, 16, 16) if layout == "channels" else (2, 4, 16, 32))
    noise = torch.randn_like(x0)
    pred = torch.randn_like(x0).requires_grad_(True)
    sched = pipe.scheduler
    out = joint_loss(pred, x0, noise, torch.tensor([50, 500]), sched.alphas_cumprod, sched.config.prediction_type,
                     layout, masks, model.vae_decoder(pipe.vae), w_img=0.0, w_mask=0.0, w_geo=1.0)
    out["total"].backward()
    assert out["geo"] > 0 and pred.grad.abs().sum() > 0
    assert all(p.grad is None for p in pipe.vae.parameters())


def test_mask_smoothing_removes_a_ragged_edge_and_keeps_the_shape():
    from skindual.mask_stats import mask_statistics

    yy, xx = np.mgrid[:64, :64]
    angle, radius = np.arctan2(yy - 32, xx - 32), np.hypot(yy - 32, xx - 32)
    logits = np.stack([16 + 3 * np.sin(16 * angle) - radius,  # a disk of radius 16 with 16 spikes of ±3 px
                       np.full((64, 64), -1.0)]).astype(np.float32)  # and an empty one beside it
    raw, smooth = (largest_component(m > 0) for m in (logits[0], sampling_speed.smooth_mask_logits(logits, 3.0)[0]))
    before, after = mask_statistics(raw)["compactness"], mask_statistics(smooth)["compactness"]
    assert before < 0.5 and after > 0.95
    assert abs(int(smooth.sum()) - np.pi * 16**2) < 0.05 * np.pi * 16**2  # the disk under the spikes
    assert sampling_speed.smooth_mask_logits(logits, 3.0)[1].max() < 0  # each image alone: nothing spills over
    assert sampling_speed.smooth_mask_logits(logits, 0) is logits


def test_sampling_applies_the_smoothing_in_latent_cells(dual):
    pipe = dual["channels"]
    raw = pipe(PROMPTS[:2], seeds=[3, 4], steps=STEPS, mask_smoothing=0)
    smooth = pipe(PROMPTS[:2], seeds=[3, 4], steps=STEPS, mask_smoothing=0.75)
    assert torch.equal(raw.latents, smooth.latents) and np.array_equal(raw.images, smooth.images)
    _, logits = pipe.decode(raw.latents)
    sigma = 0.75 * pipe.pipe.vae_scale_factor
    expected = [largest_component(m > 0) for m in sampling_speed.smooth_mask_logits(logits.numpy(), sigma)]
    assert np.array_equal(smooth.masks, np.stack(expected))
    assert np.array_equal(raw.masks, np.stack([largest_component(m > 0) for m in logits.numpy()]))
    pipe.mask_cleanup = "torch"  # the clean-up a GPU runs, here on the CPU: the same masks
    try:
        on_device = [pipe(PROMPTS[:2], seeds=[3, 4], steps=STEPS, mask_smoothing=s).masks for s in (0, 0.75)]
    finally:
        pipe.mask_cleanup = "auto"
    assert np.array_equal(on_device[0], raw.masks) and np.array_equal(on_device[1], smooth.masks)


def test_mask_cleanup_keeps_largest_component_and_fills_holes():
    m = np.zeros((9, 9), np.uint8)
    m[1:6, 1:6] = 1
    m[3, 3] = 0  # a hole
    m[8, 8] = 1  # a speck
    cleaned = largest_component(m)
    assert cleaned[3, 3] == 1 and cleaned[8, 8] == 0 and cleaned.sum() == 25
    assert largest_component(np.zeros((4, 4), np.uint8)).sum() == 0


@pytest.mark.parametrize("layout,train,targets", [("channels", "lora", "attention"), ("side-by-side", "lora", "attention"),
                                                  ("channels", "lora", "attention+resnet"),
                                                  ("channels", "full", "attention")])
def test_saved_adapter_reproduces_the_adapted_model(base_dir, tmp_path, layout, train, targets):
    pipe = base(base_dir)
    prepare_unet(pipe.unet, layout, lora_rank=4, lora_alpha=2, train=train, lora_targets=targets)
    perturb(pipe.unet, seed=7)
    adapted = DualPipeline(pipe, layout)
    expected = adapted(PROMPTS[:2], seeds=[5, 6], steps=STEPS)
    info = save_adapter(tmp_path / "adapter", pipe.unet, layout, base_dir, {"steps": 3, "lr": 1e-4},
                        train=train, resolution=adapted.resolution)
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    expected_files = {"skindual_adapter.json"} | (
        {"skindual_unet.safetensors"} if train == "full" else
        {"pytorch_lora_weights.safetensors"} | ({"skindual_convs.safetensors"} if layout == "channels" else set()))
    assert files == expected_files  # nothing pickled, no temp leftovers
    meta = json.loads((tmp_path / "adapter" / "skindual_adapter.json").read_text())
    assert meta["layout"] == layout and meta["train"] == train and meta["resolution"] == 64
    assert [c["code"] for c in meta["classes"]] == ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    assert set(meta["files"]) == expected_files - {"skindual_adapter.json"}
    assert info.lora_rank == (4 if train == "lora" else None) and len(info.sha256) == 64
    assert info.lora_targets == (targets if train == "lora" else None)
    if train == "lora":
        assert meta["lora"]["targets"] == targets and meta["lora"]["target_modules"] == model.LORA_TARGETS[targets]

    bare = DualPipeline.from_pretrained(base_dir, layout=layout)(PROMPTS[:2], seeds=[5, 6], steps=STEPS)
    assert not torch.allclose(bare.latents, expected.latents, atol=1e-3)  # the adapter matters
    for fuse in (True, False) if train == "lora" else (True,):
        loaded = DualPipeline.from_pretrained(base_dir, tmp_path / "adapter", fuse=fuse)
        assert loaded.layout == layout and loaded.adapter.sha256 == info.sha256
        got = loaded(PROMPTS[:2], seeds=[5, 6], steps=STEPS)
        torch.testing.assert_close(got.latents, expected.latents, atol=1e-5, rtol=1e-5)
        assert np.abs(got.images.astype(int) - expected.images).max() <= 1


def test_corrupted_or_missing_adapter_file_is_refused(base_dir, tmp_path):
    pipe = base(base_dir)
    prepare_unet(pipe.unet, "channels", lora_rank=4)
    folder = tmp_path / "adapter"
    save_adapter(folder, pipe.unet, "channels", base_dir, {})
    convs = folder / "skindual_convs.safetensors"
    data = bytearray(convs.read_bytes())
    data[-1] ^= 0xFF
    convs.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"skindual_convs\.safetensors.*corrupted.*re-download"):
        DualPipeline.from_pretrained(base_dir, folder)
    (folder / "pytorch_lora_weights.safetensors").unlink()
    with pytest.raises(UserError, match=r"pytorch_lora_weights\.safetensors is missing"):
        load_adapter(folder)
    with pytest.raises(UserError, match="skindual_adapter.json is missing"):
        load_adapter(tmp_path)


def crafted_adapter(tmp_path, **changes):
    """A copy of the shipped demo adapter whose json has `changes`."""
    folder = tmp_path / "adapter"
    shutil.copytree(DEMO_ADAPTER, folder)
    meta = json.loads((folder / model.ADAPTER_JSON).read_text()) | changes
    (folder / model.ADAPTER_JSON).write_text(json.dumps(meta))
    return folder


@pytest.mark.parametrize("outside", ["climbing", "absolute"])
def test_an_adapter_names_only_files_inside_its_folder(tmp_path, outside):
    """A crafted json naming a file outside the folder (with that file's true sha256) is refused, not read."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not the adapter's")
    name = str(secret) if outside == "absolute" else "../secret.txt"
    files = json.loads((DEMO_ADAPTER / model.ADAPTER_JSON).read_text())["files"] | {name: file_sha256(secret)}
    with pytest.raises(UserError, match=rf"names the file '{re.escape(name)}', which is not a plain file name inside "
                                        "the adapter folder; re-download"):
        load_adapter(crafted_adapter(tmp_path, files=files))


@pytest.mark.parametrize("targets", list(model.LORA_TARGETS))
def test_side_by_side_lora_loads_into_a_stock_pipeline(base_dir, tmp_path, targets):
    """diffusers' `load_lora_weights` loads every adapted module of the LoRA file, the convolutions too (their
    keys are written in diffusers' ``lora.down``/``lora.up`` form like the attention projections')."""
    from safetensors import safe_open

    pipe = base(base_dir)
    prepare_unet(pipe.unet, "side-by-side", lora_rank=4, lora_alpha=8, lora_targets=targets)
    perturb(pipe.unet, seed=3)
    save_adapter(tmp_path / "adapter", pipe.unet, "side-by-side", base_dir, {})
    with safe_open(str(tmp_path / "adapter" / model.LORA_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.endswith((".lora.down.weight", ".lora.up.weight")) for k in keys)
    stock = load_pipeline(base_dir)
    x, t, emb = unet_inputs(width=32)
    with torch.no_grad():
        before = stock.unet(x, t, emb).sample
        stock.load_lora_weights(tmp_path / "adapter")
        after = stock.unet(x, t, emb).sample
        adapted = pipe.unet(x, t, emb).sample
    assert not torch.allclose(before, after, atol=1e-4)
    torch.testing.assert_close(after, adapted, atol=1e-5, rtol=1e-5)
    assert adapted_modules(stock.unet) == adapted_modules(pipe.unet)


SAVE_IN_A_FRESH_PROCESS = """
import sys, torch
from skindual.model import load_pipeline, prepare_unet, save_adapter
torch.manual_seed(0)
pipe = load_pipeline(sys.argv[1])
prepare_unet(pipe.unet, "channels", lora_rank=4)
print(save_adapter(sys.argv[2], pipe.unet, "channels", sys.argv[1], {"steps": 1}).sha256)
"""


@pytest.mark.slow
def test_adapter_bytes_do_not_depend_on_the_process_hash_seed(base_dir, tmp_path):
    """Same weights, two processes with other string-hash seeds: the same files and sha256 (a rerun of
    a finished fine-tune must not look like a new adapter to the generate job's resume check)."""
    import os
    import subprocess
    import sys

    from concurrent.futures import ThreadPoolExecutor

    def save(seed: str) -> str:
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", SAVE_IN_A_FRESH_PROCESS, str(base_dir), str(tmp_path / seed)],
                             env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()[-1]

    with ThreadPoolExecutor(2) as pool:  # the two processes side by side
        shas = list(pool.map(save, ("1", "2")))
    assert shas[0] == shas[1]
    for name in ("pytorch_lora_weights.safetensors", "skindual_convs.safetensors"):
        assert (tmp_path / "1" / name).read_bytes() == (tmp_path / "2" / name).read_bytes()


def test_placing_the_models_in_a_dtype_does_not_warn(base_dir):
    """diffusers' own `.to(dtype)` warns about fp32 modules even when a model has none; `model.place` does not,
    and casts like it.  (The records are caught on diffusers' own logger, at its warning level: the jobs quiet
    it, and a test before this one may have.)"""
    import logging

    from diffusers.utils import logging as diffusers_logging

    class Records(logging.Handler):
        def __init__(self):
            super().__init__(logging.WARNING)
            self.messages = []

        def emit(self, record):
            self.messages.append(record.getMessage())

    pipe, records = base(base_dir), Records()
    library, level = diffusers_logging.get_logger("diffusers"), diffusers_logging.get_verbosity()
    library.addHandler(records)
    diffusers_logging.set_verbosity_warning()
    try:
        pipe.unet.to("cpu", torch.bfloat16)
        assert any("should be kept in float32" in m for m in records.messages)  # what each fine-tune worker printed
        records.messages.clear()
        for part in (pipe.unet, pipe.vae, pipe.text_encoder):
            assert model.place(part, "cpu", torch.float16) is part
            assert {p.dtype for p in part.parameters()} == {torch.float16}
        assert records.messages == []
    finally:
        library.removeHandler(records)
        diffusers_logging.set_verbosity(level)
