"""Base-model names that are not a hub id or a folder: the shipped demo bases.

``--base-model demo`` names the tiny SD-2-shaped pipeline shipped as one safetensors artifact
(`ARTIFACT`: fp16 weights, with the configs and the tokenizer in its metadata); ``demo-hard`` the
same architecture pretrained on the hard demo world (`HARD_ARTIFACT`).  `resolve_base_model`
turns the name into a folder that ``StableDiffusionPipeline.from_pretrained`` loads, materialising the
artifact once per node into the cache (``$SKINDUAL_CACHE/demo_base/<sha256>``), lazily: each Ray
worker does it on first use.  Any other name passes through unchanged.  How the demo base is
pretrained lives with the demo world (`skindual.demo_model`); this module only reads the artifact.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from skindual.errors import UserError
from skindual.storage import cache_root, file_sha256

DEMO_BASE = "demo"
"""The --base-model value (and an adapter's recorded base) naming the shipped demo base."""
ARTIFACT = Path(__file__).parent / "assets" / "demo_base.safetensors"
HARD_ARTIFACT = Path(__file__).parent / "assets" / "demo_base_hard.safetensors"
DEMO_BASES = {DEMO_BASE: ARTIFACT, "demo-hard": HARD_ARTIFACT}
"""Each demo base's name and artifact (the hard one: pretrained on the hard demo world)."""
REBUILD_COMMAND = "python jobs/build_demo.py --rebuild"
CACHE_FOLDER = "demo_base"  # under cache_root(): one folder per artifact hash


def build_components(configs: dict[str, dict], seed: int = 0) -> dict:
    """Freshly initialised SD-2-style components (CLIP text encoder, `AutoencoderKL`,
    `UNet2DConditionModel`, DDIM scheduler) from their configs."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    return {
        "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])).eval(),
        "vae": AutoencoderKL(**configs["vae"]),
        "unet": UNet2DConditionModel(**configs["unet"]),
        "scheduler": DDIMScheduler(**configs["scheduler"]),
    }


def assemble_pipeline(components: dict, tokenizer):
    """A `StableDiffusionPipeline` of the given components, without a safety checker."""
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(
        tokenizer=tokenizer, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        **components,
    )


def artifact_metadata(path: str | Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata()


def artifact_tokenizer(path: str | Path = ARTIFACT):
    """The CLIP BPE tokenizer stored in an artifact's metadata (the demo base's: every prompt word one token)."""
    from transformers import CLIPTokenizer

    tok = json.loads(artifact_metadata(path)["tokenizer"])
    return CLIPTokenizer(vocab=tok["vocab"], merges=[tuple(m) for m in tok["merges"]], model_max_length=77)


def pipeline_from_artifact(path: str | Path = ARTIFACT):
    """The demo base pipeline (fp32) straight from its artifact file."""
    from safetensors.torch import load_file

    configs = json.loads(artifact_metadata(path)["configs"])
    tokenizer = artifact_tokenizer(path)
    components = build_components(configs)
    tensors = load_file(str(path))
    for name in ("text_encoder", "vae", "unet"):
        prefix = f"{name}."
        state = {k[len(prefix):]: v.float() for k, v in tensors.items() if k.startswith(prefix)}
        components[name].load_state_dict(state, strict=True)
    return assemble_pipeline(components, tokenizer)


def demo_base_path(artifact: str | Path = ARTIFACT, cache: Path | None = None) -> Path:
    """A `from_pretrained`-loadable folder of the demo base, materialised once per artifact hash."""
    if not Path(artifact).is_file():
        raise UserError(f"demo base artifact {artifact} not found; restore it (git checkout skindual/assets) "
                        f"or rebuild it with `{REBUILD_COMMAND}`")
    digest = file_sha256(artifact)[:16]
    target = (cache or cache_root()) / CACHE_FOLDER / digest
    if (target / "model_index.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
    pipeline_from_artifact(artifact).save_pretrained(tmp, safe_serialization=True)
    try:
        os.rename(tmp, target)
    except OSError:  # another process materialised it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def demo_alias(model: str | Path) -> str | None:
    """The demo base `model` names, the alias or a cache folder an artifact was materialised into; else None."""
    if str(model) in DEMO_BASES:
        return str(model)
    if Path(str(model)).parent.name == CACHE_FOLDER:
        digest = Path(str(model)).name
        named = [n for n, a in DEMO_BASES.items() if a.is_file() and file_sha256(a)[:16] == digest]
        return named[0] if named else DEMO_BASE
    return None


def is_demo_base(model: str | Path) -> bool:
    """Whether `model` names a demo base: an alias, or a folder one was materialised into."""
    return demo_alias(model) is not None


def demo_base_id(name: str = DEMO_BASE) -> str:
    """How outputs name a demo base: ``demo@<first 16 hex digits of the artifact's sha256>``."""
    return f"{name}@{file_sha256(DEMO_BASES[name])[:16]}"


def resolve_base_model(model: str | Path) -> str:
    """A demo base's name → its cached folder; any other id or folder as given."""
    name = str(model)
    if name not in DEMO_BASES:
        return name
    if name != DEMO_BASE and not DEMO_BASES[name].is_file():
        raise UserError(f"--base-model {name}: its artifact {DEMO_BASES[name]} is not there; restore it (git "
                        f"checkout skindual/assets) or rebuild it with `{REBUILD_COMMAND} --difficulty hard --vae-steps "
                        f"2000 --vae-colour-weight 4 --vae-lesion-weight 8 --artifact {DEMO_BASES[name]}` (the shipped "
                        "one's recipe)")
    return str(demo_base_path(DEMO_BASES[name]))
