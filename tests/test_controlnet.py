"""The ControlNet branch (skindual/controlnet.py, skindual/controlnet_trainer.py): trained beside the demo base's
frozen UNet on the demo world in this process, its adapter folder loaded by stock diffusers, resumed exactly."""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from skindual import model
from skindual.base_models import demo_base_path
from skindual.controlnet import (ControlNetPipeline, controlnet_misfit, load_controlnet, load_controlnet_info,
                                 mask_condition, save_controlnet)
from skindual.controlnet_trainer import ControlNetTrainer
from skindual.demo.world import DEMO_ADAPTER
from skindual.errors import UserError
from skindual.finetune import finetune_settings
from skindual.finetune_config import FinetuneConfig
from skindual.fingerprint import config_fingerprint
from skindual.joint_trainer import load_checkpoint, save_checkpoint
from skindual.storage import file_sha256

torch.set_num_threads(1)


def controlnet_config(real, **changes) -> FinetuneConfig:
    return FinetuneConfig(training_data=str(real), train="controlnet", steps=4, batch_size=4, lr=1e-3, warmup_steps=1,
                          ema_decay=0.9, **changes)


def batches(real, n: int = 4) -> list[dict]:
    """`n` training batches of 4 pairs of the demo world's train split at 64²."""
    from skindual.finetune import training_rows, training_selection
    from skindual.pairs import local_batches, read_index

    selection = training_selection(training_rows(read_index(str(real))), False, 0)
    return list(itertools.islice(local_batches(str(real), selection, 64, 4), n))


def disc_masks(side: int, centres: list[float]) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    return np.stack([(((yy - side / 2) ** 2 + (xx - c * side) ** 2) < (0.2 * side) ** 2).astype(np.uint8)
                     for c in centres])


@pytest.fixture(scope="module")
def trained(demo_real, tmp_path_factory):
    """A 2-step ControlNet on the demo base, then a checkpoint, then 2 more steps; its adapter folder (EMA weights)
    and the checkpoint taken half-way: (trainer, folder, checkpoint)."""
    root = tmp_path_factory.mktemp("controlnet")
    trainer = ControlNetTrainer(controlnet_config(demo_real), torch.device("cpu"))
    data = batches(demo_real)
    for batch in data[:2]:
        trainer.train_step(batch)
    (root / "checkpoint").mkdir()
    save_checkpoint(trainer, str(root / "checkpoint"))
    for batch in data[2:]:
        trainer.train_step(batch)
    with trainer.ema_weights():
        save_controlnet(root / "adapter", trainer.controlnet, "demo", {"steps": 4, "resolution": 64})
    return trainer, root / "adapter", root / "checkpoint"


def test_the_controlnet_starts_as_the_base_and_trains_the_image_term_beside_the_frozen_unet(demo_real):
    """Step 0 is the base model (the zero convolutions add nothing); a step moves the ControlNet only, on the image
    term, and the base UNet's weights stay the stock ones."""
    cfg = controlnet_config(demo_real)
    trainer = ControlNetTrainer(cfg, torch.device("cpu"))
    base = model.load_pipeline("demo").unet
    assert trainer.unet.config.in_channels == 4 and not getattr(trainer.unet, "peft_config", None)
    assert all(not p.requires_grad for p in trainer.unet.parameters())
    assert set(trainer.state()) == {k for k, _ in trainer.controlnet.named_parameters()}
    copied = {k: v for k, v in trainer.controlnet.state_dict().items() if k.startswith(("down_blocks", "mid_block"))}
    assert copied and all(torch.equal(v, base.state_dict()[k]) for k, v in copied.items())  # from_unet's copy
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([900, 50])
    emb = torch.randn(2, 77, base.config.cross_attention_dim, generator=g)
    control = mask_condition(disc_masks(64, [0.4, 0.6]))
    with torch.no_grad():
        down, mid = trainer.controlnet(x, t, emb, controlnet_cond=control, return_dict=False)
        with_residuals = trainer.unet(x, t, emb, down_block_additional_residuals=down,
                                      mid_block_additional_residual=mid).sample
        assert torch.equal(with_residuals, base(x, t, emb).sample)
    before = {k: v.clone() for k, v in trainer.state().items()}
    metrics = [trainer.train_step(b) for b in batches(demo_real, 2)]
    assert [m["step"] for m in metrics] == [1, 2] and all(m["img"] > 0 and m["total"] == m["img"] for m in metrics)
    assert set(metrics[0]) == {"total", "img", "step", "time", "skipped_steps"}
    after = trainer.state()
    assert not torch.equal(after["controlnet_mid_block.weight"], before["controlnet_mid_block.weight"])
    assert all(torch.equal(v, base.state_dict()[k]) for k, v in trainer.unet.state_dict().items())


def test_a_resumed_controlnet_ends_with_the_same_bytes(demo_real, trained, tmp_path):
    """Half-way checkpoint (`save_checkpoint`, as each Ray Train worker writes it) → a fresh trainer resumed from it
    (`load_checkpoint`) → the same 2 steps: the same weights, EMA and adapter bytes as the run nothing interrupted."""
    straight, folder, checkpoint = trained
    resumed = ControlNetTrainer(controlnet_config(demo_real), torch.device("cpu"))
    load_checkpoint(resumed, str(checkpoint))
    assert resumed.step == 2
    for batch in batches(demo_real)[2:]:
        resumed.train_step(batch)
    assert all(torch.equal(v, straight.state()[k]) for k, v in resumed.state().items())
    with resumed.ema_weights():
        save_controlnet(tmp_path / "adapter", resumed.controlnet, "demo", {"steps": 4, "resolution": 64})
    assert load_controlnet_info(tmp_path / "adapter").files == load_controlnet_info(folder).files


def test_the_validation_grid_draws_an_image_for_each_classs_real_val_mask(demo_real, trained, tmp_path):
    """`write_outputs` of a ControlNet run: its adapter folder, and a grid with a row per class: the image drawn for
    a real val pair's mask (its outline on it), then that real pair."""
    from skindual.finetune_worker import validation_masks, write_outputs

    trainer, _, _ = trained
    cfg = replace(controlnet_config(demo_real), output=str(tmp_path), name="cn", validation_per_class=1,
                  validation_steps=2)
    given = validation_masks(cfg, 64)
    assert sorted(given) == list(range(7)) and all(len(masks) == 1 for _, masks in given.values())
    write_outputs(cfg, trainer)
    assert load_controlnet_info(tmp_path / "cn" / "adapter").train == "controlnet"
    with Image.open(tmp_path / "cn" / "validation_grid.png") as grid:
        assert grid.size == (2 * 2 * (2 * 64 + 2), 2 * 7 * (64 + 2))  # 1 drawn + 1 real pair a row, scaled 2×
        cells = np.asarray(grid.convert("RGB"))[::2, ::2]
    for row, (images, _) in enumerate(given[c] for c in sorted(given)):
        y = row * 66
        assert np.array_equal(cells[y:y + 64, 130:194], images[0])  # the real pair the mask came from
        assert not np.array_equal(cells[y:y + 64, :64], images[0])  # the drawn image is another


def test_the_adapter_folder_is_a_diffusers_controlnet_that_stock_diffusers_loads(trained, tmp_path):
    """``controlnet/`` is `ControlNetModel.save_pretrained`'s; stock `StableDiffusionControlNetPipeline` on the demo
    base runs 2 steps on a mask image with it, and skindual's own loop gives the same latents."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    _, folder, _ = trained
    meta = json.loads((folder / model.ADAPTER_JSON).read_text())
    assert (meta["train"], meta["layout"], meta["base_model"]) == ("controlnet", None, "demo")
    assert sorted(meta["files"]) == ["controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors"]
    assert sorted(p.name for p in folder.iterdir()) == ["controlnet", model.ADAPTER_JSON]  # no temp leftovers
    assert all(file_sha256(folder / name) == digest for name, digest in meta["files"].items())
    controlnet = ControlNetModel.from_pretrained(folder / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(demo_base_path(), controlnet=controlnet,
                                                             safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    mask = disc_masks(64, [0.45])
    noise = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    stock = pipe("a dermoscopy image of melanoma", image=Image.fromarray(mask[0] * 255), num_inference_steps=2,
                 guidance_scale=3.0, latents=noise.clone(), output_type="latent").images
    ours = ControlNetPipeline(pipe, load_controlnet(load_controlnet_info(folder)), scheduler="ddim")
    ours.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    latents = ours.denoise(["a dermoscopy image of melanoma"], [3], mask, steps=2, guidance=3.0)
    torch.testing.assert_close(latents, stock, atol=1e-5, rtol=1e-5)
    out = ours(["a dermoscopy image of melanoma"], [3], steps=2, guidance=3.0, masks=mask)
    assert out.images.shape == (1, 64, 64, 3) and np.array_equal(out.masks, mask)
    # the control schedule is diffusers' own: its residuals scaled, and the last steps the stock base's alone
    stock = pipe("a dermoscopy image of melanoma", image=Image.fromarray(mask[0] * 255), num_inference_steps=4,
                 guidance_scale=3.0, latents=noise.clone(), output_type="latent", controlnet_conditioning_scale=0.5,
                 control_guidance_end=0.5).images
    ours.control_scale, ours.control_end = 0.5, 0.5
    latents = ours.denoise(["a dermoscopy image of melanoma"], [3], mask, steps=4, guidance=3.0)
    torch.testing.assert_close(latents, stock, atol=1e-5, rtol=1e-5)
    ours.control_end = 1.0
    assert not torch.allclose(ours.denoise(["a dermoscopy image of melanoma"], [3], mask, steps=4, guidance=3.0),
                              stock, atol=1e-4)


def test_a_folder_that_is_not_a_sound_controlnet_is_one_line(trained, tmp_path, sd2_bases):
    _, folder, _ = trained
    with pytest.raises(UserError, match=r"^--controlnet .*: an adapter of --train lora, not a ControlNet"):
        load_controlnet_info(DEMO_ADAPTER)
    crafted = tmp_path / "crafted"
    shutil.copytree(folder, crafted)
    meta = json.loads((crafted / model.ADAPTER_JSON).read_text())
    for name in ("controlnet/../../x.json", "other/config.json", "/etc/passwd"):
        bad = meta | {"files": meta["files"] | {name: "0" * 64}}
        (crafted / model.ADAPTER_JSON).write_text(json.dumps(bad))
        with pytest.raises(UserError, match="which is not a plain file name inside the adapter folder"):
            load_controlnet_info(crafted)
    (crafted / model.ADAPTER_JSON).write_text(json.dumps(meta))
    weights = crafted / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    with pytest.raises(UserError, match=r"diffusion_pytorch_model\.safetensors is corrupted"):
        load_controlnet_info(crafted)
    assert controlnet_misfit(load_controlnet_info(folder), "demo") is None
    assert controlnet_misfit(load_controlnet_info(folder), str(sd2_bases["base"])).startswith(
        "its block_out_channels is [32, 64], the base UNet's [40, 80, 160, 160]")


def test_controlnet_flags_that_do_not_apply_are_refused_and_unused_ones_not_fingerprinted(demo_real):
    for changes, line in [({"w_consistency": 1.0, "consistency_segmenter": "qc"}, "--w-consistency 1.0"),
                          ({"mask_condition_rate": 0.5}, "--mask-condition-rate 0.5"),
                          ({"w_prior": 1.0}, "--w-prior 1.0"),
                          ({"layout": "side-by-side"}, "--layout side-by-side"),
                          ({"lora_targets": "attention+resnet"}, "--lora-targets attention\\+resnet")]:
        with pytest.raises(UserError, match=rf"^{line}: --train controlnet trains the image for a given mask, on the "
                                            "image term only.*; leave --"):
            FinetuneConfig(train="controlnet", **changes)
    cfg = FinetuneConfig(training_data=str(demo_real), train="controlnet")
    same = config_fingerprint(finetune_settings(cfg, "data"))
    for unused in ({"w_mask": 0.0}, {"w_geo": 0.0}, {"lora_rank": 4}, {"geo_crop": 0}):
        assert config_fingerprint(finetune_settings(replace(cfg, **unused), "data")) == same
    for used in ({"w_img": 2.0}, {"snr_gamma": 5.0}, {"uncond_prob": 0.2}):
        assert config_fingerprint(finetune_settings(replace(cfg, **used), "data")) != same


def test_the_finetune_job_trains_a_controlnet_on_two_workers(demo_real, ray_cluster, tmp_path):
    """jobs/finetune.py --train controlnet on the shared local Ray cluster: two DDP workers, checkpoints with each
    rank's streams, the ControlNet's adapter folder, its validation grid (images drawn for real val masks) and the loss
    curve."""
    import job_runs as jobs

    args = ["--training-data", str(demo_real), "--output", str(tmp_path), "--name", "cn", "--train", "controlnet",
            "--steps", "3", "--checkpoint-every", "2", "--batch-size", "4", "--num-workers", "2",
            "--cpus-per-worker", "0.5", "--validation-per-class", "1", "--validation-steps", "2"]
    result = jobs.ok(jobs.run_job("finetune", args, ray_cluster))
    out = result.stdout + result.stderr
    assert "step 3/3" in out and "(img " in out and "mask " not in out.split("step 3/3")[1].splitlines()[0]
    info = load_controlnet_info(tmp_path / "cn" / "adapter")
    assert info.train == "controlnet" and info.base_model == "demo" and info.resolution == 64
    assert info.training_config["train"] == "controlnet" and len(info.prompt_attributes) == 7
    assert (tmp_path / "cn" / "loss_curve.png").is_file()
    # the grid: per class a row of 1 image drawn for a real val mask, then that real pair (2 × (64 + 64 + 2) wide)
    with Image.open(tmp_path / "cn" / "validation_grid.png") as grid:
        assert grid.size == (2 * 2 * (2 * 64 + 2), 2 * 7 * (64 + 2))
    checkpoints = sorted(p for p in (tmp_path / "cn").glob("checkpoint_*") if p.is_dir())
    assert {p.name for p in checkpoints[-1].iterdir()} >= {"trainable.safetensors", "ema.safetensors",
                                                           "rng-rank0.safetensors", "rng-rank1.safetensors"}
    again = jobs.ok(jobs.run_job("finetune", args, ray_cluster))
    assert "already done: step 3" in again.stdout


# --------------------------------------------------------------------------- generation: jobs/generate.py --controlnet


def shard_of(plan, masks=None):
    """The plan's shard 0 drawn by a `ShardGenerator` in this process and written by the stage-2 writer into a
    folder beside the plan's output: (the actor, the shard's pairs as read back, the shard's bytes)."""
    import pyarrow as pa

    from skindual import generate, generate_actors
    from skindual.cluster import this_machine
    from skindual.shards import read_shards
    from skindual.storage import LocalStorage

    table = generate.generation_prompts(plan.config, plan.model, plan.masks)
    (item,) = generate_actors.shard_items(table, [0], masks)
    actor = generate_actors.ShardGenerator(generate.resolve_devices(plan.config, this_machine()), plan.model)
    batch = pa.table({"shard": [0], "rows": [item["rows"]], "masks": [item["masks"]]})
    out = LocalStorage(Path(plan.config.output).parent / "written")
    generate_actors.write_shard_rows(actor(batch), out, generate.shard_run_info(plan.config, plan.model, "fp"))
    return actor, list(read_shards(out.url)), out.read_bytes("00000.tar")


def test_mask_mode_with_a_controlnet_draws_each_image_for_its_real_mask(demo_real, trained, tmp_path):
    """--mask-source with --controlnet: the shard's mask is the given (augmented real) mask exactly, its image the
    ControlNet's for that mask and the row's seed, the same bytes again; the ControlNet's sha256 is in the run's
    fingerprint and each pair's json, and a rerun with another ControlNet is refused naming the flag."""
    from skindual import generate
    from skindual.generate_config import GenerateConfig
    from skindual.mask_source import given_mask, load_masks
    from skindual.pairs import iter_shard
    from skindual.run_files import check_output
    from skindual.storage import LocalStorage

    trainer, folder, _ = trained
    info = load_controlnet_info(folder)
    cfg = GenerateConfig(per_class="df=2,nv=2", mask_source=str(demo_real), controlnet=str(folder), steps=2,
                         batch_size=4, samples_per_shard=4, image_format="png", output=str(tmp_path / "out"))
    plan = generate.plan_generate(cfg)
    assert (plan.model.controlnet_sha256, plan.model.adapter, plan.model.base_id.split("@")[0]) == (info.sha256, None,
                                                                                                   "demo")
    assert plan.settings["controlnet"] == f"sha256:{info.sha256}" and plan.settings["adapter"] == "none"
    table = generate.generation_prompts(plan.config, plan.model, plan.masks)
    masks = load_masks(plan.masks, table.column("source_key").to_pylist(), None)
    actor, pairs, tar = shard_of(plan, masks)
    assert isinstance(actor.pipe, ControlNetPipeline) and actor.pipe.masker is None
    assert (actor.pipe.control_scale, actor.pipe.control_end) == (0.7, 1.0)  # generation's default schedule
    assert shard_of(plan, masks)[2] == tar  # the same bytes again
    real = {}
    for shard in {int(k.split("/")[0]) for k in masks}:
        real |= {f"{shard:05d}/{x['__key__']}": x["seg.png"] for x in iter_shard(LocalStorage(demo_real), shard)}
    given = []
    for pair in pairs:
        meta = pair["meta"]
        assert meta["mode"] == "mask" and meta["controlnet_sha256"] == info.sha256 and meta["attempts"] == 1
        expected, _ = given_mask(real[meta["source_key"]], 64, meta["augmentation_seed"], cfg.limits())
        assert np.array_equal(pair["mask"], expected)
        given.append(expected)
    drawn = actor.pipe([p["meta"]["prompt"] for p in pairs], [p["meta"]["seed"] for p in pairs], steps=2,
                       guidance=cfg.guidance, masks=np.stack(given))
    assert all(np.array_equal(np.asarray(p["image"]), image) for p, image in zip(pairs, drawn.images))

    check_output(LocalStorage(cfg.output), plan.settings)  # the run.json a run writes as it starts
    save_controlnet(tmp_path / "other", trainer.controlnet, "demo", {"steps": 4, "resolution": 64})  # not the EMA
    with pytest.raises(UserError, match=rf"^{cfg.output} was written with --controlnet sha256:{info.sha256}, now "
                                        r"--controlnet sha256:\w+; pass --overwrite"):
        generate.plan_generate(replace(cfg, controlnet=str(tmp_path / "other")))


def test_a_controlnet_draws_the_image_for_the_mask_the_joint_model_sampled_first(trained, tmp_path):
    """--adapter JOINT --controlnet CN: each row's mask is the joint model's for its seed, its image the
    ControlNet's for that mask (not the joint model's image)."""
    from skindual import generate
    from skindual.generate_config import GenerateConfig

    _, folder, _ = trained
    cfg = GenerateConfig(per_class="mel=2,vasc=2", adapter=str(DEMO_ADAPTER), controlnet=str(folder), steps=2,
                         batch_size=4, samples_per_shard=4, image_format="png", max_mask_area=1.0, min_mask_area=0.0,
                         min_main_share=0.0, output=str(tmp_path / "out"))
    plan = generate.plan_generate(cfg)
    assert plan.settings["layout"] == "channels" and plan.settings["controlnet"].startswith("sha256:")
    actor, pairs, _ = shard_of(plan)
    assert actor.pipe.masker is not None and actor.pipe.adapter.sha256 == plan.model.adapter_sha256
    prompts, seeds = [p["meta"]["prompt"] for p in pairs], [p["meta"]["seed"] for p in pairs]
    joint = actor.pipe.masker(prompts, seeds, steps=2, guidance=cfg.guidance, mask_smoothing=cfg.mask_smoothing)
    drawn = actor.pipe.denoise(prompts, seeds, joint.masks, steps=2, guidance=cfg.guidance)
    assert len(pairs) == 4 and all(p["meta"]["mode"] == "joint" for p in pairs)
    assert all(np.array_equal(p["mask"], m) for p, m in zip(pairs, joint.masks))
    assert not any(np.array_equal(np.asarray(p["image"]), image) for p, image in zip(pairs, joint.images))
    again = actor.pipe(prompts, seeds, steps=2, guidance=cfg.guidance, mask_smoothing=cfg.mask_smoothing)
    assert torch.equal(again.latents, drawn.float().cpu())
    assert all(np.array_equal(np.asarray(p["image"]), image) for p, image in zip(pairs, again.images))
    # the VAE and text encoder are the masker's, held once; the stock UNet is its own, and draws what a
    # ControlNet pipeline of its own copy of the base draws
    cn, masker = actor.pipe, actor.pipe.masker
    assert cn.vae is masker.vae and cn.pipe.text_encoder is masker.pipe.text_encoder
    assert cn.unet is not masker.unet and cn.unet.config.in_channels == 4
    alone = ControlNetPipeline.from_pretrained("demo", folder, dtype=cn.dtype, control_scale=cfg.control_scale)
    assert torch.equal(alone.denoise(prompts, seeds, joint.masks, steps=2, guidance=cfg.guidance), drawn)


def test_generate_controlnet_errors_are_one_line(demo_real, trained, tmp_path, sd2_bases):
    from skindual import generate
    from skindual.generate_config import GenerateConfig

    _, folder, _ = trained
    masked = GenerateConfig(per_class="df=1", mask_source=str(demo_real), controlnet=str(folder),
                            output=str(tmp_path / "out"))
    with pytest.raises(UserError, match="^--adapter: with --controlnet and --mask-source the ControlNet draws"):
        replace(masked, adapter=str(DEMO_ADAPTER))
    with pytest.raises(UserError, match="^--controlnet draws each image for a given mask: pass --mask-source"):
        generate.plan_generate(replace(masked, mask_source=""))
    with pytest.raises(UserError, match=r"^--control-scale 0.7 / --control-end 0.0: the scale must not be negative "
                                        r"and the end must be a share of the steps in \(0, 1\]$"):
        replace(masked, control_end=0.0)
    with pytest.raises(UserError, match="^--control-scale 0.5: it steers a ControlNet; pass --controlnet, or leave it "
                                        "out$"):
        generate.plan_generate(replace(masked, controlnet="", mask_source="", control_scale=0.5,
                                       adapter=str(DEMO_ADAPTER)))
    spec = generate.resolve_model(masked)
    plain = generate.fingerprint_config(masked, spec)
    assert plain["control_scale"] == 0.7 and "control_end" not in plain  # the default scale; the end as before
    assert generate.fingerprint_config(replace(masked, control_end=0.8), spec) == plain | {"control_end": 0.8}
    # at the values skindual sampled with before the schedule existed, a run keeps the fingerprint it had then
    before = generate.fingerprint_config(replace(masked, control_scale=1.0), spec)
    assert before == {k: v for k, v in plain.items() if k != "control_scale"}
    with pytest.raises(UserError, match=r"^--controlnet .*demo_adapter: an adapter of --train lora, not a ControlNet"):
        generate.plan_generate(replace(masked, controlnet=str(DEMO_ADAPTER)))
    with pytest.raises(UserError, match=r"^--controlnet .* was trained beside demo@\w+, this run samples with "
                                        r"demo-hard@\w+; give a ControlNet trained on that base$"):
        generate.plan_generate(replace(masked, base_model="demo-hard"))
    with pytest.raises(UserError, match=r"^--controlnet .* was trained on demo and does not fit the base model .*: its "
                                        r"block_out_channels is \[32, 64\], the base UNet's \[40, 80, 160, 160\]"):
        generate.plan_generate(replace(masked, base_model=str(sd2_bases["base"])))
    assert not (tmp_path / "out").exists()


def test_the_generate_job_draws_with_a_controlnet_and_refuses_a_joint_adapter_as_one(demo_real, trained, ray_cluster,
                                                                                     tmp_path):
    """jobs/generate.py --mask-source --controlnet on the shared local Ray cluster (no demo adapter filled in), and a
    joint adapter given as --controlnet: one line, before Ray starts."""
    import job_runs as jobs
    from skindual.shards import read_shards

    _, folder, _ = trained
    out = tmp_path / "out"
    args = ["--per-class", "df=2,nv=1", "--mask-source", str(demo_real), "--controlnet", str(folder), "--steps", "2",
            "--batch-size", "2", "--output", str(out)]
    drawn, refused = jobs.run_jobs([("generate", args), ("generate", [*args[:-1], str(tmp_path / "other"),
                                                                      "--controlnet", str(DEMO_ADAPTER)])], ray_cluster)
    jobs.ok(drawn)
    manifest = json.loads((out / "manifest.json").read_text())
    info = load_controlnet_info(folder)
    assert manifest["complete"] and manifest["resolved"]["controlnet"] == f"sha256:{info.sha256}"
    assert manifest["resolved"]["adapter"] == "none" and manifest["resolved"]["controlnet_url"] == str(folder)
    pairs = list(read_shards(str(out)))
    assert len(pairs) == 3 and all(p["meta"]["controlnet_sha256"] == info.sha256 for p in pairs)
    line = jobs.error_line(refused)  # the joint adapter as --controlnet, run beside it
    assert line == (f"error: --controlnet {DEMO_ADAPTER}: an adapter of --train lora, not a ControlNet; give the "
                    "adapter folder of a fine-tune run with --train controlnet")


def test_a_controlnet_on_s3_is_fetched_with_its_subfolder_and_verified(demo_real, trained, s3_env, tmp_path):
    """--controlnet s3://...: the json, then the files it names (``controlnet/...`` included) into the actor's
    folder, every sha256 checked; a crafted name outside the folder is refused before anything else is fetched."""
    from skindual import generate_model
    from skindual.generate_config import GenerateConfig
    from skindual.storage import open_storage

    _, folder, _ = trained
    info = load_controlnet_info(folder)
    remote = open_storage(f"{s3_env}/cn")
    for name in [*info.files, model.ADAPTER_JSON]:
        remote.upload_file(folder / name, name)
    cfg = GenerateConfig(per_class="df=1", mask_source=str(demo_real), controlnet=remote.url, steps=2)
    spec = generate_model.resolve_model(cfg)
    assert (spec.controlnet, spec.controlnet_sha256) == (remote.url, info.sha256)
    pipe = generate_model.load_generator(spec, replace(cfg, dtype="fp32"), str(tmp_path / "actor"))
    assert isinstance(pipe, ControlNetPipeline) and pipe.info.sha256 == info.sha256
    assert sorted(p.name for p in (tmp_path / "actor" / "controlnet-adapter" / "controlnet").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    crafted = open_storage(f"{s3_env}/crafted")
    meta = json.loads((folder / model.ADAPTER_JSON).read_text())
    meta["files"]["controlnet/../../cn/controlnet/config.json"] = meta["files"]["controlnet/config.json"]
    crafted.write_bytes(model.ADAPTER_JSON, json.dumps(meta).encode())
    with pytest.raises(UserError, match=r"^--controlnet s3://.*crafted/skindual_adapter\.json names the file "
                                        r"'controlnet/\.\./\.\./cn/controlnet/config\.json', which is not a plain"):
        generate_model.resolve_model(replace(cfg, controlnet=crafted.url))
