"""Reading shards back (docs/architecture.md, "Formats"): `shard_urls` and `read_shards` give a webdataset
pipeline over an output's committed shards, locally or from S3 (``pipe:`` URLs that run
``python -m skindual.shards cat``).

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
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from skindual.errors import UserError
from skindual.images import decode_members
from skindual.shard_format import shard_names
from skindual.shard_store import readable_shards
from skindual.storage import is_remote, open_storage

if TYPE_CHECKING:  # webdataset imports torch when it is installed: only load it when used
    import webdataset as wds


def shard_urls(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None, partial: bool = False) -> list[str]:
    """URLs webdataset can open for the committed shards of output roots (checked by `readable_shards`:
    a damaged shard, or one the output names but never committed, is a `UserError` unless `partial`), or
    of ``.tar`` URLs given.

    Local tars are plain paths; S3 tars become ``pipe:`` URLs streaming through `cat` with the
    standard AWS credential chain (nothing secret is put into the URL).
    """
    urls: list[str] = []
    for url in [url_or_urls] if isinstance(url_or_urls, str) else list(url_or_urls):
        if url.endswith(".tar"):
            parent, _, name = url.rpartition("/")
            names, storage = [name], open_storage(parent or ".", s3_endpoint)
        else:
            storage = open_storage(url, s3_endpoint)
            names = [shard_names(n)[0] for n in readable_shards(storage, partial=partial)]
        for name in names:
            if not is_remote(storage.url):
                urls.append(storage.join(name))
                continue
            command = [sys.executable, "-m", "skindual.shards", "cat", storage.join(name)]
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


def read_shards(url_or_urls: str | Iterable[str], s3_endpoint: str | None = None,
                to_tensors: bool = False, shardshuffle: int | bool = False, partial: bool = False) -> wds.WebDataset:
    """A webdataset pipeline over committed shards yielding dicts: ``key``, ``image`` (uint8
    H×W×3), ``mask`` (uint8 H×W 0/1), ``ignore`` (uint8 H×W 0/1: the pair's ignore map, pixels a
    segmenter should leave out of its loss; all 0 for a pair without one), ``class_index``, ``prompt``,
    ``meta`` (the sample's json).

    ``to_tensors``: image float C×H×W in [0, 1], mask and ignore float 1×H×W in {0, 1}.  Shards are split over
    torch.distributed ranks and DataLoader workers.  Further stages can be chained as usual.  The shards
    are checked first (`readable_shards`; `partial` reads the committed part of an output that names more).
    """
    import webdataset as wds

    urls = shard_urls(url_or_urls, s3_endpoint, partial)
    if not urls:
        raise UserError(f"no committed shards (with a _stats.json) under {url_or_urls}")
    dataset = wds.WebDataset(urls, shardshuffle=shardshuffle, nodesplitter=wds.split_by_node)
    return dataset.map(functools.partial(_to_output, to_tensors=to_tensors))


def _cat(url: str, s3_endpoint: str | None) -> int:
    """Stream one shard from S3 to stdout (the ``pipe:`` URLs of `shard_urls`)."""
    parent, _, name = url.rpartition("/")
    storage = open_storage(parent, s3_endpoint)
    if not is_remote(url):
        print(f"skindual.shards cat: {url} is not an s3:// URL", file=sys.stderr)
        return 2
    try:  # the storage layer turns a missing object or bad credentials into one line
        for chunk in storage.iter_bytes(name):
            sys.stdout.buffer.write(chunk)
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
    cat = sub.add_parser("cat", help="write one shard (s3:// URL) to stdout")
    cat.add_argument("url")
    cat.add_argument("--s3-endpoint", default=None)
    args = parser.parse_args(argv)
    return _cat(args.url, args.s3_endpoint)


if __name__ == "__main__":
    sys.exit(main())
