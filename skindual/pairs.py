"""Reading a pair dataset back from storage: the real one (`skindual.prepare`) or a synthetic one
(`skindual.generate`).  Both are the same shard layout (`skindual.shard_format`), so one reader serves
both and a hybrid set is two URLs.

- `read_index`: every sample's parquet row of the committed shards (metadata only, no pixels; small
  enough for a driver: it plans from it).
- `iter_shard`: the samples of one shard, once the whole shard is verified (`skindual.shard_reader`).
- `decode_sample`: one sample's image (uint8 RGB), mask (0/1), class index, prompt and metadata.
- `pair_dataset`: a Ray Data dataset of decoded pairs at one size for a selection of keys (each
  key with a repeat count), one read task per shard: the workers read storage, the driver only
  passes the selection.
- `local_batches`: the same pairs as training batches read in this process, no Ray (a plain loop's data).
- `dataset_manifest`: a prepared dataset's manifest (prompt template, fingerprint).
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from skindual.data import resize_ignore, resize_pair
from skindual.errors import UserError
from skindual.images import decode_members
from skindual.shard_format import MANIFEST_FILE, shard_names
from skindual.shard_reader import verified_samples
from skindual.shard_store import committed_shards, read_record, read_stats, readable_shards
from skindual.storage import Storage, is_remote, open_storage


def read_index(url: str, s3_endpoint: str | None = None, what: str = "", partial: bool = False) -> pa.Table:
    """The parquet rows of every committed shard under `url` with a ``shard`` column; a `UserError`
    (naming `what`, e.g. the flag, and the URL) when there is none, and when a shard does not match its
    ``_stats.json`` or the output names shards it never committed (`shard_store.readable_shards`; `partial`
    reads the committed part)."""
    storage = open_storage(url, s3_endpoint)
    if not is_remote(url) and not Path(storage.url).exists():
        raise UserError(f"{what + ' ' if what else ''}{url}: no such folder; give the dataset jobs/prepare.py or "
                        "jobs/generate.py wrote (a folder or an s3:// prefix)")
    if not committed_shards(storage):
        raise UserError(f"{what + ' ' if what else ''}{url}: no committed shards (with a _stats.json) there; "
                        "give a dataset written by jobs/prepare.py or jobs/generate.py")
    label = f"{what + ' ' if what else ''}{url}"
    tables = [shard_rows(storage, shard, label) for shard in readable_shards(storage, what, partial)]
    return pa.concat_tables(tables, promote_options="default")


def shard_rows(storage: Storage, shard: int, label: str = "") -> pa.Table:
    """The parquet rows of one committed shard with a ``shard`` column, once the parquet's bytes match the sha256
    its ``_stats.json`` records (a `UserError` naming the output, as `label` or its URL, otherwise)."""
    raw = storage.read_bytes(shard_names(shard)[1])
    stats = read_stats(storage, shard)
    if stats is not None and hashlib.sha256(raw).hexdigest() != stats.parquet_sha256:
        raise UserError(f"{label or storage.url}: shard {shard:05d}'s parquet does not match the "
                        "sha256 its _stats.json records; run the job that wrote it again")
    table = pq.read_table(io.BytesIO(raw))
    return table.append_column("shard", pa.array([shard] * table.num_rows, pa.int32()))


def iter_shard(storage: Storage, shard: int, keys: Iterable[str] | None = None) -> Iterator[dict[str, Any]]:
    """The samples of a committed shard: dicts of ``__key__`` and extension → bytes (``jpg`` or ``png``,
    ``seg.png``, ``cls``, ``txt``, ``json``, maybe ``ignore.png``), in key order; only `keys` if given.
    The one verified reader (`shard_reader.verified_samples`): nothing comes out before the whole tar matched
    the size and sha256 its ``_stats.json`` records and every member passed its checks; else a `DataError`
    naming the shard (and member)."""
    return verified_samples(storage, shard, keys)


def decode_sample(sample: Mapping[str, Any], size: int | None = None) -> dict[str, Any]:
    """``key``, ``image`` (uint8 H×W×3), ``mask`` (uint8 H×W, 0/1), ``ignore`` (uint8 H×W, 0/1: the pair's
    ignore map, all 0 when it has none), ``class_index``, ``prompt``, ``meta`` of a sample of `iter_shard`;
    at `size` × `size` (`data.resize_pair`; an ignore map keeps every pixel it touches) when given.  JPEG
    images are decoded at the smallest scale that still covers `size` (PIL's draft mode).  Each member is
    opened as its name's format and checked against the size the json records first (`images.decode_members`)."""
    meta = json.loads(sample["json"])
    image, mask, ignore = decode_members(sample, meta, size)
    if mask.shape != (image.height, image.width):  # the image was drafted smaller than its mask
        mask = np.asarray(Image.fromarray(mask * 255).resize(image.size, Image.Resampling.BILINEAR)) >= 128
    if size is not None:
        image, mask = resize_pair(image, mask, size)
    else:
        image = np.asarray(image)
    if ignore is None:
        ignore = np.zeros(mask.shape, np.uint8)
    else:
        ignore = resize_ignore(ignore, size) if size is not None else ignore.astype(np.uint8)
    return {"key": sample["__key__"], "image": image, "mask": mask.astype(np.uint8), "ignore": ignore,
            "class_index": int(sample["cls"]), "prompt": sample["txt"].decode(), "meta": meta}


def usable_rows(index: pa.Table) -> pa.Table:
    """The rows of a `read_index` table whose pairs are in the shards (status ``ok``: not rejected, not bad)."""
    return index.filter(pc.equal(index.column("status"), "ok"))


def selection_of(index: pa.Table, repeats: Mapping[str, int] | None = None) -> dict[int, dict[str, int]]:
    """shard → {key: repeat count} of the rows of `index` (a filtered `read_index` table); `repeats`
    gives a count per key (default 1 each)."""
    out: dict[int, dict[str, int]] = {}
    for shard, key in zip(index.column("shard").to_pylist(), index.column("key").to_pylist()):
        out.setdefault(int(shard), {})[key] = int(repeats[key]) if repeats is not None else 1
    return out


def load_selected(url: str, shard: int, counts: Mapping[str, int], size: int, seed: int = 0,
                  s3_endpoint: str | None = None, chunk: int = 64) -> Iterator[dict[str, np.ndarray]]:
    """One shard's selected pairs (key → repeat count), decoded at `size`, each as often as its count,
    in a seeded order, as batches of `chunk`: ``image``, ``mask``, ``prompt``, ``class_index``."""
    storage = open_storage(url, s3_endpoint)
    decoded = [decode_sample(s, size) for s in iter_shard(storage, int(shard), counts)]
    order = [i for i, p in enumerate(decoded) for _ in range(counts[p["key"]])]
    np.random.default_rng([seed, int(shard)]).shuffle(order)
    for start in range(0, len(order), chunk):
        picked = [decoded[i] for i in order[start:start + chunk]]
        yield {"image": np.stack([p["image"] for p in picked]), "mask": np.stack([p["mask"] for p in picked]),
               "prompt": np.asarray([p["prompt"] for p in picked], dtype=object),
               "class_index": np.asarray([p["class_index"] for p in picked], np.int64)}


def _read_task(batch: dict, url: str, size: int, seed: int, s3_endpoint: str | None) -> Iterator[dict[str, np.ndarray]]:
    """Ray Data task: `load_selected` of the batch's one shard."""
    (shard,), (counts,) = batch["shard"].tolist(), batch["keys"].tolist()
    yield from load_selected(url, int(shard), json.loads(counts), size, seed, s3_endpoint)


def pair_dataset(url: str, selection: Mapping[int, Mapping[str, int]], size: int, seed: int = 0,
                 s3_endpoint: str | None = None, num_cpus: float = 1.0):
    """A Ray Data dataset of the selected pairs of the dataset at `url`, decoded at `size` × `size`:
    rows ``image``, ``mask``, ``prompt``, ``class_index``; one read task per shard (in a seeded order),
    each key as often as its count in `selection` (shard → {key: count})."""
    import ray

    shards = sorted(selection)
    np.random.default_rng(seed).shuffle(shards)
    items = [{"shard": int(n), "keys": json.dumps(dict(sorted(selection[n].items())))} for n in shards]
    return ray.data.from_items(items, override_num_blocks=max(1, len(items))).map_batches(
        _read_task, batch_size=1, batch_format="numpy", num_cpus=num_cpus,
        fn_kwargs={"url": url, "size": size, "seed": seed, "s3_endpoint": s3_endpoint})


def stream_pairs(sources: Iterable[tuple[str, Mapping[int, Mapping[str, int]]]], size: int, seed: int = 0,
                 buffer_size: int = 2048, s3_endpoint: str | None = None,
                 hold: bool = True) -> Iterator[dict[str, Any]]:
    """An endless seeded stream of decoded pairs (`decode_sample` at `size`) from the selections of one
    or more datasets (URL, shard → {key: count}), each key as often as its count an epoch: every epoch
    visits the shards of all sources in a new random order and passes the pairs through a shuffle
    buffer of `buffer_size`.  Nothing beyond the buffer and the shard being read (`iter_shard`'s spool, on disk
    past a few tens of MiB) is held, however large the datasets; a selection of no more distinct pairs than the
    buffer holds is read and decoded once, its pairs kept for the later epochs (the same stream: short runs on
    small sets, such as a pretraining stage on a few synthetic pairs, otherwise decode them over and over to
    fill the buffer; ``hold=False`` decodes every epoch again)."""
    units = [(url, int(shard), dict(keys)) for url, selection in sources for shard, keys in selection.items() if keys]
    if not units:
        raise ValueError("stream_pairs needs at least one selected pair")
    storages = {url: open_storage(url, s3_endpoint) for url, _, _ in units}
    held: dict[int, list[dict[str, Any]]] | None = {} if hold and sum(len(k) for _, _, k in units) <= buffer_size else None
    rng = np.random.default_rng(seed)
    buffer: list[dict[str, Any]] = []

    def unit_pairs(u: int) -> Iterator[dict[str, Any]]:
        url, shard, keys = units[u]
        if held is not None and u in held:
            yield from held[u]
            return
        decoded = [] if held is not None else None
        for sample in iter_shard(storages[url], shard, keys):
            pair = decode_sample(sample, size)
            if decoded is not None:
                decoded.append(pair)
            yield pair
        if held is not None:
            held[u] = decoded

    while True:
        for u in rng.permutation(len(units)):
            keys = units[u][2]
            for pair in unit_pairs(int(u)):
                for _ in range(keys[pair["key"]]):
                    buffer.append(pair)
                    if len(buffer) >= buffer_size:
                        i = int(rng.integers(len(buffer)))
                        buffer[i], buffer[-1] = buffer[-1], buffer[i]
                        yield buffer.pop()


def load_pairs(url: str, selection: Mapping[int, Mapping[str, int]], size: int,
               s3_endpoint: str | None = None) -> dict[str, np.ndarray]:
    """The selected pairs (each once) decoded at `size`, in memory, in shard and key order: ``key``,
    ``image``, ``mask``, ``class_index``, ``prompt`` arrays.  For small sets only (a test split, a grid)."""
    storage = open_storage(url, s3_endpoint)
    decoded = [decode_sample(s, size) for shard in sorted(selection) for s in iter_shard(storage, shard, selection[shard])]
    if not decoded:
        return {"key": np.zeros(0, object), "image": np.zeros((0, size, size, 3), np.uint8),
                "mask": np.zeros((0, size, size), np.uint8), "class_index": np.zeros(0, np.int64),
                "prompt": np.zeros(0, object)}
    return {"key": np.asarray([d["key"] for d in decoded], dtype=object),
            "image": np.stack([d["image"] for d in decoded]), "mask": np.stack([d["mask"] for d in decoded]),
            "class_index": np.asarray([d["class_index"] for d in decoded], np.int64),
            "prompt": np.asarray([d["prompt"] for d in decoded], dtype=object)}


def local_batches(url: str, selection: dict[int, dict[str, int]], size: int, batch_size: int, seed: int = 0,
                  s3_endpoint: str | None = None):
    """The selected pairs as training batches read in this process (no Ray): a plain loop's data."""
    for shard in sorted(selection):
        for chunk in load_selected(url, shard, selection[shard], size, seed, s3_endpoint, chunk=batch_size):
            if len(chunk["prompt"]) == batch_size:
                yield chunk


def dataset_manifest(url: str, s3_endpoint: str | None = None) -> dict:
    """A prepared dataset's manifest (its prompt template, its fingerprint), or {} when it has none."""
    try:
        return read_record(open_storage(url, s3_endpoint), MANIFEST_FILE)
    except FileNotFoundError:
        return {}
