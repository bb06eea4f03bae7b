"""Given masks for mask-conditioned generation (``jobs/generate.py --mask-source URL``).

The masks are those of a prepared real dataset's train split (optionally a seeded share of each class,
the same cut as the fine-tune's ``--real-fraction``).  Each prompt row of a class is given one of that
class's real masks, in turn after a seeded shuffle (so every mask serves about equally often), and the
prompt's body site, age and sex come from that mask's row.  Before sampling, the mask is varied by a
seeded augmentation (`augment_mask`: flips, rotation, scale, a small shift and an elastic deformation);
the joint model then samples only the image, its mask latents held to the noised encoding of the given
mask at every step (`skindual.dual_pipeline.DualPipeline` with ``masks=``).  The shard's mask is the given
mask, exact by construction.

`plan_mask_source` reads and checks the dataset's index before any cluster work; `load_masks` reads the
chosen rows' mask PNGs once, on the driver, so they travel with the shard they belong to.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from skindual import data, images, pairs
from skindual.errors import UserError
from skindual.prompts import Attributes, lesion_class
from skindual.quality import MaskLimits, largest_component, mask_check
from skindual.shard_store import read_stats
from skindual.storage import Storage, open_storage

AUGMENTATION_TRIES = 8
"""Augmentations tried per row (seeds s, s+1, ...): the first whose mask passes the quality limits is kept."""


@dataclass(frozen=True)
class MaskSource:
    """The masks a run samples images for: per class, its source rows ``(source key, (site, age, sex))`` in
    index order, where a source key is ``"{shard:05d}/{key}"`` of the real dataset at `url`."""

    url: str
    rows: dict[str, list[tuple[str, Attributes]]]
    digest: str  # sha256 of the chosen rows and the dataset's shards: the run's fingerprint names it

    def shard_keys(self, source_keys: Sequence[str]) -> dict[int, list[str]]:
        """real shard → its keys, of the given source keys."""
        out: dict[int, list[str]] = {}
        for source in source_keys:
            shard, _, key = source.partition("/")
            out.setdefault(int(shard), []).append(key)
        return out


def plan_mask_source(url: str, fraction: float, classes: Sequence[str], s3_endpoint: str | None,
                     partial: bool = False) -> MaskSource:
    """Read a prepared real dataset's index: the usable, classed pairs of its train split (a seeded `fraction`
    of each class, seed 0), checked to hold every asked class; every problem is one `UserError` naming
    ``--mask-source``.  `partial` (``--partial``): the committed part of a dataset whose run has not finished."""
    index = pairs.read_index(url, s3_endpoint, "--mask-source", partial)
    if "split" not in index.column_names or "localization" not in index.column_names:
        raise UserError(f"--mask-source {url}: not a prepared real dataset (no split or site columns); give the "
                        "output of jobs/prepare.py")
    rows = data.classed_rows(pairs.usable_rows(index), "train")
    rows = data.fraction_per_class(rows, fraction, 0) if rows.num_rows else rows
    found: dict[str, list[tuple[str, Attributes]]] = {}
    columns = [rows.column(n).to_pylist() for n in ("class_code", "shard", "key", "localization", "age", "sex")]
    for code, shard, key, site, age, sex in zip(*columns):
        age = None if age is None or (isinstance(age, float) and math.isnan(age)) else float(age)
        found.setdefault(code, []).append((f"{int(shard):05d}/{key}", (site, age, sex)))
    missing = [c for c in classes if not found.get(c)]
    if missing:
        raise UserError(f"--mask-source {url}: its train split has no usable masks of {', '.join(missing)}; leave "
                        "those classes out (--classes, --per-class) or give a dataset that has them")
    chosen = {c: found[c] for c in classes}
    stats = sorted(set(rows.column("shard").to_pylist()))
    storage = open_storage(url, s3_endpoint)
    shard_digests = {s: _shard_digest(storage, s) for s in stats}
    digest = hashlib.sha256(json.dumps({"rows": chosen, "shards": shard_digests}, sort_keys=True).encode()).hexdigest()
    return MaskSource(url, chosen, digest)


def _shard_digest(storage: Storage, shard: int) -> str:
    """The tar sha256 a committed shard's ``_stats.json`` records."""
    stats = read_stats(storage, shard)
    if stats is None:
        raise UserError(f"--mask-source {storage.url}: shard {shard:05d} is in its index but has no _stats.json, so "
                        "it is not committed; run its prepare again to finish it, or pass --partial")
    return stats.tar_sha256


def load_masks(source: MaskSource, source_keys: Sequence[str], s3_endpoint: str | None,
               workers: int = 8) -> dict[str, bytes]:
    """source key → the real pair's ``seg.png`` bytes, for the given keys (each real shard streamed once, its
    sha256 checked as it streams; each mask's header checked against the size its json records)."""
    storage = open_storage(source.url, s3_endpoint)

    def checked(sample: dict) -> bytes:
        size = images.recorded_size(json.loads(sample["json"]))
        images.open_image(sample["seg.png"], "seg.png", size, what=f"--mask-source {source.url}: "
                          f"{images.member_label(sample, 'seg.png')}", fix=images.RERUN).close()
        return sample["seg.png"]

    def read(item: tuple[int, list[str]]) -> dict[str, bytes]:
        shard, keys = item
        return {f"{shard:05d}/{s['__key__']}": checked(s) for s in pairs.iter_shard(storage, shard, keys)}

    out: dict[str, bytes] = {}
    with ThreadPoolExecutor(workers) as pool:
        for found in pool.map(read, sorted(source.shard_keys(sorted(set(source_keys))).items())):
            out.update(found)
    missing = sorted(set(source_keys) - set(out))
    if missing:
        raise UserError(f"--mask-source {source.url}: pairs {', '.join(missing[:3])} are in its index but not in its "
                        "shards; run jobs/prepare.py again")
    return out


def augment_mask(mask: np.ndarray, seed: int) -> np.ndarray:
    """A seeded variation of a square 0/1 mask, at its size: a flip each way (p = 1/2), a rotation (any angle),
    a scale of 0.85-1.15, a shift of up to 5% of the side and an elastic deformation (a smooth random field of
    up to about 3% of the side); then its largest component with holes filled."""
    rng = np.random.default_rng(seed)
    side = mask.shape[0]
    flip_y, flip_x = rng.random(2) < 0.5
    angle, scale = rng.uniform(0, 2 * np.pi), rng.uniform(0.85, 1.15)
    shift = rng.uniform(-0.05, 0.05, 2) * side
    smooth = side / 8
    field = [ndimage.gaussian_filter(rng.uniform(-1, 1, mask.shape), smooth, mode="reflect") for _ in range(2)]
    field = [f / max(np.abs(f).max(), 1e-9) * 0.03 * side for f in field]
    yy, xx = np.mgrid[:side, :side].astype(np.float64)
    centre = (side - 1) / 2
    dy, dx = yy - centre - shift[0], xx - centre - shift[1]
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale  # output pixel → source pixel: the inverse map
    source_y = centre + cos * dy - sin * dx + field[0]
    source_x = centre + sin * dy + cos * dx + field[1]
    soft = ndimage.map_coordinates(mask.astype(np.float32), [source_y, source_x], order=1, mode="constant", cval=0)
    out = (soft >= 0.5).astype(np.uint8)
    if flip_y:
        out = out[::-1]
    if flip_x:
        out = out[:, ::-1]
    return largest_component(np.ascontiguousarray(out))


def given_mask(png: bytes, size: int, seed: int, limits: MaskLimits) -> tuple[np.ndarray, int]:
    """A real mask (``seg.png`` bytes) centre-cropped and resized to `size` (`data.resize_mask`), then
    `augment_mask` with seed `seed`, `seed` + 1, ... (up to `AUGMENTATION_TRIES`) until one passes `limits`;
    (mask, the seed kept).  When none does, the resized mask itself with seed -1."""
    real = (np.asarray(images.decode_image(png, "seg.png", "L", what="a --mask-source mask",
                                           fix=images.RERUN)) >= 128).astype(np.uint8)
    base = data.resize_mask(real, size)
    for k in range(AUGMENTATION_TRIES):
        mask = augment_mask(base, seed + k)
        if mask_check(mask, limits) is None:
            return mask, seed + k
    return base, -1


MASK_SWITCH_DRAWS = 4
"""Draws of one real mask (each a new augmentation) after which a mask-mode row that keeps failing moves on to the next
real mask of its class in the shard: a mask whose images the QC turns down four times running is one the generator
cannot draw an agreeing image for (most draws pass: the threshold is set so), and trying it until --max-attempts
would leave the class short."""


class GivenMasks:
    """Mask mode's masks of one shard's rows, draw by draw: a row's first draw gets its real mask resized and
    augmented from its ``augmentation_seed`` (`given_mask`); each redraw (the row failed a check or the QC) gets a
    new augmentation, from the next block of `AUGMENTATION_TRIES` seeds, so that a mask the generator cannot draw an
    agreeing image for is not tried again unchanged; after `MASK_SWITCH_DRAWS` draws of one real mask, the next
    real mask of the row's class in the shard (in row order, round the shard's distinct masks of that class).  The
    seed and the real mask each draw used are written back into the row's ``augmentation_seed`` and
    ``source_key``, which its sample records."""

    def __init__(self, rows: Sequence[dict], pngs: Sequence[bytes], size: int, limits: MaskLimits):
        self.size, self.limits = size, limits
        self.first = {r["row_id"]: r["augmentation_seed"] for r in rows}
        self.draws = dict.fromkeys(self.first, 0)
        sources: dict[str, dict[str, bytes]] = {}  # class → its distinct real masks in the shard, in row order
        for r, png in zip(rows, pngs):
            sources.setdefault(r["class_code"], {}).setdefault(r["source_key"], png)
        self.sources = {c: list(found.items()) for c, found in sources.items()}
        position = {(c, key): i for c, found in sources.items() for i, key in enumerate(found)}
        self.own = {r["row_id"]: position[r["class_code"], r["source_key"]] for r in rows}

    def __call__(self, rows: Sequence[dict]) -> np.ndarray:
        """The masks of `rows`' next draws (N×H×W 0/1)."""
        out = []
        for row in rows:
            rid = row["row_id"]
            k, self.draws[rid] = self.draws[rid], self.draws[rid] + 1
            seed = self.first[rid] if k == 0 else (self.first[rid] + k * AUGMENTATION_TRIES) % 2**62  # int64 room
            of_class = self.sources[row["class_code"]]
            row["source_key"], png = of_class[(self.own[rid] + k // MASK_SWITCH_DRAWS) % len(of_class)]
            mask, row["augmentation_seed"] = given_mask(png, self.size, seed, self.limits)
            out.append(mask)
        return np.stack(out)


def source_table(source: MaskSource, counts: Mapping[str, int], seed: int) -> dict[str, list[tuple[str, Attributes]]]:
    """Per class, the source of its row r (r < its count): its real rows after a seeded shuffle (by run seed and
    class), in turn, so each serves ⌊n/m⌋ or ⌈n/m⌉ times."""
    out = {}
    for code, n in counts.items():
        rows = source.rows[code]
        order = np.random.default_rng([seed, lesion_class(code).index]).permutation(len(rows))
        out[code] = [rows[order[r % len(rows)]] for r in range(n)]
    return out

