"""Generation: the prompt table → Ray Data → a pool of generator actors → WebDataset shards.

`plan_generate(config)` resolves and checks the run before any cluster work (the model, the output:
`shards.guard_output`, same settings resume, other settings refuse unless ``--overwrite``; the shards
still to do; whether the run is done).  `run_generate(plan)` resolves the devices from the cluster and
maps a Ray Dataset with ONE ROW PER SHARD still to do (the shard's number and its prompt rows,
`shard_items`) through two stages:

1. `ShardGenerator`, a pool of ``--actors`` actors (``--num-gpus-per-actor`` each) that load the
   `DualPipeline` once and, per shard, sample its rows in mini-batches of ``--batch-size`` in row
   order, run quality control on every pair, and encode the accepted pairs in a small thread
   pool while the next mini-batch runs;
2. `write_shard_rows`, light CPU tasks that build the tar and parquet and upload them, so the
   generators never wait for tar building or uploads.

Seeds come from (run seed, row id, attempt) only, and a shard's mini-batches have a fixed
composition, so the same settings give the same bytes, however the work was spread over actors or
interrupted (on the same kind of device and the same library versions; float results differ
between GPU models).  The output's fingerprint covers every setting that changes bytes, batch
size and CPU thread count included, but not --actors, --output or --classes order.

Model: with no --base-model, the adapter's base, else the shipped demo base; with no --adapter, the
bare base model (a warning: its mask channel is untrained).  jobs/generate.py fills the embedded
default first: with neither flag, the shipped demo adapter.  Ray workers take S3 credentials from
their own environment, and a local --output only works on one node or a shared file system.

Settings travel to the actors as the frozen `GenerateConfig` itself, with its automatic values
(``--num-gpus-per-actor -1``, ``--dtype auto``) resolved by the driver, and the `ModelSpec`.
Every field is declared once as fingerprinted (it changes the output's bytes), resolved (it enters
the fingerprint through the resolved model, counts or device) or neither; `config_fingerprint_fields`
builds the fingerprint from those declarations.

Mask mode (``--mask-source URL``, `skindual.mask_source`): each prompt row is given one of a prepared real
dataset's train masks of its class, varied by a seeded augmentation, and the site, age and sex of that mask's
row; the pipeline samples only the image, its mask latents held to the noised encoding of the given mask at
every step, so the shard's mask is the given mask exactly.  The masks are read once on the driver and travel
with their shard; each pair's json records ``mode``, ``source_key`` and ``augmentation_seed``.

Quality control and exact counts: a pair whose mask is empty, full-frame or fragmented
(`quality.mask_check`, thresholds from the config) is drawn again with the row's next seed,
``row_seed(seed, row_id, attempt)``, up to ``--max-attempts`` draws in all; with ``--qc-segmenter``
each pair is also scored by the Dice between its mask and a segmenter's mask of its image
(`qc_model.QCSegmenter`), recorded in its json and the parquet, and below ``--min-consistency`` it
is drawn again (reason ``inconsistent``); a kept pair also gets its ignore map (``{key}.ignore.png``, where
the segmenter confidently contradicts the mask, `qc_model.ignore_maps`) and that map's share of its pixels
(``disagreement``).  Every failed draw's
reason is kept in the shard parquet (``rejections``); a row that fails every draw is stored as
``rejected`` (parquet only, not in the tar).  The classes must come out with exactly the asked
counts, so such a row is never silently dropped nor replaced by an extra row: the run ends with
a `UserError` giving the short classes and how to fix it (more attempts or looser thresholds).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skindual import __version__
from skindual.base_models import DEMO_BASE, adapter_base, base_id, is_demo_base
from skindual.cli import Progress, check_fields, check_interrupt, option, worker_setup
from skindual.cluster import ClusterShape, check_accelerator, check_shared_paths, resolve_gpus
from skindual.errors import UserError
from skindual.mask_source import MaskSource, given_mask, load_masks, plan_mask_source, source_table
from skindual.model import ADAPTER_JSON, DualPipeline, adapter_files, adapter_misfit, load_adapter
from skindual.qc_model import Judgement, QCSegmenter
from skindual.prompts import (DEFAULT_TEMPLATE, MAX_SAMPLES_PER_SHARD, attribute_pools, parse_per_class, prompt_table,
                              row_seed)
from skindual.quality import MASK_SMOOTHING, MaskLimits, mask_check
from skindual.shards import (MANIFEST_FILE, Sample, check_output, committed_shards, encode_sample, guard_output,
                             intact_shards, read_run_config, read_stats, write_run_files, write_shard)
from skindual.storage import Storage, finished, is_remote, open_storage, output_storage

log = logging.getLogger(__name__)

DTYPES = ("auto", "fp32", "fp16", "bf16")
_LIMITS = MaskLimits()


@dataclass(frozen=True)
class GenerateConfig:
    per_class: str = option("100", "pairs per class (5000), or per class (df=5000,vasc=4000) to top up rare classes")
    classes: str = option("", "comma-separated class codes; empty: all seven")
    adapter: str = option("", "adapter folder or s3:// prefix from the finetune job; empty (jobs/generate.py, "
                              "no --base-model either): the shipped demo adapter")
    base_model: str = option("", "the base pipeline: a base staged by jobs/stage_base.py (s3:// prefix or folder), a "
                                 "Hugging Face Hub id or a diffusers folder; empty: the adapter's base model (when it is a "
                                 "demo base, a staged base or a known SD-2 id), else 'demo' (the shipped demo base)")
    output: str = option("skindual-synthetic", "output folder or s3://bucket/prefix")
    samples_per_shard: int = option(0, "pairs per WebDataset shard; 0: the fewest shards of at most 1,000 pairs "
                                       "that come in whole waves of --actors, so no actor idles at the end "
                                       "(chosen on the first run, kept by reruns)")
    actors: int = option(1, "generator actors")
    num_gpus_per_actor: float = option(-1.0, "GPUs per actor (fractions share one); -1: 1 if the cluster has or its "
                                             "autoscaler can launch GPU nodes, else 0 (CPU)")
    accelerator_type: str = option("", "the GPU model every actor runs on (Ray's accelerator_type, e.g. A10G, L4, H100); "
                                       "needed on a cluster with several: sampled bytes differ between models")
    cpus_per_actor: float = option(1.0, "CPUs per actor (also torch's thread count on CPU)")
    batch_size: int = option(8, "pairs per sampling mini-batch")
    steps: int = option(25, "sampling steps")
    guidance: float = option(4.0, "classifier-free guidance scale (1: off)")
    scheduler: str = option("ddim", "sampling scheduler", choices=["ddim", "dpm", "euler"])
    qc_segmenter: str = option("", "consistency QC: the segmenter jobs/qc_model.py trained on the real data (folder "
                                   "or s3:// prefix); each pair is scored by the Dice between its mask and the "
                                   "segmenter's mask of its image")
    min_consistency: float = option(0.0, "with --qc-segmenter: draw a pair again (reason 'inconsistent') when its "
                                         "score is below this; 0: score and record only")
    mask_source: str = option("", "images for given masks: a prepared real dataset (jobs/prepare.py), folder or "
                                  "s3:// prefix; each row is given one of its train split's masks of the row's "
                                  "class, varied by a seeded augmentation (flips, rotation, scale, shift, elastic), "
                                  "and that mask's site, age and sex; only the image is sampled, the mask held "
                                  "to it.  Empty: image and mask sampled together")
    mask_fraction: float = option(1.0, "with --mask-source: only the masks of a seeded share of each class of its "
                                       "train split (seed 0: the fine-tune's and evaluation's --real-fraction cut)")
    prompt_attributes: str = option("adapter", "adapter: each row's body site, age and sex drawn by its seed from "
                                               "the adapter's training data (per class), in its prompt template; "
                                               "none: the class alone", choices=["adapter", "none"])
    mask_smoothing: float = option(MASK_SMOOTHING, "σ of the Gaussian that smooths each decoded mask before its "
                                                   "threshold, in latent cells (× the VAE's scale factor in "
                                                   "pixels: 6 px at SD-2's 512²); "
                                                   "removes the VAE's spiky mask edges; 0: off")
    dtype: str = option("auto", "model dtype; auto: fp16 on GPU, fp32 on CPU", choices=list(DTYPES))
    seed: int = option(0, "run seed: every pair's seed derives from it and the pair's row id")
    image_format: str = option("jpg", "image encoding in the tars", choices=["jpg", "png"])
    max_attempts: int = option(8, "draws per pair before it counts as rejected (quality control)")
    min_mask_area: float = option(_LIMITS.min_area, "QC: a smaller mask (share of the image) is 'empty'")
    max_mask_area: float = option(_LIMITS.max_area, "QC: a larger mask is 'full-frame'")
    min_main_share: float = option(_LIMITS.min_main_share, "QC: the largest mask component's least share, else 'fragmented'")
    overwrite: bool = option(False, "replace an output written with other settings")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("actors", "batch_size", "steps", "max_attempts"))
        if not 0 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise UserError(f"--samples-per-shard {self.samples_per_shard}: must be between 1 and "
                            f"{MAX_SAMPLES_PER_SHARD} (or 0: chosen from the pair count and --actors)")
        if self.guidance < 0:
            raise UserError(f"--guidance {self.guidance}: must not be negative")
        if not 0 <= self.mask_smoothing <= 4:
            raise UserError(f"--mask-smoothing {self.mask_smoothing}: must be between 0 (off) and 4 latent cells")
        if self.cpus_per_actor <= 0 or (self.num_gpus_per_actor < 0 and self.num_gpus_per_actor != -1):
            raise UserError("--cpus-per-actor must be positive and --num-gpus-per-actor 0 or more (or -1: auto)")
        if not 0 <= self.min_mask_area < self.max_mask_area <= 1 or not 0 <= self.min_main_share <= 1:
            raise UserError(f"--min-mask-area {self.min_mask_area} / --max-mask-area {self.max_mask_area} / "
                            f"--min-main-share {self.min_main_share}: need 0 <= min < max <= 1 and a share in [0, 1]")
        if not 0 < self.mask_fraction <= 1 or (self.mask_fraction < 1 and not self.mask_source):
            raise UserError(f"--mask-fraction {self.mask_fraction}: must be in (0, 1], and below 1 needs --mask-source")
        if not 0 <= self.min_consistency <= 1 or (self.min_consistency and not self.qc_segmenter):
            raise UserError(f"--min-consistency {self.min_consistency}: must be in [0, 1], and above 0 needs "
                            "--qc-segmenter")
        self.counts()  # --per-class / --classes errors name the flag

    def counts(self) -> dict[str, int]:
        """The asked pairs per class, in class-index order."""
        classes = [c.strip() for c in self.classes.split(",") if c.strip()] or None
        return parse_per_class(self.per_class, classes)

    def limits(self) -> MaskLimits:
        return MaskLimits(self.min_mask_area, self.max_mask_area, self.min_main_share)

    @property
    def device(self) -> str:
        """"cuda" or "cpu", once `resolve_devices` has set ``num_gpus_per_actor``."""
        return "cuda" if self.num_gpus_per_actor > 0 else "cpu"


FINGERPRINTED = ("seed", "samples_per_shard", "steps", "guidance", "scheduler", "mask_smoothing", "dtype",
                 "image_format", "batch_size", "max_attempts", "min_mask_area", "max_mask_area", "min_main_share",
                 "prompt_attributes", "min_consistency", "mask_fraction")
"""Fields whose value changes the output's bytes, entered into the run's fingerprint as they are."""
RESOLVED = ("per_class", "classes", "adapter", "base_model", "num_gpus_per_actor", "cpus_per_actor", "qc_segmenter",
            "accelerator_type", "mask_source")
"""Fields that enter the fingerprint through what they resolve to: the per-class counts, the model
(`ModelSpec`, the QC segmenter's identity too), the given masks (`MaskSource.digest`), the device and its
model, and on CPU the torch thread count."""
NOT_FINGERPRINTED = ("output", "actors", "overwrite", "s3_endpoint")
"""Fields that never change the bytes of a shard."""
_declared = FINGERPRINTED + RESOLVED + NOT_FINGERPRINTED
if sorted(_declared) != sorted(f.name for f in dataclasses.fields(GenerateConfig)) or len(set(_declared)) != len(_declared):
    raise TypeError("every GenerateConfig field must be declared once in FINGERPRINTED, RESOLVED or NOT_FINGERPRINTED")


# --------------------------------------------------------------------------- quality control

GenerateFn = Callable[[list[str], list[int]], tuple[np.ndarray, np.ndarray]]
"""(prompts, seeds) → (uint8 images N×H×W×3, uint8 masks N×H×W 0/1)."""


JudgeFn = Callable[[np.ndarray, np.ndarray], Judgement]
"""(uint8 images N×H×W×3, masks N×H×W) → each pair's image–mask consistency (Dice, 0..1), ignore map and
disagreement (`qc_model.QCSegmenter.judge`)."""


def generate_samples(rows: Sequence[dict], generate: GenerateFn, run_seed: int, batch_size: int,
                     max_attempts: int, limits: MaskLimits, image_format: str = "jpg",
                     encoder: Executor | None = None, judge: JudgeFn | None = None,
                     min_consistency: float = 0.0) -> list[Sample]:
    """The samples of one shard's prompt rows, quality-controlled and encoded, in row order.

    Draw 0 uses each row's table seed; rows whose mask fails `mask_check`, or (with `judge`) whose
    consistency is below `min_consistency` (reason ``inconsistent``), are drawn again with
    ``row_seed(run_seed, row_id, attempt)``, in mini-batches of the failed rows in row order, up to
    `max_attempts` draws.  A kept pair records its consistency, its ignore map and the map's share of
    its pixels.  Accepted pairs are encoded on `encoder` while the next mini-batch runs.  `generate`
    gets the rows and seeds and gives back images and masks (mask mode: the rows' given masks).
    """
    done: dict[int, Future | Sample] = {}
    failures: dict[int, list[str]] = {r["row_id"]: [] for r in rows}
    last: dict[int, tuple[int, int, int, float, float | None]] = {}  # row id → (seed, h, w, area, score)
    pending, pool = list(rows), encoder or ThreadPoolExecutor(2)
    try:
        for attempt in range(max_attempts):
            failed = []
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                seeds = [r["seed"] if attempt == 0 else row_seed(run_seed, r["row_id"], attempt) for r in chunk]
                images, masks = generate(chunk, seeds)
                said = judge(images, masks) if judge is not None else None
                for i, (row, seed, image, mask) in enumerate(zip(chunk, seeds, images, masks)):
                    reason, rid = mask_check(mask, limits), row["row_id"]
                    consistency = None if said is None else round(float(said.consistency[i]), 6)
                    if reason is None and consistency is not None and consistency < min_consistency:
                        reason = "inconsistent"
                    if reason is None:
                        extra = {} if said is None else {"ignore": said.ignore[i],
                                                         "disagreement": round(float(said.disagreement[i]), 6)}
                        sample = _sample(row, seed, attempt + 1, failures[rid], image=image, mask=mask,
                                         consistency=consistency, **extra)
                        done[rid] = pool.submit(encode_sample, sample, image_format)
                    else:
                        failures[rid].append(reason)
                        last[rid] = (seed, *mask.shape[:2], float(mask.mean()), consistency)
                        failed.append(row)
            pending = failed
            if not pending:
                break
        for row in pending:
            seed, height, width, area, consistency = last[row["row_id"]]
            done[row["row_id"]] = _sample(row, seed, max_attempts, failures[row["row_id"]], status="rejected",
                                          reason=failures[row["row_id"]][-1], height=height, width=width, area=area,
                                          consistency=consistency)
        return [s.result() if isinstance(s, Future) else s for s in (done[r["row_id"]] for r in rows)]
    finally:
        if encoder is None:
            pool.shutdown()


def _sample(row: dict, seed: int, attempts: int, rejections: list[str], **kwargs: Any) -> Sample:
    fields = {"image": None, "mask": None, **kwargs}
    if row.get("source_key"):
        fields |= {"mode": "mask", "source_key": row["source_key"], "augmentation_seed": row["augmentation_seed"]}
    return Sample(key=row["key"], row_id=row["row_id"], class_code=row["class_code"], class_index=row["class_index"],
                  prompt=row["prompt"], seed=seed, attempts=attempts, rejections=list(rejections), **fields)


# --------------------------------------------------------------------------- model

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
    torch 2 is SDPA)."""
    import torch

    adapter = fetch_adapter(spec.adapter, cfg.s3_endpoint or None, tmp) if spec.adapter else None
    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[cfg.dtype]
    pipe = DualPipeline.from_pretrained(spec.base_model, adapter, device=cfg.device, dtype=torch_dtype,
                                        scheduler=cfg.scheduler, layout=spec.layout, resolution=spec.resolution,
                                        s3_endpoint=cfg.s3_endpoint or None)
    if pipe.adapter is not None and pipe.adapter.sha256 != spec.adapter_sha256:
        raise RuntimeError(f"adapter {spec.adapter} changed while the run started; rerun the job")
    return pipe


# --------------------------------------------------------------------------- the Ray stages

SAMPLE_STRUCT = pa.struct([
    ("key", pa.string()), ("row_id", pa.int64()), ("class_code", pa.string()), ("class_index", pa.int8()),
    ("prompt", pa.string()), ("seed", pa.int64()), ("attempts", pa.int32()), ("status", pa.string()),
    ("reason", pa.string()), ("rejections", pa.list_(pa.string())), ("image_bytes", pa.large_binary()),
    ("mask_bytes", pa.large_binary()), ("encoded_format", pa.string()), ("height", pa.int32()),
    ("width", pa.int32()), ("area", pa.float64()), ("consistency", pa.float64()), ("ignore_bytes", pa.large_binary()),
    ("disagreement", pa.float64()), ("mode", pa.string()), ("source_key", pa.string()),
    ("augmentation_seed", pa.int64()),
])


def shard_items(table: pa.Table, shards: list[int], masks: dict[str, bytes] | None = None) -> list[dict]:
    """The generation dataset's rows: per shard its number, its prompt rows (JSON) and, in mask mode, each
    row's given mask (the real pair's ``seg.png`` bytes, from `masks`: source key → bytes).  The rows travel
    with the shard they belong to, so an actor holds the rows of the shard it samples, not the whole
    table (35,000 rows at ``--per-class 5000``), and a shard retried elsewhere brings its rows along."""
    rows: dict[int, list[dict]] = {s: [] for s in shards}
    for row in table.to_pylist():
        if row["shard"] in rows:
            rows[row["shard"]].append(row)
    return [{"shard": s, "rows": json.dumps(rows[s]),
             "masks": [masks[r["source_key"]] for r in rows[s]] if masks is not None else []} for s in shards]


class ShardGenerator:
    """Stage 1 (an actor): loads the pipeline once; per input row (`shard_items`: a shard's number and
    prompt rows) returns the shard's encoded samples as one row ``{"shard", "samples"}``.  `cfg` has its
    devices resolved (`resolve_devices`)."""

    def __init__(self, cfg: GenerateConfig, spec: ModelSpec, counter=None):
        import torch

        worker_setup()
        self.cfg, self.counter = cfg, counter
        if cfg.device == "cuda":
            if not torch.cuda.is_available():
                raise UserError(f"a generator actor was given GPU(s) {ray_gpu_ids()} but CUDA is unusable there "
                                "(torch.cuda.is_available() is False): check the node's NVIDIA driver against "
                                f"torch {torch.__version__}'s CUDA {torch.version.cuda}")
            torch.backends.cudnn.benchmark = False  # the same kernels every run: reproducible bytes
            self.device_name = torch.cuda.get_device_name()
        else:
            torch.set_num_threads(cpu_threads(cfg))
            self.device_name = "cpu"
        self._tmp = tempfile.TemporaryDirectory(prefix="skindual-adapter-")
        self._given: dict[int, np.ndarray] = {}  # mask mode: the current shard's given masks by row id
        self.pipe = load_generator(spec, cfg, self._tmp.name)
        self.encoder = ThreadPoolExecutor(2)
        self.qc = None
        if cfg.qc_segmenter:
            self.qc = QCSegmenter.load(cfg.qc_segmenter, cfg.s3_endpoint or None, cfg.device)
            if self.qc.sha256 != spec.qc_sha256:
                raise RuntimeError(f"QC segmenter {cfg.qc_segmenter} changed while the run started; rerun the job")

    def _generate(self, rows: list[dict], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        given = np.stack([self._given[r["row_id"]] for r in rows]) if self._given else None
        out = self.pipe([r["prompt"] for r in rows], seeds, steps=self.cfg.steps, guidance=self.cfg.guidance,
                        mask_smoothing=self.cfg.mask_smoothing, masks=given)
        if self.counter is not None:  # draws made, for the driver's progress lines (fire and forget)
            self.counter.add.remote(len(rows))
        return out.images, out.masks

    def __call__(self, batch: pa.Table) -> pa.Table:
        (shard,) = batch.column("shard").to_pylist()
        (rows,) = [json.loads(r) for r in batch.column("rows").to_pylist()]
        (masks,) = batch.column("masks").to_pylist() if "masks" in batch.column_names else [[]]
        cfg = self.cfg
        self._given = {}
        for row, png in zip(rows, masks or []):  # mask mode: each row's real mask, resized and augmented
            self._given[row["row_id"]], row["augmentation_seed"] = given_mask(png, self.pipe.resolution,
                                                                              row["augmentation_seed"], cfg.limits())
        samples = generate_samples(rows, self._generate, cfg.seed, cfg.batch_size, cfg.max_attempts, cfg.limits(),
                                   cfg.image_format, self.encoder, self.qc.judge if self.qc else None,
                                   cfg.min_consistency)
        records = [{f: getattr(x, f) for f in SAMPLE_STRUCT.names} for x in samples]
        return pa.table({"shard": pa.array([shard], pa.int32()),
                         "samples": pa.array([records], pa.list_(SAMPLE_STRUCT)),
                         "device": pa.array([self.device_name])})


class DrawCounter:
    """A small Ray actor the generator actors tell how many pairs they drew: the driver's progress between shards.
    A redraw counts again, so the count can pass the pairs asked for before the last shards are written."""

    def __init__(self) -> None:
        self.drawn = 0

    def add(self, n: int) -> None:
        self.drawn += n

    def count(self) -> int:
        return self.drawn


def ray_gpu_ids() -> list:
    import ray

    return ray.get_gpu_ids()


def write_shard_rows(batch: pa.Table, storage: Storage, run_info: dict) -> dict[str, np.ndarray]:
    """Stage 2 (CPU tasks): write the shard of each row (its stats naming the device that sampled it);
    return its numbers for progress."""
    rows = []
    for shard, records, device in zip(batch.column("shard").to_pylist(), batch.column("samples").to_pylist(),
                                      batch.column("device").to_pylist()):
        samples = [Sample(image=None, mask=None, **r) for r in records]
        stats = write_shard(storage, shard, samples, run_info | {"device": device})
        rows.append((shard, stats.count, stats.successes, sum(len(x.rejections) for x in samples)))
    return dict(zip(("shard", "count", "successes", "redraws"), np.asarray(rows, dtype=np.int64).reshape(-1, 4).T))


# --------------------------------------------------------------------------- the driver

SHARD_PAIRS = 1000
"""The most pairs `auto_samples_per_shard` puts in a shard (about 100 MB of tar at 512²)."""


def auto_samples_per_shard(pairs: int, actors: int, most: int = SHARD_PAIRS) -> int:
    """Pairs per shard for `pairs` on `actors`: the fewest shards of at most `most` pairs that is a
    multiple of `actors`, filled evenly, so that the last wave keeps every actor busy (a shard is the
    unit of work, and 35 shards on 16 actors would leave 13 of them idle through the third wave)."""
    shards = math.ceil(math.ceil(pairs / most) / actors) * actors
    return max(1, math.ceil(pairs / shards))


def busy_share(shard_sizes: Sequence[int], actors: int) -> float:
    """The share of actor time that does work when `actors` take shards in order as they free up (each
    shard's time ∝ its pairs, as Ray Data's actor pool with one task in flight per actor runs them)."""
    free = [0.0] * actors
    for size in shard_sizes:
        free[free.index(min(free))] += size
    return sum(shard_sizes) / (actors * max(free)) if shard_sizes else 1.0


def resolve_shard_size(cfg: GenerateConfig, storage: Storage) -> int:
    """--samples-per-shard, or for 0 the size a previous run of this output chose (so a rerun with
    other --actors resumes), else `auto_samples_per_shard`."""
    if cfg.samples_per_shard:
        return cfg.samples_per_shard
    previous = read_run_config(storage)
    if not cfg.overwrite and previous.get("samples_per_shard"):
        return int(previous["samples_per_shard"])
    return auto_samples_per_shard(sum(cfg.counts().values()), cfg.actors)


def generation_prompts(cfg: GenerateConfig, spec: ModelSpec, masks: MaskSource | None = None) -> pa.Table:
    """The run's prompt table: class-balanced, in the adapter's template, each row's site, age and sex
    drawn by its seed from the adapter's training data (``--prompt-attributes adapter``, when it records them);
    in mask mode (`masks`), each row's given mask and that mask's site, age and sex (`mask_source.source_table`)."""
    if masks is not None:
        sources = source_table(masks, cfg.counts(), cfg.seed)
        if cfg.prompt_attributes == "none":
            sources = {c: [(key, (None, None, None)) for key, _ in rows] for c, rows in sources.items()}
        return prompt_table(cfg.counts(), cfg.seed, cfg.samples_per_shard, spec.prompt_template, sources=sources)
    pools = attribute_pools(spec.prompt_attributes) if cfg.prompt_attributes == "adapter" and spec.prompt_attributes else None
    return prompt_table(cfg.counts(), cfg.seed, cfg.samples_per_shard, spec.prompt_template, pools)


def cpu_threads(cfg: GenerateConfig) -> int:
    """torch's thread count in a CPU actor: its reserved CPUs."""
    return max(1, int(cfg.cpus_per_actor))


def resolve_devices(cfg: GenerateConfig, shape: ClusterShape) -> GenerateConfig:
    """`cfg` with ``--num-gpus-per-actor -1`` (from the GPUs the cluster has or can launch), ``--accelerator-type``
    (the one GPU model it offers, when it offers one) and ``--dtype auto`` resolved."""
    num_gpus = resolve_gpus(cfg.num_gpus_per_actor, "--num-gpus-per-actor", shape)
    accelerator = check_accelerator(cfg.accelerator_type, num_gpus, shape, require_one=True)
    dtype = cfg.dtype if cfg.dtype != "auto" else ("fp16" if num_gpus > 0 else "fp32")
    if num_gpus == 0 and dtype == "fp16":
        raise UserError("--dtype fp16 needs a GPU (--num-gpus-per-actor); use fp32 or bf16 on CPU")
    return replace(cfg, num_gpus_per_actor=float(num_gpus), dtype=dtype, accelerator_type=accelerator)


def fingerprint_config(cfg: GenerateConfig, spec: ModelSpec, masks: MaskSource | None = None) -> dict[str, Any]:
    """The settings that change the output's bytes, keyed like the flags (for `guard_output`'s message): the
    `FINGERPRINTED` fields as they are (numbers by their declared type), the `RESOLVED` ones through the counts
    and the model.  What samples them (the device model, on CPU the thread count) is known only once the
    cluster is, and is checked apart (`device_record`)."""
    types = {f.name: f.type for f in dataclasses.fields(GenerateConfig)}
    plain = {name: float(getattr(cfg, name)) if types[name] == "float" else getattr(cfg, name)
             for name in FINGERPRINTED}
    resolved = {"per_class": ",".join(f"{c}={n}" for c, n in cfg.counts().items()), "base_model": spec.base_id,
                "adapter": f"sha256:{spec.adapter_sha256}" if spec.adapter_sha256 else "none", "layout": spec.layout,
                "qc_segmenter": f"sha256:{spec.qc_sha256}" if spec.qc_sha256 else "none",
                "mask_source": f"sha256:{masks.digest}" if masks is not None else "none"}
    return plain | resolved


def device_record(cfg: GenerateConfig) -> str:
    """What samples a run's shards, as its output records it: ``cuda:<GPU model>`` (``cuda`` when the cluster
    does not say which), or the CPU with torch's thread count, which changes float results.  `cfg` has its
    devices resolved."""
    if cfg.device == "cuda":
        return f"cuda:{cfg.accelerator_type}" if cfg.accelerator_type else "cuda"
    return f"cpu:{cpu_threads(cfg)} threads"


def shard_run_info(cfg: GenerateConfig, spec: ModelSpec, fingerprint: str) -> dict[str, Any]:
    """`shards.write_shard`'s run_info: the settings every sample's json names."""
    return {"base_model": spec.base_id, "adapter_sha256": spec.adapter_sha256, "layout": spec.layout,
            "scheduler": cfg.scheduler, "steps": cfg.steps, "guidance": float(cfg.guidance),
            "fingerprint": fingerprint, "image_format": cfg.image_format}


@dataclass(frozen=True)
class GeneratePlan:
    """A generation run, resolved before any cluster work: the config (its shard size chosen), the model,
    the output, the fingerprint of the settings, the shards still to do, and whether the run is done (the
    finished run's manifest)."""

    config: GenerateConfig
    model: ModelSpec
    storage: Storage
    settings: dict[str, Any]
    fingerprint: str
    pairs: int
    shards: tuple[int, ...]
    todo: tuple[int, ...]
    done: dict | None
    masks: MaskSource | None = None  # mask mode: the given masks' dataset and rows


def plan_generate(cfg: GenerateConfig) -> GeneratePlan:
    """Resolve and check a generation run (the model, the adapter, the QC segmenter, the output and its earlier
    runs' settings), reading storage only; every problem is one `UserError`."""
    spec = resolve_model(cfg)  # the inputs first: a bad one leaves no output folder behind
    masks = (plan_mask_source(cfg.mask_source, cfg.mask_fraction, list(cfg.counts()), cfg.s3_endpoint or None)
             if cfg.mask_source else None)
    storage = output_storage(cfg.output, cfg.s3_endpoint or None)
    run = replace(cfg, samples_per_shard=resolve_shard_size(cfg, storage))
    settings = fingerprint_config(run, spec, masks)
    fingerprint = guard_output(storage, settings, cfg.overwrite)
    pairs = sum(run.counts().values())
    shards = tuple(range(math.ceil(pairs / run.samples_per_shard)))
    committed = set() if cfg.overwrite else intact_shards(storage)
    done = None if cfg.overwrite else finished(storage, MANIFEST_FILE, fingerprint)
    todo = tuple(s for s in shards if s not in committed)
    return GeneratePlan(run, spec, storage, settings, fingerprint, pairs, shards, todo, None if todo else done, masks)


def run_generate(plan: GeneratePlan, shape: ClusterShape | None = None) -> dict[str, Any]:
    """Generate the plan's missing shards on the current Ray cluster (`shape`: what it has and can launch, read
    from it when not given); return the manifest."""
    import ray

    from skindual.cluster import cluster_shape

    cfg, spec, storage = plan.config, plan.model, plan.storage
    shape = shape or cluster_shape()
    check_shared_paths({"--output": cfg.output, "--adapter": cfg.adapter, "--qc-segmenter": cfg.qc_segmenter,
                        "--mask-source": cfg.mask_source,
                        **({"--base-model": cfg.base_model} if Path(cfg.base_model).is_dir() else {})}, shape)
    run = resolve_devices(cfg, shape)
    fingerprint = check_output(storage, plan.settings, cfg.overwrite, device=device_record(run))
    todo = list(plan.todo) if not cfg.overwrite else list(plan.shards)
    log.info("%s: %d pairs in %d shards, %d committed, %d shards to do (%s on %d %s actor(s))", storage.url,
             plan.pairs, len(plan.shards), len(plan.shards) - len(todo), len(todo), spec.base_id, cfg.actors,
             device_record(run))
    if todo:
        table = generation_prompts(run, spec, plan.masks)
        masks = None
        if plan.masks is not None:  # read once here, each travels with its shard
            wanted = table.filter(pc.is_in(table.column("shard"), pa.array(todo, pa.int32())))
            masks = load_masks(plan.masks, wanted.column("source_key").to_pylist(), cfg.s3_endpoint or None)
            log.info("mask mode: %d given masks of %s", len(masks), plan.masks.url)
        counter = ray.remote(DrawCounter).options(num_cpus=0).remote()
        dataset = (ray.data.from_items(shard_items(table, todo, masks), override_num_blocks=len(todo))
                   .map_batches(ShardGenerator, batch_size=1, batch_format="pyarrow",
                                # one shard at a time per actor: the next goes to whichever actor frees first
                                compute=ray.data.ActorPoolStrategy(size=cfg.actors, max_tasks_in_flight_per_actor=1),
                                num_gpus=run.num_gpus_per_actor, num_cpus=cfg.cpus_per_actor,
                                accelerator_type=run.accelerator_type or None,
                                fn_constructor_kwargs={"cfg": run, "spec": spec, "counter": counter})
                   .map_batches(write_shard_rows, batch_size=1, batch_format="pyarrow", num_cpus=0.25,
                                fn_kwargs={"storage": storage, "run_info": shard_run_info(run, spec, fingerprint)}))
        _follow(dataset, table, todo, counter)
    counts = cfg.counts()
    manifest = write_run_files(storage, {
        "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
        "resolved": {**plan.settings, "device": run.device, "device_model": device_record(run),
                     "base_model_path": spec.base_model, "adapter_url": spec.adapter,
                     "num_gpus_per_actor": run.num_gpus_per_actor, "resolution": spec.resolution},
        "asked_per_class": counts, "fingerprint": fingerprint, "complete": False,
        "versions": {"skindual": __version__, **{p: version(p) for p in ("torch", "diffusers", "ray", "webdataset")}},
    })
    _check_counts(manifest, counts, cfg, spec)
    _check_devices(storage, manifest)
    # last: the marker that the run is done (`storage.finished`), once its counts and devices are right
    manifest["complete"] = True
    storage.write_bytes(MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
    return manifest


def _check_devices(storage: Storage, manifest: dict) -> None:
    """Raise a `UserError` when the shards were sampled on devices of different models (their bytes differ)."""
    devices: dict[str, list[int]] = {}
    for shard in committed_shards(storage):
        stats = read_stats(storage, shard)
        if stats is not None and stats.device:
            devices.setdefault(stats.device, []).append(shard)
    if len(devices) > 1:
        what = "; ".join(f"{d}: shards {', '.join(f'{n:05d}' for n in shards[:5])}{' ...' * (len(shards) > 5)}"
                         for d, shards in sorted(devices.items()))
        raise UserError(f"{storage.url}: its shards were sampled on different device models ({what}), so the same "
                        "settings did not give the same bytes throughout; rerun with --accelerator-type and --overwrite")


def _follow(dataset, table: pa.Table, todo: list[int], counter) -> None:
    """Drive the dataset: a progress line at least every 30 s (pairs drawn of those to do, rate, ETA, from the
    actors' `DrawCounter`) and a line per shard written."""
    import ray

    sizes = np.bincount(np.asarray(table.column("shard")))
    total = int(sum(sizes[s] for s in todo if s < len(sizes)))
    drawn = {"n": 0}

    def count() -> int:
        try:
            drawn["n"] = ray.get(counter.count.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a progress line never stops the run; the last count stands
            pass
        return drawn["n"]

    progress = Progress("generate", total, "pairs", count).start()
    try:
        check_interrupt()  # a Ctrl-C that Ray's setup calls swallowed stops the run here
        for row in dataset.iter_rows():
            log.info("shard %05d written: %d/%d pairs accepted, %d redraws", row["shard"], row["successes"],
                     row["count"], row["redraws"])
            check_interrupt()
    finally:
        progress.close()


def _check_counts(manifest: dict, counts: dict[str, int], cfg: GenerateConfig, spec: ModelSpec) -> None:
    """Raise a `UserError` naming the short classes unless every class has exactly its asked pairs."""
    per_class = manifest["totals"]["per_class"]
    short = {c: (per_class.get(c, {}).get("ok", 0), n) for c, n in counts.items()
             if per_class.get(c, {}).get("ok", 0) != n}
    if short:
        what = ", ".join(f"{c}: {got} of {n}" for c, (got, n) in short.items())
        raise UserError(f"quality control rejected pairs after --max-attempts {cfg.max_attempts} draws, so the "
                        f"output is short ({what}; the reasons are in the shard parquets and manifest.json); "
                        "rerun with a higher --max-attempts or looser --min-mask-area / --max-mask-area / "
                        "--min-main-share / --min-consistency, and --overwrite" + ("" if spec.adapter else
                        " (no --adapter was given: the bare base model's mask channel is untrained)"))
