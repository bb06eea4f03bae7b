"""An output's run files and the rerun guard: ``run.json`` (the settings and their fingerprint, written when a
run starts) is checked by `guard_output` / `check_output` before a rerun writes (same settings: resume;
others: refuse unless overwrite); ``sizes.json`` and ``manifest.json`` record the shards a run will write before
its first shard (`start_run`, the manifest saying ``"complete": false``) and are rewritten at its end
(`write_run_files`), so that a reader never takes a run cut short for a whole one (`shard_store.unfinished`).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from skindual.card import has_card
from skindual.errors import UserError
from skindual.fingerprint import config_fingerprint, settings_diff
from skindual.shard_format import (CARD_FILE, MANIFEST_FILE, PREVIEW_FILE, RUN_FILE, SHARD_FILE, SIZES_FILE,
                                   shard_names)
from skindual.shard_store import committed_shards, read_record, read_stats
from skindual.storage import Storage


def start_run(storage: Storage, fingerprint: str, planned: Mapping[int, int], **fields: Any) -> None:
    """Record, before a run writes its first shard, what it will write: ``manifest.json`` saying
    ``"complete": false`` with the number of shards and pairs planned (and `fields`), then ``sizes.json`` with
    each planned shard's tar → the pairs planned for it.  Both stay until the run's end rewrites them
    (`write_run_files`)."""
    sizes = {shard_names(shard)[0]: int(pairs) for shard, pairs in sorted(planned.items())}
    manifest = {**fields, "fingerprint": fingerprint, "complete": False,
                "planned": {"shards": len(sizes), "pairs": sum(sizes.values())}}
    storage.write_bytes(MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
    storage.write_bytes(SIZES_FILE, json.dumps(sizes, sort_keys=True, indent=1).encode())


def write_run_files(storage: Storage, manifest: Mapping[str, Any]) -> dict[str, Any]:
    """Write ``sizes.json`` (each shard's tar → its pairs) and ``manifest.json`` from the committed shards' stats;
    return the manifest.

    ``manifest`` holds the run's config and versions; totals (overall, per reason, per class) are
    added under ``"totals"``.  If it names a ``fingerprint``, every shard must have been written with it.
    """
    all_stats = [read_stats(storage, n) for n in committed_shards(storage)]
    stats_list = [s for s in all_stats if s is not None]
    wrong = [s.shard for s in stats_list if "fingerprint" in manifest and s.fingerprint != manifest["fingerprint"]]
    if wrong:
        raise UserError(f"{storage.url}: shards {wrong} were written with other settings; rerun with --overwrite")
    rejections: Counter[str] = Counter()
    per_class: dict[str, Counter[str]] = {}
    per_split: dict[str, Counter[str]] = {}
    for s in stats_list:
        rejections.update(s.rejections)
        for code, counts in s.per_class.items():
            per_class.setdefault(code, Counter()).update(counts)
        for split, counts in s.per_split.items():
            per_split.setdefault(split, Counter()).update(counts)
    totals = {"shards": len(stats_list), "count": sum(s.count for s in stats_list),
              "successes": sum(s.successes for s in stats_list),
              "failed_to_generate": sum(s.failed_to_generate for s in stats_list),
              "draws": sum(s.draws for s in stats_list),
              "rejections": dict(rejections), "per_class": {c: dict(n) for c, n in per_class.items()}}
    if per_split:
        totals["per_split"] = {split: dict(sorted(n.items())) for split, n in sorted(per_split.items())}
    sizes = {shard_names(s.shard)[0]: s.successes for s in stats_list}
    result = {**manifest, "totals": totals}
    storage.write_bytes(SIZES_FILE, json.dumps(sizes, sort_keys=True, indent=1).encode())
    storage.write_bytes(MANIFEST_FILE, json.dumps(result, sort_keys=True, indent=1).encode())
    return result


def read_run_config(storage: Storage) -> dict[str, Any]:
    """The settings (``config``) recorded in an output's ``run.json``; empty when it has none."""
    try:
        return read_record(storage, RUN_FILE).get("config", {})
    except FileNotFoundError:
        return {}


def guard_output(storage: Storage, config: Mapping[str, Any], overwrite: bool = False) -> str:
    """The fingerprint of `config` for a run into `storage`, after checking that the run may write there
    (reads only; `check_output` then takes the output over).

    Without ``overwrite``: no ``run.json`` is a fresh output (refused if it holds shards anyway); the
    same fingerprint is a resume (committed shards are kept); another one is a `UserError` naming the
    differing settings."""
    fingerprint = config_fingerprint(config)
    if overwrite:
        return fingerprint
    try:
        previous = read_record(storage, RUN_FILE)
    except FileNotFoundError:
        previous = None
    if previous is not None:
        if previous.get("fingerprint") == fingerprint:
            return fingerprint
        what = (settings_diff(previous.get("config", {}), config)
                or f"other settings (fingerprint {previous.get('fingerprint')})")
        raise UserError(f"{storage.url} was written with {what}; pass --overwrite to replace it, "
                        "or choose another --output")
    if any(SHARD_FILE.match(n) or n in (SIZES_FILE, MANIFEST_FILE) for n in storage.list()):
        raise UserError(f"{storage.url} holds shards but no {RUN_FILE}, so not from a run of this "
                        "tool; pass --overwrite to replace them, or choose another --output")
    return fingerprint


def check_output(storage: Storage, config: Mapping[str, Any], overwrite: bool = False, device: str = "") -> str:
    """Take an output over for a run of `config` (`guard_output` first); return the fingerprint.

    ``overwrite``: start afresh, deleting the old shard and run files, dataset card and ``preview.png`` (only those:
    other files under the root stay).  `device` (what samples the shards: its model, or the CPU and its thread count) is recorded
    in ``run.json``: a resume on another device model is refused, as its bytes would differ from the
    committed shards'.  ``run.json`` is written when the output is fresh."""
    fingerprint = guard_output(storage, config, overwrite)
    try:
        previous = None if overwrite else read_record(storage, RUN_FILE)
    except FileNotFoundError:
        previous = None
    if previous is not None:
        recorded = previous.get("device", "")
        if device and recorded and recorded != device and committed_shards(storage):
            raise UserError(f"{storage.url} was sampled on {recorded} and this run would sample on {device}, which "
                            "gives other bytes; run it where the first run ran (--accelerator-type, "
                            "--cpus-per-actor), or pass --overwrite")
        return fingerprint
    ours = [n for n in storage.list()
            if SHARD_FILE.match(n) or n in (SIZES_FILE, MANIFEST_FILE, RUN_FILE, PREVIEW_FILE)]
    ours += [CARD_FILE] if has_card(storage) else []  # its counts are the old manifest's
    # stats (commit markers) first, so an interrupted delete leaves no committed shard behind
    for name in sorted(ours, key=lambda n: (not n.endswith("_stats.json"), n)):
        storage.delete(name)
    record = {"fingerprint": fingerprint, "config": dict(config), **({"device": device} if device else {})}
    storage.write_bytes(RUN_FILE, json.dumps(record, sort_keys=True, indent=1).encode())
    return fingerprint
