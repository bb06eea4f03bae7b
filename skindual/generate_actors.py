"""Generation's Ray stages: the dataset's rows (`shard_items`, one per shard), the generator actors
(`ShardGenerator`: the pipeline loaded once, each shard's pairs drawn and quality-controlled), the
shard-writing tasks (`write_shard_rows`) and the actors' draw counter for progress lines."""

from __future__ import annotations

import json
import tempfile
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from skindual.cli import worker_setup
from skindual.errors import UserError
from skindual.generate_config import GenerateConfig, cpu_threads
from skindual.generate_model import ModelSpec, load_generator
from skindual.guidance import SegmenterGuidance
from skindual.mask_source import GivenMasks
from skindual.qc_model import QCSegmenter
from skindual.redraw import generate_samples
from skindual.shard_format import Sample
from skindual.shard_store import write_shard
from skindual.storage import Storage

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
        self._given: GivenMasks | None = None  # mask mode: the current shard's given masks
        self.pipe = load_generator(spec, cfg, self._tmp.name)
        self.encoder = ThreadPoolExecutor(2)
        self.qc = None
        if cfg.qc_segmenter:
            self.qc = QCSegmenter.load(cfg.qc_segmenter, cfg.s3_endpoint or None, cfg.device)
            if self.qc.sha256 != spec.qc_sha256:
                raise RuntimeError(f"QC segmenter {cfg.qc_segmenter} changed while the run started; rerun the job")
            if cfg.segmenter_guidance > 0:  # the ControlNet's images nudged towards what it reads (--segmenter-guidance)
                self.pipe.guide = SegmenterGuidance(self.qc.model, self.qc.size, cfg.segmenter_guidance,
                                                    batch=self.pipe.decode_batch)

    def _generate(self, rows: list[dict], seeds: list[int]) -> tuple[np.ndarray, np.ndarray]:
        given = self._given(rows) if self._given is not None else None  # a redraw: a new augmentation of its mask
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
        # mask mode: each row's real mask, resized and augmented, draw by draw
        self._given = GivenMasks(rows, masks, self.pipe.resolution, cfg.limits()) if masks else None
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
