"""The Ray Train side of fine-tuning: `train_loop` runs on every worker (a `JointTrainer`, or with --train
controlnet a `ControlNetTrainer`, resumed from Ray Train's last checkpoint, over its shard of the pairs; a
checkpoint every ``--checkpoint-every`` steps), and rank 0 ends with `write_outputs`: the adapter folder, then the
validation grid and the loss curve beside it.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from skindual import data, dual_pipeline, model, pairs, report
from skindual.cli import worker_setup
from skindual.controlnet import ControlNetPipeline, save_controlnet
from skindual.controlnet_trainer import ControlNetTrainer
from skindual.finetune_config import FinetuneConfig, FinetunePlan, Prompting
from skindual.joint_trainer import JointTrainer, Trainer, device_name, load_checkpoint, save_checkpoint
from skindual.storage import open_storage

log = logging.getLogger(__name__)

PROGRESS_EVERY_S = 30.0  # the longest gap between two progress lines while training goes on
TERMS = ("img", "mask", "geo", "prior", "consistency")  # the loss terms a progress line shows, those a step has


def make_trainer(cfg: FinetuneConfig, device, rank: int = 0, world_size: int = 1) -> Trainer:
    """The trainer of ``--train``: a `ControlNetTrainer` for controlnet, else the joint model's `JointTrainer`."""
    return (ControlNetTrainer if cfg.train == "controlnet" else JointTrainer)(cfg, device, rank, world_size)


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker; ``config["plan"]`` is the run's `FinetunePlan`."""
    import ray.train
    import ray.train.torch

    worker_setup()
    plan: FinetunePlan = config["plan"]
    cfg, prompting = plan.config, plan.prompting
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    if device.type == "cpu":  # its reserved CPUs, whatever this (reused) worker process had: the same sums every run
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    trainer = make_trainer(cfg, device, rank, world_size)
    log.info("worker %d of %d on %s, pid %d, %d torch threads", rank, world_size, device_name(trainer.device),
             os.getpid(), torch.get_num_threads())
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            load_checkpoint(trainer, folder)
        log.info("resumed from step %d", trainer.step)
    trainer.model = ray.train.torch.prepare_model(trainer.trained)
    shard = ray.train.get_dataset_shard("train")
    started, start_step, last_line = time.perf_counter(), trainer.step, 0.0
    while trainer.step < cfg.steps:
        # each epoch's order is seeded by the step it starts at; a resumed epoch skips what it already gave
        skip, seen = trainer.epoch_batches, 0
        for batch in shard.iter_batches(batch_size=cfg.batch_size, batch_format="numpy", drop_last=True,
                                        local_shuffle_buffer_size=4 * cfg.batch_size,
                                        local_shuffle_seed=trainer.epoch_seed):
            seen += 1
            if seen <= skip:
                continue
            trainer.epoch_batches += 1
            metrics = trainer.train_step(batch)
            if metrics is None:
                continue
            step = trainer.step
            rate = (step - start_step) / (time.perf_counter() - started)
            now = time.perf_counter()
            if rank == 0 and (now - last_line >= PROGRESS_EVERY_S or step == cfg.steps):
                last_line = now  # a line at least every 30 s while steps come, and at the last
                terms = " ".join(f"{k} {metrics[k]:.4f}" for k in TERMS if k in metrics)
                log.info("fine-tune: step %d/%d (%.0f%%), loss %.4f (%s), %.2f steps/s, ETA %.0f s", step, cfg.steps,
                         100 * step / cfg.steps, metrics["total"], terms, rate, (cfg.steps - step) / max(rate, 1e-9))
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _report_checkpoint(trainer, metrics | {"steps_per_s": rate})
            if step >= cfg.steps:
                break
        else:  # the epoch ended: the next one's order is seeded by the step it starts at
            trainer.epoch_seed, trainer.epoch_batches = cfg.seed + trainer.step, 0
    if trainer.skipped_steps and rank == 0:
        log.warning("the fp16 gradient scaler skipped %d of %d optimiser steps (inf/NaN gradients)",
                    trainer.skipped_steps, trainer.step)
    if rank == 0:
        write_outputs(cfg, trainer, prompting, plan.fingerprint)


def _report_checkpoint(trainer: Trainer, metrics: dict) -> None:
    """Every worker reports its share of the checkpoint (`save_checkpoint`: rank 0 the weights, optimiser and
    progress, each rank its RNG streams and data order); Ray Train uploads them into one folder and registers
    it once every worker has reported."""
    import ray.train

    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(trainer, folder)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def validation_masks(cfg: FinetuneConfig, size: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Class index → (images, 0/1 masks) at `size` of the first ``--validation-per-class`` pairs of each class of
    the training data's val split (its train split for a class the val split lacks): the masks a ControlNet's
    validation grid draws images for, and the real pairs they came from."""
    index = pairs.usable_rows(pairs.read_index(cfg.training_data, cfg.s3_endpoint or None, "--training-data",
                                               cfg.partial))
    val, train = data.classed_rows(index, "val", cfg.validation_per_class), data.classed_rows(index, "train")
    lacking = train.filter(~np.isin(np.asarray(train.column("class_index")), np.asarray(val.column("class_index"))))
    rows = pa.concat_tables([val, data.classed_rows(lacking, "all", cfg.validation_per_class)])
    loaded = pairs.load_pairs(cfg.training_data, pairs.selection_of(rows), size, cfg.s3_endpoint or None)
    return {int(c): (loaded["image"][loaded["class_index"] == c], loaded["mask"][loaded["class_index"] == c])
            for c in np.unique(loaded["class_index"])}


def write_outputs(cfg: FinetuneConfig, trainer: Trainer, prompting: Prompting | None = None,
                  fingerprint: str = "") -> None:
    """The adapter folder under `{output}/{name}/adapter/` (a ControlNet's: `controlnet.save_controlnet`), then the
    validation grid (the joint model's pairs; a ControlNet's images for real val masks, `validation_masks`) and the
    loss curve beside it (rank 0 only).
    The adapter goes first and is uploaded before anything else is drawn:
    a grid or curve that fails (out of memory, say) is a warning, and the run keeps its adapter.
    `prompting` is recorded in the adapter for generation; `fingerprint` (the plan's) marks the run done."""
    prompting = prompting or Prompting()
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    trained = trainer.trained.eval()
    with tempfile.TemporaryDirectory() as tmp:
        adapter = Path(tmp) / "adapter"
        with trainer.ema_weights():
            if cfg.train == "controlnet":
                info = save_controlnet(adapter, trained, cfg.base_model, asdict(cfg),
                                       prompt_template=prompting.template, prompt_attributes=prompting.attributes,
                                       fingerprint=fingerprint)
            else:
                info = model.save_adapter(adapter, trained, cfg.layout, cfg.base_model, asdict(cfg), train=cfg.train,
                                          prompt_template=prompting.template, prompt_attributes=prompting.attributes,
                                          fingerprint=fingerprint)
        storage.delete(f"{cfg.name}/adapter/{model.ADAPTER_JSON}")  # the json last: a folder with one is complete
        for name in sorted(info.files) + [model.ADAPTER_JSON]:
            storage.upload_file(str(adapter / name), f"{cfg.name}/adapter/{name}")
        log.info("adapter written to %s", storage.join(f"{cfg.name}/adapter"))

        def grid(path: Path) -> None:
            dual = dual_pipeline.DualPipeline(trainer.pipe, cfg.layout, resolution=cfg.resolution or None,
                                      decode_batch=cfg.validation_batch)
            with trainer.ema_weights(), trainer.autocast():
                report.validation_grid(dual, cfg.validation_per_class, cfg.validation_steps, cfg.seed, path,
                                       batch=cfg.validation_batch)

        def controlnet_grid(path: Path) -> None:
            cn = ControlNetPipeline(trainer.pipe, trainer.controlnet, resolution=cfg.resolution or None,
                                    decode_batch=cfg.validation_batch)
            given = validation_masks(cfg, cn.resolution)
            with trainer.ema_weights(), trainer.autocast():
                report.controlnet_grid(cn, given, cfg.validation_steps, cfg.seed, path, batch=cfg.validation_batch)

        pictures = [("validation_grid.png", controlnet_grid if cfg.train == "controlnet" else grid)]
        for name, draw in pictures + [("loss_curve.png", lambda path: report.loss_curve(trainer.history, path))]:
            try:
                draw(Path(tmp) / name)
                storage.upload_file(str(Path(tmp) / name), f"{cfg.name}/{name}")
            except Exception as exc:  # noqa: BLE001 - a picture must never cost the trained adapter
                log.warning("%s not written (%s: %s); the adapter at %s is complete", name, type(exc).__name__,
                            exc, storage.join(f"{cfg.name}/adapter"))
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
