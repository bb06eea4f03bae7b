"""Fine-tuning the joint image–mask model with Ray Train (docs/architecture.md, "The joint image–mask model").

`plan_finetune(config)` resolves and checks a run before any cluster work; `run_finetune(plan)` builds a Ray
Data dataset of the selected pairs, runs a `TorchTrainer` of `num_workers` DDP workers (gloo on CPU, NCCL on
GPUs) over `skindual.finetune_worker.train_loop`, checkpoints every `checkpoint_every` optimiser steps to
`RunConfig(storage_path=output, name=name)` -- a local folder or s3:// -- and writes the adapter folder, a
validation grid and a loss curve beside the checkpoints.  Re-running with the same output and name resumes
from the last checkpoint (Ray Train restores its checkpoint manager from storage) and ends at the same final
step.  Here too: the memory model of one step at real size (`step_memory_gb`, `check_memory`) and which pairs
an epoch shows (`training_rows`, `training_selection`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import pyarrow as pa

from skindual import data, model, pairs, prompts
from skindual.base_models import base_geometry, base_id
from skindual.cli import check_interrupt
from skindual.cluster import ClusterShape, check_accelerator, check_shared_paths
from skindual.errors import UserError
from skindual.finetune_config import (CONTROLNET_UNUSED, NOT_FINGERPRINTED, RUN_FILE, FinetuneConfig, FinetunePlan,
                                      Prompting, resolve_precision)
from skindual.finetune_worker import train_loop
from skindual.pairs import dataset_manifest
from skindual.qc_model import QCSegmenter, card_digest
from skindual.fingerprint import config_fingerprint, settings_diff
from skindual.shard_store import read_record, unfinished_part
from skindual.storage import Storage, finished, open_storage, output_storage, ray_storage

log = logging.getLogger(__name__)
RERUN_HINT = ("a rerun with the same --name resumes it with its own settings: give the same ones, or another "
              "--name")
"""What a refused resume tells the user of jobs/finetune.py (`plan_finetune`'s `rerun_hint`)."""


# --------------------------------------------------------------------------- memory at real size

STEP_MEMORY_GB = {"bf16": (4.27, 1.91), "fp16": (4.27, 1.91), "no": (8.30, 2.82), "checkpointing": (3.6, 0.55)}
"""One fine-tuning step of SD-2-base at 512² (LoRA r16, channels layout, default loss terms): peak GB at
batch 1 and per extra sample, by compute dtype (``checkpointing``: bf16 with --gradient-checkpointing),
measured by ``python bench/realsize_memory.py`` (README, "Real size").  bf16 (and fp16, the same sizes) on an
H200: the memory PyTorch's allocator reserved at batch 1 (4.27 GB) and per extra sample from batch 1 to the
default batch 8 (17.62 GB); the others are the CPU's resident set (no GPU measurement yet)."""
WHOLE_MASK_GB, PRIOR_GB, CUDA_CONTEXT_GB = 1.1, 0.1, 1.5  # per sample; the CUDA context and allocator
CONSISTENCY_GB = (0.19, 0.11)
"""The consistency reward (--w-consistency) scoring every sample of the batch, its worst case: GB once (the
frozen segmenter, the checkpointed decoder window; the CPU's ``bf16_b1_consistency`` against ``bf16_b1``) and
per sample (on an H200 at batch 8: 18.64 GB reserved against 17.62 without it, +1.02 GB)."""
RESNET_LORA_GB = (0.08, 1.23)
"""--lora-targets attention+resnet: GB once (its LoRA and their optimiser state) and the factor of the per-sample
figure (the inputs of the ResNet convolutions and feed-forwards kept for the backward pass), measured on the CPU's
resident set by ``bf16_b1_resnet_lora`` / ``bf16_b2_resnet_lora`` against ``bf16_b1`` / ``bf16_b2`` (4.88 / 6.70
GB against 4.46 / 5.94: +0.34 GB a sample on 1.48); no GPU measurement yet, so the factor, not the CPU's GB, scales
the GPU's per-sample figure."""
SD2_UNET_PARAMETERS = 865_910_724  # SD-2's UNet (`skindual.sd2` at width 1)
GPU_MEMORY_GB = {"T4": 16, "V100": 16, "A10": 24, "A10G": 24, "L4": 24, "L40S": 48, "A100": 40, "A100-40G": 40,
                 "A100-80G": 80, "H100": 80, "H200": 141, "B200": 180}
"""Memory of the GPU models by Ray's accelerator-type names (the smallest variant where there are two)."""
SD2_WIDTHS = [320, 640, 1280, 1280]


def full_unet_gb(cfg: FinetuneConfig, precision: str) -> float:
    """What training the whole UNet of SD-2 (--train full) adds to a LoRA step's weights, counted in bytes per UNet
    parameter, not measured: its weights in fp32 instead of the compute dtype, their gradients, AdamW's two moments,
    the EMA's copy, autocast's compute-dtype copies of the weights, and the prior's frozen copy of the base."""
    frozen = 4 if precision == "no" else 2
    per_parameter = ((4 - frozen) + 4 + 8 + (4 if cfg.ema_decay else 0) + (frozen if precision != "no" else 0)
                     + (frozen if cfg.w_prior else 0))
    return SD2_UNET_PARAMETERS * per_parameter / 1024**3


def step_memory_gb(cfg: FinetuneConfig, unet_widths: list[int], resolution: int) -> float | None:
    """Estimated GPU memory of one training step of `cfg` (CUDA context included) for SD-2-sized UNets, from
    `STEP_MEMORY_GB` with the activations scaled by the pixel count; None for other bases.  LoRA on the ResNet
    blocks too (`RESNET_LORA_GB`) grows the activations; so does the whole UNet trained, at least as much, its
    weights and optimiser state added by `full_unet_gb`.  None for --train controlnet too (not measured on a GPU
    yet: `bench/realsize_memory.py`'s ``controlnet_*`` settings)."""
    if list(unet_widths) != SD2_WIDTHS or cfg.train == "controlnet":  # a ControlNet's step: not measured on a GPU yet
        return None
    precision = resolve_precision(cfg.mixed_precision, cfg.use_gpu)
    first, extra = STEP_MEMORY_GB["checkpointing" if cfg.gradient_checkpointing and precision != "no" else precision]
    scale = (resolution / 512) ** 2
    reward_once, reward_per_sample = CONSISTENCY_GB if cfg.w_consistency else (0.0, 0.0)
    if cfg.train == "full":
        trained_once, factor = full_unet_gb(cfg, precision), RESNET_LORA_GB[1]
    else:
        trained_once, factor = RESNET_LORA_GB if cfg.lora_targets == "attention+resnet" else (0.0, 1.0)
    per_sample = (factor * extra + (WHOLE_MASK_GB if cfg.w_geo and cfg.geo_crop == 0 else 0.0)
                  + (PRIOR_GB if cfg.w_prior else 0.0) + reward_per_sample) * scale
    weights = first - extra + reward_once + trained_once  # what does not grow with the batch (weights, optimiser state)
    return round(weights + cfg.batch_size * per_sample + CUDA_CONTEXT_GB, 1)


def check_memory(cfg: FinetuneConfig, unet_widths: list[int], resolution: int, accelerator: str) -> None:
    """Refuse settings whose step does not fit the workers' GPU (`accelerator`, when its memory is known)."""
    need = step_memory_gb(cfg, unet_widths, resolution)
    have = GPU_MEMORY_GB.get(accelerator)
    if not cfg.use_gpu or need is None or have is None or need <= have:
        return
    precision = resolve_precision(cfg.mixed_precision, cfg.use_gpu)
    fitting = max((b for b in range(1, cfg.batch_size) if step_memory_gb(replace(cfg, batch_size=b), unet_widths,
                                                                          resolution) <= have), default=0)
    advice = [f"--batch-size {fitting}"] if fitting else []
    if precision == "no":
        advice.insert(0, "--mixed-precision bf16")
    if not cfg.gradient_checkpointing:
        advice.append("--gradient-checkpointing")
    raise UserError(f"--batch-size {cfg.batch_size} --mixed-precision {precision} at {resolution}²: one training step "
                    f"needs about {need:g} GB, more than the {have} GB of an {accelerator}; use "
                    f"{' or '.join(advice)} (README, \"Real size\")")


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


# --------------------------------------------------------------------------- the driver


def finetune_settings(cfg: FinetuneConfig, data_fingerprint: str, data_shards: list[int] | None = None) -> dict:
    """The settings that shape the weights (`NOT_FINGERPRINTED` left out, and for a ControlNet `CONTROLNET_UNUSED`),
    the base model by its identity and the training data by its manifest's fingerprint, and by the shards read when
    ``--partial`` read the committed part of an unfinished dataset (`data_shards`; so the finished dataset's run is
    not taken for this one)."""
    unused = CONTROLNET_UNUSED if cfg.train == "controlnet" else ()
    settings = {k: v for k, v in asdict(cfg).items() if k not in NOT_FINGERPRINTED and k not in unused}
    if cfg.use_gpu:  # CPUs reserved beside a GPU: the sums are the GPU's
        del settings["cpus_per_worker"]
    if cfg.consistency_segmenter:  # by its identity (its card names its weights' sha256), not its place
        settings["consistency_segmenter"] = f"sha256:{card_digest(cfg.consistency_segmenter, cfg.s3_endpoint or None)}"
    if data_shards is not None:
        settings["training_data_shards"] = ",".join(f"{n:05d}" for n in data_shards)
    return settings | {"base_model": base_id(cfg.base_model, cfg.s3_endpoint or None), "training_data_fingerprint":
                       data_fingerprint}


def plan_finetune(cfg: FinetuneConfig, rerun_hint: str = RERUN_HINT) -> FinetunePlan:
    """Resolve and check a fine-tuning run: the training data, the base model (configs only), the resolution,
    the output and the run's earlier settings (a rerun with other ones is refused), reading storage only;
    every problem is one `UserError`."""
    endpoint = cfg.s3_endpoint or None
    native, step, widths = base_geometry(cfg.base_model, endpoint)
    index = pairs.read_index(cfg.training_data, endpoint, "--training-data", cfg.partial)
    data_shards = unfinished_part(open_storage(cfg.training_data, endpoint)) if cfg.partial else None
    rows = training_rows(index, cfg.real_fraction, cfg.seed)
    if cfg.consistency_segmenter:  # a bad one is one line here, not a traceback in every worker
        QCSegmenter.load(cfg.consistency_segmenter, endpoint, flag="--consistency-segmenter")
    selection = training_selection(rows, cfg.balance, cfg.seed)
    storage = output_storage(cfg.output, endpoint)  # the inputs first: a bad one leaves no output folder behind
    size = cfg.resolution or native
    if size % step:
        raise UserError(f"--resolution {size}: {cfg.base_model} needs a multiple of {step} (its VAE and UNet "
                        f"halve the image {step.bit_length() - 1} times); e.g. {max(step, size // step * step)}")
    cfg = replace(cfg, resolution=size, mixed_precision=resolve_precision(cfg.mixed_precision, cfg.use_gpu))
    manifest = dataset_manifest(cfg.training_data, endpoint)
    settings = finetune_settings(cfg, manifest.get("fingerprint", ""), data_shards)
    fingerprint = config_fingerprint(settings)
    _check_run(storage, cfg, settings, fingerprint, rerun_hint)
    prompting = Prompting(manifest.get("prompt_template", prompts.DEFAULT_TEMPLATE),
                          prompts.attribute_distribution(rows))
    done = finished(storage, f"{cfg.name}/adapter/{model.ADAPTER_JSON}", fingerprint)
    return FinetunePlan(cfg, rows.num_rows, selection, prompting, tuple(widths), settings, fingerprint, done)


def _check_run(storage: Storage, cfg: FinetuneConfig, settings: dict, fingerprint: str, hint: str) -> None:
    """Refuse to resume a run (`--name` under `--output`) that was started with other settings (``--steps``
    included: a longer run is another run, its learning rate decays over all its steps); `hint` says what to do."""
    try:
        previous = read_record(storage, f"{cfg.name}/{RUN_FILE}")
    except FileNotFoundError:
        return
    if previous.get("fingerprint") == fingerprint:
        return
    what = settings_diff(previous.get("settings", {}), settings) or "other settings"
    raise UserError(f"run {cfg.name} at {storage.url} was started with {what}; {hint}")


def check_cluster(cfg: FinetuneConfig, shape: ClusterShape) -> str:
    """The checks of a run against its cluster (`cluster.cluster_shape`): outputs and inputs every worker
    can reach, GPUs it has or can launch; returns the GPU model the workers run on (``--accelerator-type``),
    else the one of the smallest memory they could land on (``""``: unknown, or CPU)."""
    paths = {"--output": cfg.output, "--training-data": cfg.training_data,
             "--consistency-segmenter": cfg.consistency_segmenter}
    if Path(cfg.base_model).is_dir():
        paths["--base-model"] = cfg.base_model
    check_shared_paths(paths, shape)
    if cfg.use_gpu and shape.most("GPU") < 1 and shape.autoscaler != "unknown":
        raise UserError("--use-gpu: no node of this cluster has or can launch a GPU; train on CPUs without it, or "
                        "add a GPU node type to the cluster")
    accelerator = check_accelerator(cfg.accelerator_type, 1.0 if cfg.use_gpu else 0.0, shape)
    known = [a for a in shape.accelerator_types() if a in GPU_MEMORY_GB] if cfg.use_gpu else []
    return accelerator or min(known, key=GPU_MEMORY_GB.__getitem__, default="")


def run_finetune(plan: FinetunePlan, shape: ClusterShape | None = None):
    """Run the fine-tuning job on the current Ray cluster (`shape`: what it has and can launch, read from it when
    not given); returns the Ray Train result."""
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from skindual.cluster import cluster_shape

    cfg = plan.config
    accelerator = check_cluster(cfg, shape or cluster_shape())
    check_memory(cfg, list(plan.unet_widths), cfg.resolution, accelerator)
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    storage.write_bytes(f"{cfg.name}/{RUN_FILE}", json.dumps({"fingerprint": plan.fingerprint, "settings": plan.settings},
                                                             sort_keys=True, indent=1, default=str).encode())
    dataset = pairs.pair_dataset(cfg.training_data, plan.selection, cfg.resolution, cfg.seed, cfg.s3_endpoint or None)
    storage_path, filesystem = ray_storage(cfg.output, cfg.s3_endpoint or None)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"plan": plan},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu,
                                     resources_per_worker={"CPU": cfg.cpus_per_worker},
                                     accelerator_type=cfg.accelerator_type or None),
        datasets={"train": dataset},
        # the pairs arrive in the same order every epoch and every run: a resumed run sees what it would have
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=filesystem,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2)),
    )
    precision = "fp32" if cfg.mixed_precision == "no" else cfg.mixed_precision
    log.info("fine-tuning %s (%s, %s, %s) on %d pairs (%d an epoch), %d worker(s)%s, %d steps", cfg.base_model,
             cfg.layout, cfg.train, precision, plan.rows, sum(sum(k.values()) for k in plan.selection.values()),
             cfg.num_workers, f" on {accelerator}" if accelerator else "", cfg.steps)
    check_interrupt()  # a Ctrl-C that Ray's setup calls swallowed stops the run before it trains
    return trainer.fit()
