"""The model of a generation run: the base model and adapter a config names, resolved and checked on the
driver (`resolve_model` → `ModelSpec`), and loaded in each generator actor (`load_generator`)."""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

from skindual.base_models import DEMO_BASE, adapter_base, base_id, is_demo_base
from skindual.dual_pipeline import DualPipeline
from skindual.errors import UserError
from skindual.generate_config import GenerateConfig
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


def fetch_adapter(url: str, s3_endpoint: str | None, dest: str | Path) -> Path:
    """A local adapter folder: `url` itself, or downloaded from s3:// into `dest`: its json, then the files it
    names (plain names only, `model.adapter_files`; `load_adapter` checks their sha256)."""
    if not is_remote(url):
        return Path(url.removeprefix("file://"))
    storage = open_storage(url, s3_endpoint)
    if not storage.exists(ADAPTER_JSON):
        raise UserError(f"--adapter {url}: no {ADAPTER_JSON} there; give the adapter folder the finetune job wrote")
    storage.download_file(ADAPTER_JSON, Path(dest) / ADAPTER_JSON)
    try:
        meta = json.loads((Path(dest) / ADAPTER_JSON).read_text())
    except ValueError:
        meta = None
    for name in adapter_files(meta, f"--adapter {storage.join(ADAPTER_JSON)}"):
        storage.download_file(name, Path(dest) / name)
    return Path(dest)


def resolve_model(cfg: GenerateConfig) -> ModelSpec:
    """The base model, adapter, layout and resolution of a run (the adapter's files verified by their
    sha256, its tensors checked against the base model's UNet)."""
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


def load_generator(spec: ModelSpec, cfg: GenerateConfig, tmp: str) -> DualPipeline:
    """The `DualPipeline` of `spec` on the config's device and dtype (diffusers' default attention on
    torch 2 is SDPA), with ``--compile``'s levers applied (`sampling_speed.speed_up`)."""
    import torch

    adapter = fetch_adapter(spec.adapter, cfg.s3_endpoint or None, tmp) if spec.adapter else None
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    pipe = DualPipeline.from_pretrained(spec.base_model, adapter, device=cfg.device, dtype=torch_dtype,
                                        scheduler=cfg.scheduler, layout=spec.layout, resolution=spec.resolution,
                                        s3_endpoint=cfg.s3_endpoint or None)
    if pipe.adapter is not None and pipe.adapter.sha256 != spec.adapter_sha256:
        raise RuntimeError(f"adapter {spec.adapter} changed while the run started; rerun the job")
    if cfg.compile:
        speed_up(pipe.pipe)
    return pipe
