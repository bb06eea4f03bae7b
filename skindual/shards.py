"""Reading shards back (docs/architecture.md, "Formats"): `read_shards` gives a webdataset pipeline over the
committed shards of outputs or of ``.tar`` URLs, locally or from S3; `shard_urls` gives URLs stock
webdataset opens, each a ``pipe:`` through ``python -m skindual.shards cat``.  Both read every shard through
`skindual.shard_reader`, so no pair of a shard comes out before the whole shard matched its ``_stats.json``
(size and sha256) and every member passed its checks.

The format is `skindual.shard_format`, writing and the scans are `skindual.shard_store`, and the run files
and rerun guard are `skindual.run_files`.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from skindual.errors import UserError
from skindual.images import decode_members
from skindual.shard_format import SHARD_FILE, shard_names
from skindual.shard_reader import copy_verified, verified_samples
from skindual.shard_store import read_stats, readable_shards
from skindual.storage import Storage, open_storage

if TYPE_CHECKING:  # webdataset imports torch when it is installed: only load it when used
    import webdataset as wds


def _tar_location(url: str, s3_endpoint: str | None) -> tuple[Storage, int]:
    """The storage holding a ``{shard:05d}.tar`` URL and the shard's number (a `UserError` for another name)."""
    parent, _, name = url.rpartition("/")
    match = SHARD_FILE.match(name)
    if match is None or match.group(2) != ".tar":
        raise UserError(f"{url}: not a shard's tar ({{shard:05d}}.tar); give an output folder or s3:// prefix, "
                        "or one of its shards' tars")
    return open_storage(parent or ".", s3_endpoint), int(match.group(1))


def committed_tars(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None,
                   partial: bool = False) -> list[str]:
    """The tar URLs of the committed shards of output roots (checked by `readable_shards`: a damaged shard,
    or one the output names but never committed, is a `UserError` unless `partial`), or of ``.tar`` URLs
    given (each must have its ``_stats.json`` beside it)."""
    tars: list[str] = []
    for url in [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls):
        if url.endswith(".tar"):
            storage, shard = _tar_location(url, s3_endpoint)
            if read_stats(storage, shard) is None:
                raise UserError(f"{url}: no {shard_names(shard)[2]} beside it, so it is not committed (a run cut "
                                "short, or a commit marker lost); run the job that wrote it again")
            tars.append(storage.join(shard_names(shard)[0]))
        else:
            storage = open_storage(url, s3_endpoint)
            tars += [storage.join(shard_names(n)[0]) for n in readable_shards(storage, partial=partial)]
    return tars


def shard_urls(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None, partial: bool = False) -> list[str]:
    """URLs stock webdataset can open for the committed shards of output roots or of ``.tar`` URLs given
    (`committed_tars`): each a ``pipe:`` running ``python -m skindual.shards cat``, which writes a shard to
    stdout only once all of it is verified (`shard_reader.copy_verified`), else nothing and exits 1 (stock
    webdataset then raises).  S3 credentials come from the standard AWS chain (nothing secret is put into
    the URL)."""
    urls = []
    for tar in committed_tars(url_or_urls, s3_endpoint, partial):
        command = [sys.executable, "-m", "skindual.shards", "cat", tar]
        if s3_endpoint:
            command += ["--s3-endpoint", s3_endpoint]
        urls.append("pipe:" + shlex.join(command))
    return urls


def _to_output(sample: dict[str, Any], to_tensors: bool) -> dict[str, Any]:
    """A raw webdataset sample decoded: its members opened as their names' formats and checked against the
    size its json records (`images.decode_members`)."""
    meta = json.loads(sample["json"])
    image, mask, ignore = decode_members(sample, meta)
    image = np.asarray(image)
    ignore = ignore if ignore is not None else np.zeros_like(mask)
    out = {"key": sample["__key__"], "image": image, "mask": mask, "ignore": ignore,
           "class_index": int(sample["cls"]), "prompt": sample["txt"].decode(), "meta": meta}
    if to_tensors:
        import torch  # only consumers that ask for tensors need torch

        out["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float().div(255)
        out["mask"] = torch.from_numpy(mask[None]).float()
        out["ignore"] = torch.from_numpy(ignore[None]).float()
    return out


def _verified_shards(source: Iterable[dict[str, Any]], s3_endpoint: str | None) -> Iterator[dict[str, Any]]:
    """Pipeline stage: the samples of each shard ``{"url": tar URL}``, each shard verified whole first."""
    for item in source:
        storage, shard = _tar_location(item["url"], s3_endpoint)
        for sample in verified_samples(storage, shard):
            yield sample | {"__url__": item["url"]}


def read_shards(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None,
                to_tensors: bool = False, shardshuffle: int | bool = False, partial: bool = False) -> wds.FluidWrapper:
    """A webdataset pipeline over committed shards (of output roots, or ``.tar`` URLs with their
    ``_stats.json`` beside them) yielding dicts: ``key``, ``image`` (uint8 H×W×3), ``mask`` (uint8 H×W 0/1),
    ``ignore`` (uint8 H×W 0/1: the pair's ignore map, pixels a segmenter should leave out of its loss; all 0
    for a pair without one), ``class_index``, ``prompt``, ``meta`` (the sample's json).

    ``to_tensors``: image float C×H×W in [0, 1], mask and ignore float 1×H×W in {0, 1}.  Shards are split over
    torch.distributed ranks and DataLoader workers, shuffled in a buffer of `shardshuffle` (True: 100).
    Further stages can be chained as usual.  The outputs are checked first (`readable_shards`; `partial`
    reads the committed part of an output that names more), and every shard is read through the verified
    reader (`shard_reader.verified_samples`): a shard that is not what its ``_stats.json`` records is a
    `DataError` naming it before any of its pairs comes out.
    """
    import webdataset as wds

    tars = committed_tars(url_or_urls, s3_endpoint, partial)
    if not tars:
        raise UserError(f"no committed shards (with a _stats.json) under {url_or_urls}")
    dataset = wds.FluidWrapper(wds.SimpleShardList(tars))
    dataset.append(wds.split_by_node)
    dataset.append(wds.split_by_worker)
    if shardshuffle:
        dataset.append(wds.shuffle(100 if shardshuffle is True else int(shardshuffle)))
    dataset.append(functools.partial(_verified_shards, s3_endpoint=s3_endpoint))
    return dataset.map(functools.partial(_to_output, to_tensors=to_tensors))


def _cat(url: str, s3_endpoint: str | None) -> int:
    """Write one committed shard (a local or s3:// ``{shard:05d}.tar``) to stdout once all of it is verified
    (the ``pipe:`` URLs of `shard_urls`); a shard that is not is one line on stderr, nothing on stdout, exit 1."""
    try:  # the storage layer turns a missing object or bad credentials into one line
        storage, shard = _tar_location(url, s3_endpoint)
        copy_verified(storage, shard, sys.stdout.buffer)
        sys.stdout.buffer.flush()
    except BrokenPipeError:  # the reader stopped early: exit quietly with the status of a
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # SIGPIPE death (141),
        return 141  # which webdataset's Pipe ignores
    except (UserError, OSError) as exc:
        print(f"skindual.shards cat: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skindual.shards")
    sub = parser.add_subparsers(dest="command", required=True)
    cat = sub.add_parser("cat", help="write one committed shard's tar (a path or s3:// URL) to stdout, verified")
    cat.add_argument("url")
    cat.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    return _cat(args.url, args.s3_endpoint)


if __name__ == "__main__":
    sys.exit(main())
