"""The model of a generation run: the base model, adapter and ControlNet a config names, resolved and checked on the
driver (`resolve_model` → `ModelSpec`), and loaded in each generator actor (`load_generator`: a `DualPipeline`,
or with a ControlNet a `controlnet.ControlNetPipeline`, over the joint model's `DualPipeline` when it draws the
masks)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from skindual.base_models import DEMO_BASE, adapter_base, base_id, is_demo_base
from skindual.controlnet import ControlNetPipeline, controlnet_misfit, load_controlnet_info
from skindual.dual_pipeline import DualPipeline
from skindual.errors import UserError
from skindual.generate_config import CONTROLNET_ONLY, FINGERPRINTED_WHEN_SET, GenerateConfig
from skindual.model import ADAPTER_JSON, adapter_files, adapter_misfit, load_adapter
from skindual.prompts import DEFAULT_TEMPLATE
from skindual.qc_model import QCSegmenter
from skindual.sampling_speed import speed_up
from skindual.storage import is_remote, open_storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelSpec:
    base_model: str  # what from_pretrained loads: an id, a folder, or a demo base's name
    base_id: str  # how the output names it: name@<artifact hash> for a demo base
    adapter: str | None  # folder or s3:// prefix
    adapter_sha256: str | None
    layout: str
    resolution: int | None = None  # the adapter's trained resolution (None: the base model's)
    prompt_template: str = DEFAULT_TEMPLATE  # the adapter's training prompts' template
    prompt_attributes: dict | None = None  # class → [[site, age, sex, count], ...] of its training data
    qc_sha256: str | None = None  # the QC segmenter's card (`qc_model.card_digest`), when there is one
    controlnet: str | None = None  # the ControlNet's adapter folder or s3:// prefix, which draws the images
    controlnet_sha256: str | None = None  # its skindual_adapter.json's (every file's sha256 in it)


def fetch_adapter(url: str, s3_endpoint: str | None, dest: str | Path, flag: str = "--adapter") -> Path:
    """A local adapter folder: `url` itself, or downloaded from s3:// into `dest`: its json, then the files it
    names (plain names only, `model.adapter_files`; `load_adapter` checks their sha256).  Errors name `flag`."""
    if not is_remote(url):
        return Path(url.removeprefix("file://"))
    storage = open_storage(url, s3_endpoint)
    if not storage.exists(ADAPTER_JSON):
        raise UserError(f"{flag} {url}: no {ADAPTER_JSON} there; give the adapter folder the finetune job wrote")
    storage.download_file(ADAPTER_JSON, Path(dest) / ADAPTER_JSON)
    try:
        meta = json.loads((Path(dest) / ADAPTER_JSON).read_text())
    except ValueError:
        meta = None
    for name in adapter_files(meta, f"{flag} {storage.join(ADAPTER_JSON)}"):
        storage.download_file(name, Path(dest) / name)
    return Path(dest)


def resolve_model(cfg: GenerateConfig) -> ModelSpec:
    """The base model, adapter, layout and resolution of a run (the adapter's files verified by their
    sha256, its tensors checked against the base model's UNet), and its ControlNet (`with_controlnet`)."""
    if not cfg.controlnet:
        given = [name for name in CONTROLNET_ONLY
                 if getattr(cfg, name) not in (getattr(GenerateConfig, name), FINGERPRINTED_WHEN_SET[name])]
        if given:
            flags = " / ".join(f"--{name.replace('_', '-')} {getattr(cfg, name)}" for name in given)
            raise UserError(f"{flags}: {'they steer' if len(given) > 1 else 'it steers'} a ControlNet; pass "
                            f"--controlnet, or leave {'them' if len(given) > 1 else 'it'} out")
        return resolve_joint(cfg)
    if not cfg.mask_source and not cfg.adapter:
        raise UserError("--controlnet draws each image for a given mask: pass --mask-source (a prepared real dataset's "
                        "masks) or --adapter (a joint model that samples the masks first)")
    return with_controlnet(cfg, resolve_joint(cfg) if cfg.adapter else None)


def with_controlnet(cfg: GenerateConfig, joint: ModelSpec | None) -> ModelSpec:
    """`joint` (the joint model that samples the masks; None in mask mode) with the run's ControlNet, verified and
    checked against the base model: its architecture (`controlnet_misfit`) and, where both can be named, the base it
    was trained beside (a ControlNet drives that UNet's features, no other's).  In mask mode the base is
    --base-model, else the one the ControlNet records (when it may pick it: `base_models.adapter_base`)."""
    endpoint, url = cfg.s3_endpoint or None, cfg.controlnet
    with tempfile.TemporaryDirectory(prefix="skindual-controlnet-") as tmp:
        info = load_controlnet_info(fetch_adapter(url, endpoint, tmp, "--controlnet"), url=url)
        base = joint.base_model if joint is not None else (
            cfg.base_model or adapter_base(info.base_model, url, endpoint, "--controlnet"))
        misfit = controlnet_misfit(info, base, endpoint)
    if misfit:
        raise UserError(f"--controlnet {url} was trained on {info.base_model} and does not fit the base model {base}: "
                        f"{misfit}; give a ControlNet trained on that base")
    try:
        trained_on = base_id(adapter_base(info.base_model, url, endpoint, "--controlnet"), endpoint)
    except UserError:  # a base it may not name by itself (a plain folder, another hub id): its architecture fits
        trained_on = None
    used = base_id(base, endpoint)
    if trained_on is not None and trained_on != used:
        raise UserError(f"--controlnet {url} was trained beside {trained_on}, this run samples with {used}; give a "
                        "ControlNet trained on that base")
    if joint is not None:
        return replace(joint, controlnet=url, controlnet_sha256=info.sha256)
    qc = QCSegmenter.load(cfg.qc_segmenter, endpoint) if cfg.qc_segmenter else None
    return ModelSpec(base, used, None, None, "controlnet", info.resolution, info.prompt_template,
                     info.prompt_attributes, qc.sha256 if qc else None, url, info.sha256)


def resolve_joint(cfg: GenerateConfig) -> ModelSpec:
    """The joint model of a run: its base model, adapter, layout and resolution."""
    adapter, base = cfg.adapter or None, cfg.base_model
    if adapter is None:
        if base and not is_demo_base(base):
            raise UserError(f"--base-model {base} without --adapter: a base model alone has no trained mask "
                            "channel; pass --adapter with the adapter folder the finetune job trained on it")
        log.warning("no --adapter: sampling the bare base model, whose mask channel is untrained, so masks "
                    "are not meaningful")
        base = base or DEMO_BASE
        return ModelSpec(base, base_id(base, cfg.s3_endpoint or None), None, None, "channels")
    endpoint = cfg.s3_endpoint or None
    with tempfile.TemporaryDirectory(prefix="skindual-adapter-") as tmp:
        info = load_adapter(fetch_adapter(adapter, endpoint, tmp))
        base = base or adapter_base(info.base_model, adapter, endpoint)  # only a base an adapter may pick
        misfit = adapter_misfit(info, base, endpoint)
    if misfit:
        raise UserError(f"--adapter {adapter} was trained on {info.base_model} and does not fit --base-model "
                        f"{base}: {misfit}; pass the base model it was trained on")
    qc = QCSegmenter.load(cfg.qc_segmenter, endpoint) if cfg.qc_segmenter else None  # checked up front
    return ModelSpec(base, base_id(base, endpoint), adapter, info.sha256, info.layout, info.resolution,
                     info.prompt_template, info.prompt_attributes, qc.sha256 if qc else None)


def load_generator(spec: ModelSpec, cfg: GenerateConfig, tmp: str) -> DualPipeline | ControlNetPipeline:
    """The `DualPipeline` of `spec` on the config's device and dtype (diffusers' default attention on
    torch 2 is SDPA), with ``--compile``'s levers applied (`sampling_speed.speed_up`); with a ControlNet its
    `ControlNetPipeline`, over that `DualPipeline` when a joint model samples the masks."""
    import torch

    endpoint = cfg.s3_endpoint or None
    adapter = fetch_adapter(spec.adapter, endpoint, tmp) if spec.adapter else None
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    pipe = None
    if not spec.controlnet or spec.adapter:  # the joint model (with a ControlNet: it samples the masks)
        pipe = DualPipeline.from_pretrained(spec.base_model, adapter, device=cfg.device, dtype=torch_dtype,
                                            scheduler=cfg.scheduler, layout=spec.layout, resolution=spec.resolution,
                                            s3_endpoint=endpoint)
        if pipe.adapter is not None and pipe.adapter.sha256 != spec.adapter_sha256:
            raise RuntimeError(f"adapter {spec.adapter} changed while the run started; rerun the job")
    if spec.controlnet:
        folder = fetch_adapter(spec.controlnet, endpoint, Path(tmp) / "controlnet-adapter", "--controlnet")
        pipe = ControlNetPipeline.from_pretrained(spec.base_model, folder, device=cfg.device, dtype=torch_dtype,
                                                  scheduler=cfg.scheduler, resolution=spec.resolution,
                                                  s3_endpoint=endpoint, masker=pipe, control_scale=cfg.control_scale,
                                                  control_end=cfg.control_end)
        if pipe.info.sha256 != spec.controlnet_sha256:
            raise RuntimeError(f"ControlNet {spec.controlnet} changed while the run started; rerun the job")
    if cfg.compile:
        if isinstance(pipe, ControlNetPipeline):
            speed_up(pipe.pipe, controlnet=pipe.controlnet)  # the stock base and its ControlNet
            if pipe.masker is not None:
                speed_up(pipe.masker.pipe)  # the joint model that samples the masks
        else:
            speed_up(pipe.pipe)
    return pipe
