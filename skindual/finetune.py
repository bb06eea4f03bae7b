"""Fine-tuning the joint image–mask model with Ray Train (docs/architecture.md, "The joint image–mask model").

`run_finetune(config)` builds a Ray Data dataset from the training table, runs a
`TorchTrainer` of `num_workers` DDP workers (gloo on CPU, NCCL on GPUs) over
`train_loop`, checkpoints every `checkpoint_every` optimiser steps to
`RunConfig(storage_path=output, name=name)` -- a local folder or s3:// -- and
writes the adapter folder, a validation grid and a loss curve beside the
checkpoints.  Re-running with the same output and name resumes from the last
checkpoint (Ray Train restores its checkpoint manager from storage) and ends at
the same final step.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa
import torch

from skindual import data, losses, model, pairs, prompts, report
from skindual.base_models import resolve_base_model
from skindual.cli import check_fields, option
from skindual.errors import UserError
from skindual.quality import images_to_tensor
from skindual.shards import MANIFEST_FILE
from skindual.storage import is_remote, open_storage

log = logging.getLogger(__name__)

CHECKPOINT_STATE = "trainable.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_PROGRESS = "progress.json"
CHECKPOINT_EMA = "ema.safetensors"


@dataclass
class FinetuneConfig:
    training_data: str = option("", "the prepared real dataset (jobs/prepare.py): a folder or s3:// prefix; its "
                                    "train split is trained on; empty (jobs/finetune.py): the demo world's")
    real_fraction: float = option(1.0, "train on a seeded share of each class of the train split (at least one "
                                       "pair a class): below 1, the low-data regime")
    base_model: str = option("demo", "SD-2 id or folder (e.g. stabilityai/stable-diffusion-2-base); demo: the demo base")
    output: str = option("skindual-runs", "Ray Train storage_path: a folder or s3://bucket/prefix")
    name: str = option("finetune", "run name under --output; re-running the same name resumes it")
    layout: str = option("channels", "joint latent layout", choices=list(model.LAYOUTS))
    train: str = option("lora", "what is trained: LoRA (+ widened convs) or the full UNet", choices=list(model.TRAIN_MODES))
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    steps: int = option(300, "optimiser steps")
    batch_size: int = option(8, "samples per worker per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float = option(1e-4, "learning rate (AdamW), after a linear warm-up")
    lr_schedule: str = option("cosine", "learning rate after the warm-up", choices=["constant", "cosine"])
    warmup_steps: int = option(20, "learning-rate warm-up steps")
    ema_decay: float = option(0.995, "EMA of the trained weights, which the adapter holds (0: off, the last weights)")
    mixed_precision: str = option("no", "compute dtype: autocast, and the frozen weights kept in it (bf16 on CPU or "
                                        "GPU; fp16 on GPU only, with a gradient scaler); trained weights stay fp32",
                                  choices=["no", "fp16", "bf16"])
    gradient_checkpointing: bool = option(False, "recompute the UNet's activations in the backward pass: less "
                                                 "memory per sample, about a third more compute")
    num_workers: int = option(1, "Ray Train workers (one GPU each with --use-gpu)")
    cpus_per_worker: float = option(1.0, "CPUs reserved per training worker (leave some for data loading)")
    use_gpu: bool = option(False, "train on GPUs (NCCL); otherwise CPU workers (gloo)")
    checkpoint_every: int = option(50, "checkpoint every this many optimiser steps")
    max_failures: int = option(0, "worker-group failures Ray Train retries from the last checkpoint")
    w_img: float = option(1.0, "weight of the image-latent denoising term")
    w_mask: float = option(1.0, "weight of the mask-latent denoising term")
    w_geo: float = option(0.1, "weight of the mask-geometry term (Dice+BCE on the decoded predicted mask)")
    geo_crop: int = option(32, "the geometry term decodes a window of this many latent cells a side of each predicted "
                               "mask, at a random place (32: 256 px of SD-2's 512²; 0 or the latent size: all of it)")
    w_prior: float = option(0.0, "weight of the prior-preservation term: the image prediction vs the frozen base model's")
    snr_gamma: float = option(0.0, "min-SNR-gamma weighting (0: off; 5 is usual)")
    uncond_prob: float = option(0.1, "share of prompts dropped to '' for classifier-free guidance")
    balance: bool = option(True, "oversample rare classes to even out the class counts the model sees")
    resolution: int = option(0, "training resolution (0: the base model's)")
    seed: int = option(0, "seed of noise, timesteps, shuffling and validation samples")
    validation_per_class: int = option(2, "validation-grid samples per class")
    validation_steps: int = option(25, "sampling steps for the validation grid")
    validation_batch: int = option(4, "prompts sampled (and pairs decoded) at once for the validation grid")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every", "lora_rank",
                            "validation_batch"))
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise UserError("--mixed-precision fp16 needs GPUs (--use-gpu): CPUs compute fp16 without a gradient "
                            "scaler's guard; use bf16 on CPU")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if self.geo_crop < 0 or self.resolution < 0:
            raise UserError(f"--geo-crop {self.geo_crop} / --resolution {self.resolution}: must be 0 or more")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay {self.ema_decay}: must be in [0, 1) (0 turns the EMA off)")
        if not 0 <= self.uncond_prob < 1:
            raise UserError(f"--uncond-prob {self.uncond_prob}: must be in [0, 1)")


# --------------------------------------------------------------------------- data


def training_rows(index: pa.Table, real_fraction: float = 1.0, seed: int = 0) -> pa.Table:
    """The index rows fine-tuning learns from: the usable, classed pairs of the train split (a seeded
    `real_fraction` of each class)."""
    if "split" not in index.column_names:
        raise UserError("--training-data holds no train split: give the real dataset jobs/prepare.py wrote")
    rows = data.classed_rows(pairs.usable_rows(index), "train")
    if rows.num_rows == 0:
        raise UserError("--training-data has no classed pairs in its train split; check the prepare job's manifest")
    return data.fraction_per_class(rows, real_fraction, seed)


def training_selection(rows: pa.Table, balance: bool, seed: int) -> dict[int, dict[str, int]]:
    """shard → {key: how often an epoch shows it}: each row once, or with `balance` the rare classes
    repeated up to the largest class's count (`data.balance_classes`)."""
    picked = data.balance_classes(rows, seed) if balance else rows
    return pairs.selection_of(rows, Counter(picked.column("key").to_pylist()))


def local_batches(url: str, selection: dict[int, dict[str, int]], size: int, batch_size: int, seed: int = 0,
                  s3_endpoint: str | None = None):
    """The selected pairs as training batches read in this process (no Ray): a plain loop's data."""
    for shard in sorted(selection):
        for chunk in pairs.load_selected(url, shard, selection[shard], size, seed, s3_endpoint, chunk=batch_size):
            if len(chunk["prompt"]) == batch_size:
                yield chunk


# --------------------------------------------------------------------------- the worker loop


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant") -> float:
    """Linear warm-up over `warmup` steps, then constant or a cosine decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class JointTrainer:
    """The model, optimiser and one training step: plain PyTorch, no Ray (the bench's baseline too).

    Memory: with ``mixed_precision`` the frozen weights (text encoder, VAE, the UNet under its LoRA)
    are held in the compute dtype and only the trained ones in fp32; the prior term's base prediction
    comes from the same UNet with its LoRA switched off and its original 4-channel convs (a copy of
    the base UNet only when the whole UNet is trained); the geometry term decodes a `geo_crop`
    window of each mask with the VAE decoder's activations recomputed in the backward pass.
    """

    def __init__(self, cfg: FinetuneConfig, device: torch.device, seed_offset: int = 0):
        self.cfg, self.device = cfg, device
        torch.manual_seed(cfg.seed + seed_offset)
        self.amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.mixed_precision)
        frozen_dtype = self.amp_dtype or torch.float32
        self.pipe = model.load_pipeline(cfg.base_model)
        self.vae = self.pipe.vae.to(device, frozen_dtype).eval().requires_grad_(False)
        self.text_encoder = self.pipe.text_encoder.to(device, frozen_dtype).eval().requires_grad_(False)
        self.unet = self.pipe.unet.to(device, frozen_dtype if cfg.train == "lora" else torch.float32)
        if cfg.w_geo:
            self.vae.enable_gradient_checkpointing()  # only the geometry decode runs with gradients
        self.teacher, self.base_convs = None, None
        if cfg.w_prior and cfg.train == "full":  # nothing to switch off: keep a frozen copy of the base UNet
            self.teacher = copy.deepcopy(self.unet).to(frozen_dtype).eval().requires_grad_(False)
        elif cfg.w_prior and cfg.layout == "channels":  # the base's 4-channel convs, for the prior's forward
            self.base_convs = (copy.deepcopy(self.unet.conv_in), copy.deepcopy(self.unet.conv_out))
        self.params = model.prepare_unet(self.unet, cfg.layout, cfg.lora_rank, cfg.lora_alpha or None, cfg.train)
        for p in self.params:  # trained weights in fp32 whatever the compute dtype (LoRA, widened convs)
            p.data = p.data.float()
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=1e-2)
        self.model = self.unet  # what runs forward: the DDP wrapper under Ray Train
        self.alphas = torch.as_tensor(self.pipe.scheduler.alphas_cumprod, dtype=torch.float32, device=device)
        self.prediction_type = self.pipe.scheduler.config.prediction_type
        self.num_timesteps = self.pipe.scheduler.config.num_train_timesteps
        self.scaler = torch.amp.GradScaler(enabled=cfg.mixed_precision == "fp16" and device.type == "cuda")
        self.generator = torch.Generator(device="cpu").manual_seed(cfg.seed * 1000 + seed_offset)
        self.step, self.micro, self.history = 0, 0, []
        self.ema = None  # float32 copies of the trainable weights, on their device
        if cfg.ema_decay:
            self.ema = {k: v.detach().float().clone() for k, v in self.unet.named_parameters() if v.requires_grad}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None)

    @contextlib.contextmanager
    def base_unet(self):
        """Within the block the UNet computes the base model's prediction for 4-channel image latents:
        its LoRA switched off and (channels layout) its original convs in place; or the base's copy
        when the whole UNet is trained."""
        if self.teacher is not None:
            yield self.teacher
            return
        unet, widened = self.unet, (self.unet.conv_in, self.unet.conv_out)
        if self.base_convs is not None:
            unet.conv_in, unet.conv_out = self.base_convs
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()
            unet.conv_in, unet.conv_out = widened

    def decode_mask(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled mask latents → decoded N×3×H×W (the geometry term's `decode_mask`), in the compute dtype."""
        with self.autocast():
            return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample

    def state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.unet.named_parameters() if v.requires_grad}

    def update_ema(self) -> None:
        """ema ← d·ema + (1−d)·weights, with d warming up as (1+n)/(10+n) (diffusers' EMAModel)."""
        if self.ema is None:
            return
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        with torch.no_grad():
            for name, param in self.unet.named_parameters():
                if param.requires_grad:
                    self.ema[name].lerp_(param.detach().float(), 1 - decay)

    @contextlib.contextmanager
    def ema_weights(self):
        """Within the block the UNet holds the EMA weights (for sampling and the adapter)."""
        if self.ema is None:
            yield
            return
        backup = self.state()
        self.unet.load_state_dict(self.ema, strict=False)
        try:
            yield
        finally:
            self.unet.load_state_dict(backup, strict=False)

    def restore(self, folder: str) -> None:
        from safetensors.torch import load_file

        unexpected = self.unet.load_state_dict(load_file(os.path.join(folder, CHECKPOINT_STATE)), strict=False)
        if unexpected.unexpected_keys:
            raise RuntimeError(f"checkpoint has keys the model lacks: {unexpected.unexpected_keys[:3]}")
        if self.ema is not None and os.path.exists(os.path.join(folder, CHECKPOINT_EMA)):
            self.ema = {k: v.to(self.device) for k, v in load_file(os.path.join(folder, CHECKPOINT_EMA)).items()}
        self.optimizer.load_state_dict(torch.load(os.path.join(folder, CHECKPOINT_OPTIMIZER), weights_only=True))
        progress = json.loads(Path(folder, CHECKPOINT_PROGRESS).read_text())
        self.step, self.history = progress["step"], progress["history"]

    def save(self, folder: str) -> None:
        from safetensors.torch import save_file

        save_file(self.state(), os.path.join(folder, CHECKPOINT_STATE))
        if self.ema is not None:
            save_file({k: v.cpu().contiguous() for k, v in self.ema.items()}, os.path.join(folder, CHECKPOINT_EMA))
        torch.save(self.optimizer.state_dict(), os.path.join(folder, CHECKPOINT_OPTIMIZER))
        Path(folder, CHECKPOINT_PROGRESS).write_text(json.dumps({"step": self.step, "history": self.history}))

    def train_step(self, batch: dict) -> dict | None:
        """One micro-batch (uint8 images, 0/1 masks, prompts); the metrics when an optimiser step was taken."""
        cfg, g, device = self.cfg, self.generator, self.device
        images = images_to_tensor(batch["image"], device)
        masks = torch.from_numpy(batch["mask"]).to(device)
        flip = (torch.rand(len(images), generator=g) < 0.5).to(device)
        images[flip], masks[flip] = images[flip].flip(-1), masks[flip].flip(-1)
        prompts = [p if torch.rand((), generator=g) >= cfg.uncond_prob else "" for p in batch["prompt"]]
        with torch.no_grad():
            tok = self.pipe.tokenizer
            ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids.to(device)
            cond = self.text_encoder(ids)[0]
            x0 = model.encode_pair(self.vae, images.to(self.vae.dtype), masks, cfg.layout).float()
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, self.num_timesteps, (len(x0),), generator=g).to(device)
        noisy = losses.noisy(x0, noise, losses.alpha_bar(self.alphas, t))
        offsets = None
        if cfg.w_geo and cfg.geo_crop:  # where each sample's geometry window lies (latent cells)
            side = model.unpack_latents(x0, cfg.layout)[1].shape[-1]
            offsets = torch.randint(0, max(1, side - cfg.geo_crop + 1), (len(x0), 2), generator=g)
        with self.autocast():
            prior_pred = None
            if cfg.w_prior:  # first: switching the LoRA off and on again must not happen inside the graph
                with torch.no_grad(), self.base_unet() as base:
                    prior_pred = base(model.unpack_latents(noisy, cfg.layout)[0], t,
                                      encoder_hidden_states=cond).sample.float()
            pred = self.model(noisy, t, encoder_hidden_states=cond).sample
        terms = losses.joint_loss(pred.float(), x0, noise, t, self.alphas, self.prediction_type, cfg.layout,
                                  true_masks=masks, decode_mask=self.decode_mask, w_img=cfg.w_img,
                                  w_mask=cfg.w_mask, w_geo=cfg.w_geo, snr_gamma=cfg.snr_gamma or None,
                                  noisy_latents=noisy, prior_pred=prior_pred, w_prior=cfg.w_prior,
                                  geo_crop=cfg.geo_crop, geo_offsets=offsets)
        self.scaler.scale(terms["total"] / cfg.grad_accum).backward()
        self.micro += 1
        if self.micro % cfg.grad_accum:
            return None
        for group in self.optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(self.step, cfg.warmup_steps, cfg.steps, cfg.lr_schedule)
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.update_ema()
        metrics = {k: float(v.detach()) for k, v in terms.items()} | {"step": self.step, "time": time.time()}
        self.history.append(metrics)
        return metrics


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config["config"]`` is the run's `FinetuneConfig`."""
    import ray.train
    import ray.train.torch

    cfg: FinetuneConfig = config["config"]
    prompting: dict = config.get("prompting", {})
    rank = ray.train.get_context().get_world_rank()
    trainer = JointTrainer(cfg, ray.train.torch.get_device(), seed_offset=rank)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            trainer.restore(folder)
        log.info("resumed from step %d", trainer.step)
        if trainer.step > cfg.steps:
            # the run already went further: its adapter is the trained one, recorded with its real step count
            log.warning("run %s is at step %d, past --steps %d: writing its adapter as trained (%d steps); "
                        "use a new --name to train a shorter run", cfg.name, trainer.step, cfg.steps, trainer.step)
            cfg = replace(cfg, steps=trainer.step)
    trainer.model = ray.train.torch.prepare_model(trainer.unet)
    shard = ray.train.get_dataset_shard("train")
    started, start_step = time.perf_counter(), trainer.step
    while trainer.step < cfg.steps:
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * cfg.batch_size,
                                        local_shuffle_seed=cfg.seed + trainer.step):
            metrics = trainer.train_step(batch)
            if metrics is None:
                continue
            step = trainer.step
            rate = (step - start_step) / (time.perf_counter() - started)
            if rank == 0 and (step % 10 == 0 or step == cfg.steps):
                log.info("step %d/%d loss %.4f (img %.4f mask %.4f geo %.4f prior %.4f) %.2f steps/s ETA %.0f s",
                         step, cfg.steps, metrics["total"], metrics["img"], metrics["mask"], metrics["geo"],
                         metrics["prior"], rate, (cfg.steps - step) / max(rate, 1e-9))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _report_checkpoint(trainer, metrics | {"steps_per_s": rate}, rank)
            if step >= cfg.steps:
                break
    if rank == 0:
        write_outputs(cfg, trainer, prompting)


def _report_checkpoint(trainer: JointTrainer, metrics: dict, rank: int) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (trainable weights, optimiser, progress)."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            trainer.save(folder)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(metrics, checkpoint=checkpoint)


def write_outputs(cfg: FinetuneConfig, trainer: JointTrainer, prompting: dict | None = None) -> None:
    """The adapter folder under `{output}/{name}/adapter/`, then the validation grid and the loss curve
    beside it (rank 0 only).  The adapter goes first and is uploaded before anything else is drawn:
    a grid or curve that fails (out of memory, say) is a warning, and the run keeps its adapter.
    `prompting`: the training data's prompt ``template`` and per-class ``attributes``
    (`prompts.attribute_distribution`), recorded in the adapter for generation."""
    prompting = prompting or {}
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    unet = trainer.unet.eval()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        with trainer.ema_weights():
            info = model.save_adapter(adapter, unet, cfg.layout, cfg.base_model, asdict(cfg), train=cfg.train,
                                      prompt_template=prompting.get("template", prompts.DEFAULT_TEMPLATE),
                                      prompt_attributes=prompting.get("attributes"))
        storage.delete(f"{cfg.name}/adapter/{model.ADAPTER_JSON}")  # the json last: a folder with one is complete
        for name in sorted(info.files) + [model.ADAPTER_JSON]:
            storage.upload_file(str(adapter / name), f"{cfg.name}/adapter/{name}")
        log.info("adapter written to %s", storage.join(f"{cfg.name}/adapter"))

        def grid(path: Path) -> None:
            dual = model.DualPipeline(trainer.pipe, cfg.layout, resolution=cfg.resolution or None,
                                      decode_batch=cfg.validation_batch)
            with trainer.ema_weights(), trainer.autocast():
                report.validation_grid(dual, cfg.validation_per_class, cfg.validation_steps, cfg.seed, path,
                                       batch=cfg.validation_batch)

        for name, draw in (("validation_grid.png", grid),
                           ("loss_curve.png", lambda path: report.loss_curve(trainer.history, path))):
            try:
                draw(Path(tmp) / name)
                storage.upload_file(str(Path(tmp) / name), f"{cfg.name}/{name}")
            except Exception as exc:  # noqa: BLE001 - a picture must never cost the trained adapter
                log.warning("%s not written (%s: %s); the adapter at %s is complete", name, type(exc).__name__,
                            exc, storage.join(f"{cfg.name}/adapter"))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()


# --------------------------------------------------------------------------- the driver


def ray_storage(output: str, s3_endpoint: str | None):
    """(storage_path, storage_filesystem) for RunConfig: a local folder, or s3:// through pyarrow."""
    if not is_remote(output):
        return os.path.abspath(output.removeprefix("file://")), None
    from pyarrow import fs

    endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL")
    kwargs = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs = {"endpoint_override": host or scheme, "scheme": scheme if host else "https"}
    return output.removeprefix("s3://"), fs.S3FileSystem(**kwargs)


def run_finetune(cfg: FinetuneConfig):
    """Run the fine-tuning job on the current Ray cluster; returns the Ray Train result."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    index = pairs.read_index(cfg.training_data, cfg.s3_endpoint or None, "--training-data")
    rows = training_rows(index, cfg.real_fraction, cfg.seed)
    selection = training_selection(rows, cfg.balance, cfg.seed)
    native, step = base_geometry(cfg.base_model)
    size = cfg.resolution or native
    if size % step:
        raise UserError(f"--resolution {size}: {cfg.base_model} needs a multiple of {step} (its VAE and UNet "
                        f"halve the image {step.bit_length() - 1} times); e.g. {max(step, size // step * step)}")
    dataset = pairs.pair_dataset(cfg.training_data, selection, size, cfg.seed, cfg.s3_endpoint or None)
    prompting = {"template": dataset_template(cfg.training_data, cfg.s3_endpoint or None),
                 "attributes": prompts.attribute_distribution(rows)}
    storage_path, filesystem = ray_storage(cfg.output, cfg.s3_endpoint or None)
    open_storage(cfg.output, cfg.s3_endpoint or None).check()
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"config": replace(cfg, resolution=size), "prompting": prompting},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker}),
        datasets={"train": dataset},
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    log.info("fine-tuning %s (%s, %s) on %d pairs (%d an epoch), %d worker(s), %d steps", cfg.base_model,
             cfg.layout, cfg.train, rows.num_rows, sum(sum(k.values()) for k in selection.values()),
             cfg.num_workers, cfg.steps)
    return trainer.fit()


def dataset_template(url: str, s3_endpoint: str | None = None) -> str:
    """The prompt template a prepared dataset's prompts were built with (its manifest's)."""
    try:
        manifest = json.loads(open_storage(url, s3_endpoint).read_bytes(MANIFEST_FILE))
    except FileNotFoundError:
        return prompts.DEFAULT_TEMPLATE
    return manifest.get("prompt_template", prompts.DEFAULT_TEMPLATE)


def base_geometry(base_model: str) -> tuple[int, int]:
    """(native resolution, the step every training resolution must be a multiple of) of a base model,
    from its UNet and VAE configs."""
    from diffusers import UNet2DConditionModel

    base_model = resolve_base_model(base_model)
    unet_config = UNet2DConditionModel.load_config(base_model, subfolder="unet")
    vae_config = json.loads(Path(base_model, "vae", "config.json").read_text()) if Path(base_model).is_dir() else None
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1) if vae_config else 8
    return unet_config["sample_size"] * factor, factor * 2 ** (len(unet_config["block_out_channels"]) - 1)
