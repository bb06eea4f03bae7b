"""The joint image–mask model: Stable Diffusion 2 adapted so that ONE sampling pass yields both.

Layouts (docs/architecture.md, "The joint image–mask model"): ``channels`` stacks image and mask latents to 8
channels (UNet ``conv_in``/``conv_out`` widened, mask inputs starting at zero so step 0 is the
base model); ``side-by-side`` puts image | mask on one canvas of twice the width (stock UNet, so
its LoRA file loads into any Stable Diffusion tool).  An adapter folder holds the diffusers LoRA
file, the widened convs (or the whole UNet when trained fully) and ``skindual_adapter.json`` with
the sha256 of every file.  Sampling: `skindual.dual_pipeline`.  Pure model code: no Ray, no storage beyond a
local adapter folder.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from skindual.base_models import base_config, hub_error, is_hub_id, resolve_base_model
from skindual.errors import UserError
from skindual.prompts import CLASSES, DEFAULT_TEMPLATE
from skindual.storage import file_sha256


LAYOUTS = ("channels", "side-by-side")
TRAIN_MODES = ("lora", "full", "controlnet")
"""What a fine-tune trains: LoRA on the joint UNet (+ its widened convs), the whole joint UNet, or a ControlNet
beside the stock, frozen base UNet that draws the image for a given mask (`skindual.controlnet`)."""
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_TARGETS = {"attention": ATTENTION,
                "attention+resnet": ATTENTION + ["conv1", "conv2", "conv_shortcut", "time_emb_proj", "ff.net.0.proj",
                                                 "ff.net.2"]}
"""What LoRA adapts, by name → the UNet's module names (peft's suffix match): the attention projections, or also
every ResNet block's convolutions and time-embedding projection and every transformer block's feed-forward."""
LORA_FILE = "pytorch_lora_weights.safetensors"
CONVS_FILE = "skindual_convs.safetensors"
UNET_FILE = "skindual_unet.safetensors"
ADAPTER_JSON = "skindual_adapter.json"
ADAPTER_FORMAT = "skindual-adapter/1"
CONTROLNET_DIR = "controlnet"
"""The one folder an adapter folder may hold: a ControlNet's (--train controlnet), as diffusers'
`ControlNetModel.save_pretrained` writes it (`skindual.controlnet`)."""


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise UserError(f"unknown layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    return layout


def check_train(train: str) -> str:
    if train not in TRAIN_MODES:
        raise UserError(f"unknown train mode {train!r}; choose one of {', '.join(TRAIN_MODES)}")
    return train


def check_lora_targets(targets: str) -> str:
    if targets not in LORA_TARGETS:
        raise UserError(f"unknown LoRA targets {targets!r}; choose one of {', '.join(LORA_TARGETS)}")
    return targets


# --------------------------------------------------------------------------- base pipeline, UNet and latents


def load_pipeline(model: str | Path, torch_dtype=torch.float32, s3_endpoint: str | None = None):
    """Load any SD-2-style pipeline: a hub id, a local folder, a base staged on s3:// (this node's cached
    copy), or `demo` (the shipped demo base).  A hub id that cannot be loaded is one `UserError`."""
    from diffusers import StableDiffusionPipeline

    try:
        return StableDiffusionPipeline.from_pretrained(
            resolve_base_model(model, s3_endpoint), dtype=torch_dtype, safety_checker=None,
            requires_safety_checker=False)
    except OSError as exc:
        if is_hub_id(model):
            raise hub_error(model, exc) from None
        raise


def stock_pipeline_beside(pipe, model: str | Path, torch_dtype=torch.float32, s3_endpoint: str | None = None):
    """The base pipeline `model` with its own stock UNet, sharing `pipe`'s (the same base, its UNet adapted) VAE,
    text encoder, tokenizer and scheduler: those weights are held once."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(resolve_base_model(model, s3_endpoint), subfolder="unet",
                                                dtype=torch_dtype)
    return StableDiffusionPipeline(vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer, unet=unet,
                                   scheduler=pipe.scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def place(module: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """`module` on `device` in `dtype`, by torch's own `Module.to`: diffusers 0.42's `ModelMixin.to` warns on every
    dtype cast that modules "should be kept in float32: []" (its check tests the list against None), though SD-2's
    UNet and VAE keep none in fp32."""
    return torch.nn.Module.to(module, device=device, dtype=dtype)


def mask_to_image(masks: np.ndarray | torch.Tensor) -> torch.Tensor:
    """Binary N×H×W masks → N×3×H×W in {-1, 1}: how the shared VAE sees a mask."""
    m = torch.as_tensor(masks).float()
    return (m * 2 - 1)[:, None].expand(-1, 3, -1, -1)


def widen_unet(unet) -> None:
    """Widen ``conv_in``/``conv_out`` 4→8 channels in place: mask inputs zero, mask outputs = image outputs."""
    if unet.config.in_channels == 8 and unet.config.out_channels == 8:
        return
    if unet.config.in_channels != 4 or unet.config.out_channels != 4:
        raise ValueError(f"expected a 4-channel UNet, got {unet.config.in_channels}→{unet.config.out_channels}")
    old_in, old_out = unet.conv_in, unet.conv_out

    def conv(old, in_ch, out_ch):
        return torch.nn.Conv2d(in_ch, out_ch, old.kernel_size, old.stride, old.padding,
                               device=old.weight.device, dtype=old.weight.dtype)

    new_in, new_out = conv(old_in, 8, old_in.out_channels), conv(old_out, old_out.in_channels, 8)
    with torch.no_grad():
        new_in.weight.zero_()
        new_in.weight[:, :4] = old_in.weight
        new_in.bias.copy_(old_in.bias)
        new_out.weight.copy_(torch.cat([old_out.weight, old_out.weight]))
        new_out.bias.copy_(torch.cat([old_out.bias, old_out.bias]))
    unet.conv_in, unet.conv_out = new_in, new_out
    unet.register_to_config(in_channels=8, out_channels=8)


def prepare_unet(unet, layout: str, lora_rank: int = 8, lora_alpha: float | None = None,
                 train: str = "lora", lora_targets: str = "attention") -> list[torch.nn.Parameter]:
    """Make `unet` trainable for `layout`; returns the trainable parameters.

    ``train="lora"``: LoRA (rank `lora_rank`, alpha `lora_alpha` or the rank) on the modules `lora_targets`
    names (`LORA_TARGETS`), added with ``unet.add_adapter`` as diffusers' train_text_to_image_lora.py does,
    plus the widened convs for ``channels``.  ``train="full"``: the whole UNet.
    """
    check_layout(layout)
    check_train(train)
    check_lora_targets(lora_targets)
    unet.requires_grad_(False)
    if layout == "channels":
        widen_unet(unet)
    if train == "full":
        unet.requires_grad_(True)
    else:
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_alpha or lora_rank,
                                    init_lora_weights="gaussian", target_modules=LORA_TARGETS[lora_targets]))
        if layout == "channels":  # after add_adapter: peft freezes everything but the LoRA layers
            unet.conv_in.requires_grad_(True)
            unet.conv_out.requires_grad_(True)
    return [p for p in unet.parameters() if p.requires_grad]


def _stable(value):
    """peft config → JSON-able with sets as sorted lists: the LoRA file (and its sha256) must not
    depend on a process's string-hash seed (PYTHONHASHSEED)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return value


def _sort_safetensors_metadata(path: Path) -> None:
    """Rewrite a .safetensors header with its ``__metadata__`` keys sorted, in place: safetensors
    writes that map in a per-process random order, which would give the same adapter another sha256."""
    import struct

    raw = path.read_bytes()
    size = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + size])
    if "__metadata__" not in header:
        return
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) <= size:  # same content, same length: pad as safetensors does, tensor bytes untouched
        path.write_bytes(raw[:8] + text.ljust(size, b" ") + raw[8 + size:])


def pack_latents(image_latents: torch.Tensor, mask_latents: torch.Tensor, layout: str) -> torch.Tensor:
    """Image and mask latents → the UNet's joint latents (channels: dim 1; side-by-side: width)."""
    return torch.cat([image_latents, mask_latents], dim=1 if check_layout(layout) == "channels" else 3)


def unpack_latents(latents: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Joint latents → (image latents, mask latents)."""
    dim = 1 if check_layout(layout) == "channels" else 3
    half = latents.shape[dim] // 2
    return latents.narrow(dim, 0, half), latents.narrow(dim, half, half)


def encode_pair(vae, images: torch.Tensor, masks: torch.Tensor, layout: str,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Images (N×3×H×W in [-1, 1]) and binary masks (N×H×W) → scaled joint latents.

    The latents are posterior samples when a `generator` is given, posterior means otherwise.
    """
    both = torch.cat([images, mask_to_image(masks).to(images)])
    dist = vae.encode(both).latent_dist
    z = (dist.sample(generator) if generator is not None else dist.mean) * vae.config.scaling_factor
    return pack_latents(*z.chunk(2), layout)


def vae_decoder(vae):
    """Scaled latents → decoded N×3×H×W images in about [-1, 1]: the `decode_mask` of `joint_loss`."""
    return lambda latents: vae.decode(latents / vae.config.scaling_factor).sample


# --------------------------------------------------------------------------- adapter folder


@dataclass
class AdapterInfo:
    folder: Path
    base_model: str
    layout: str | None  # None: a ControlNet (train "controlnet")
    train: str
    lora_rank: int | None
    lora_alpha: float | None
    lora_targets: str | None  # a `LORA_TARGETS` name (None: no LoRA)
    resolution: int | None
    classes: list[dict]
    prompt_template: str
    training_config: dict
    files: dict[str, str]  # file name → sha256
    sha256: str  # of skindual_adapter.json, which names every file's hash: the adapter's identity
    prompt_attributes: dict | None = None  # class → [[site, age, sex, count], ...] of the training data


def save_adapter(folder: str | Path, unet, layout: str, base_model: str | Path, training_config: dict,
                 train: str = "lora", resolution: int | None = None,
                 prompt_template: str = DEFAULT_TEMPLATE, prompt_attributes: dict | None = None,
                 fingerprint: str = "") -> AdapterInfo:
    """Write the adapter folder of an (unwrapped) UNet prepared by `prepare_unet`.  `prompt_template` and
    `prompt_attributes` (per class, the (site, age, sex) counts of the training data) are what generation
    builds its prompts from; `fingerprint` (the fine-tuning run's) marks the run that wrote it as done.

    Every file is written under a temp name and moved in with `os.replace`; the json (which
    holds every file's sha256) goes last, so a folder with a json is complete.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    check_layout(layout)
    check_train(train)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".adapter-", dir=folder))
    lora = None
    try:
        if train == "lora":
            config = unet.peft_config["default"]
            targets = next((name for name, modules in LORA_TARGETS.items() if set(modules) == set(config.target_modules)),
                           None)
            if targets is None:
                raise ValueError(f"the UNet's LoRA adapts {sorted(config.target_modules)}, none of LORA_TARGETS")
            lora = {"rank": int(config.r), "alpha": float(config.lora_alpha), "targets": targets,
                    "target_modules": LORA_TARGETS[targets]}
            # diffusers writes only the attention projections' keys as ``lora.down``/``lora.up``, and its loader
            # converts a file from that form only when the first key is in it: every key is written in it
            layers = {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v
                      for k, v in convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)).items()}
            StableDiffusionPipeline.save_lora_weights(
                tmp, unet_lora_layers={k: v.detach().cpu().contiguous() for k, v in layers.items()},
                weight_name=LORA_FILE, unet_lora_adapter_metadata=_stable(config.to_dict()))
            _sort_safetensors_metadata(tmp / LORA_FILE)
            if layout == "channels":
                convs = {f"{name}.{p}": getattr(getattr(unet, name), p).detach().cpu().contiguous()
                         for name in ("conv_in", "conv_out") for p in ("weight", "bias")}
                save_file(convs, tmp / CONVS_FILE)
        else:
            save_file({k: v.detach().cpu().contiguous() for k, v in unet.state_dict().items()}, tmp / UNET_FILE)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir())}
        meta = adapter_record(base_model, layout, train, training_config, files, resolution, prompt_template,
                              prompt_attributes, fingerprint, lora)
        write_adapter_json(tmp, meta)
        (folder / ADAPTER_JSON).unlink(missing_ok=True)  # a half-replaced folder never looks complete
        for name in (LORA_FILE, CONVS_FILE, UNET_FILE):
            if name in files:
                os.replace(tmp / name, folder / name)
            else:  # left over from an earlier save of another kind
                (folder / name).unlink(missing_ok=True)
        os.replace(tmp / ADAPTER_JSON, folder / ADAPTER_JSON)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return load_adapter(folder)


def adapter_record(base_model: str | Path, layout: str | None, train: str, training_config: dict, files: dict[str, str],
                   resolution: int | None = None, prompt_template: str = DEFAULT_TEMPLATE,
                   prompt_attributes: dict | None = None, fingerprint: str = "", lora: dict | None = None) -> dict:
    """The content of ``skindual_adapter.json``: what was trained on which base, how generation prompts it, and
    `files` (name → sha256: every file of the folder)."""
    return {
        "format": ADAPTER_FORMAT, "base_model": str(base_model), "layout": layout, "train": train, "lora": lora,
        "resolution": resolution if resolution is not None else training_config.get("resolution"),
        "classes": [{"code": c.code, "index": c.index, "name": c.name} for c in CLASSES],
        "prompt_template": prompt_template,
        "prompt_attributes": prompt_attributes,
        "training_config": training_config,
        "fingerprint": fingerprint,  # of the settings that shaped the weights: a finished run's marker
        "versions": {name: version(name) for name in ("torch", "diffusers", "peft")},
        "files": files,
    }


def write_adapter_json(folder: Path, meta: dict) -> None:
    (folder / ADAPTER_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")


ADAPTER_REDO = "re-download the adapter folder or re-train it"


def adapter_files(meta: object, where: str) -> dict[str, str]:
    """The ``files`` of an adapter's json (file name → sha256), each a plain file name inside the adapter
    folder or its `CONTROLNET_DIR` folder: a name with another folder, ``..`` or an absolute path (which would read
    or fetch a file outside it) is one `UserError` naming `where`."""
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or not all(isinstance(n, str) and isinstance(d, str) for n, d in files.items()):
        raise UserError(f"{where}: no table of the adapter's files and their sha256; {ADAPTER_REDO}")
    for name in files:
        folder, _, plain = name.rpartition("/")
        if folder not in ("", CONTROLNET_DIR) or plain in ("", ".", "..", ADAPTER_JSON) or any(c in plain for c in "\\\0"):
            raise UserError(f"{where} names the file {name!r}, which is not a plain file name inside the adapter "
                            f"folder; {ADAPTER_REDO}")
    return dict(files)


def load_adapter(folder: str | Path) -> AdapterInfo:
    """Read ``skindual_adapter.json`` and verify the sha256 of every file it names (plain names inside
    `folder` only, `adapter_files`)."""
    folder = Path(folder)
    path = folder / ADAPTER_JSON
    redo = ADAPTER_REDO
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} is missing: {folder} is not a complete skindual adapter; {redo}") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is unreadable ({e}); {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != ADAPTER_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise UserError(f"{path}: not a skindual adapter (format {found!r}); {redo}")
    files = adapter_files(meta, str(path))
    if meta.get("train") != "controlnet":  # a ControlNet has no joint layout
        check_layout(meta["layout"])
    for name, digest in files.items():
        if not (folder / name).is_file():
            raise UserError(f"adapter file {folder / name} is missing; {redo}")
        if file_sha256(folder / name) != digest:
            raise UserError(f"adapter file {folder / name} is corrupted (sha256 does not match "
                            f"{ADAPTER_JSON}); {redo}")
    lora = meta.get("lora") or {}
    return AdapterInfo(
        folder=folder, base_model=meta["base_model"], layout=meta["layout"], train=meta["train"],
        lora_rank=lora.get("rank"), lora_alpha=lora.get("alpha"), resolution=meta.get("resolution"),
        lora_targets=lora.get("targets", "attention") if lora else None,
        classes=meta["classes"], prompt_template=meta["prompt_template"],
        training_config=meta["training_config"], files=files, sha256=file_sha256(path),
        prompt_attributes=meta.get("prompt_attributes"),
    )


def adapter_misfit(info: AdapterInfo, base_model: str | Path, s3_endpoint: str | None = None) -> str | None:
    """Why the adapter's tensors cannot load into `base_model`'s UNet (its first-level width or its
    cross-attention width differ), or None when they fit.  Reads configs and tensor headers only."""
    from safetensors import safe_open

    config = base_config(base_model, "unet", s3_endpoint)
    width, cross = config["block_out_channels"][0], config["cross_attention_dim"]
    shapes: dict[str, list[int]] = {}
    for name in (CONVS_FILE, LORA_FILE, UNET_FILE):
        if name in info.files:
            with safe_open(str(info.folder / name), "pt") as f:
                shapes |= {k: f.get_slice(k).get_shape() for k in f.keys()}
    for key, shape in shapes.items():
        if key.endswith("conv_in.weight") and shape[0] != width:
            return f"its conv_in has {shape[0]} output channels, the base UNet's first level {width}"
        if "attn2.to_k" in key and ("lora.down" in key or "lora_A" in key) and shape[1] != cross:
            return f"its LoRA expects cross-attention width {shape[1]}, the base UNet has {cross}"
        if key.endswith("attn2.to_k.weight") and shape[1] != cross:
            return f"its UNet has cross-attention width {shape[1]}, the base UNet {cross}"
    return None


def apply_adapter(pipe, info: AdapterInfo, fuse: bool = True) -> None:
    """Load an adapter (already verified by `load_adapter`) into a base pipeline, in place."""
    if info.layout == "channels":
        widen_unet(pipe.unet)
    if UNET_FILE in info.files:
        pipe.unet.load_state_dict(load_file(info.folder / UNET_FILE), strict=True)
    if CONVS_FILE in info.files:
        missing, unexpected = pipe.unet.load_state_dict(load_file(info.folder / CONVS_FILE), strict=False)
        if unexpected:
            raise UserError(f"{info.folder / CONVS_FILE}: unexpected tensors {unexpected}")
    if LORA_FILE in info.files:  # the UNet's LoRA only: an adapter holds none for the text encoder
        state, alphas, metadata = pipe.lora_state_dict(str(info.folder), weight_name=LORA_FILE,
                                                       return_lora_metadata=True)
        pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, metadata=metadata)
        if fuse:
            pipe.fuse_lora(components=["unet"])
