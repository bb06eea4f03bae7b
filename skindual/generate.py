"""Generation: the run's plan (model, output, shard size, fingerprint, shards still to do) and its run, the
prompt table → Ray Data, one row per shard → `generate_actors`' generator actors and shard-writing tasks →
WebDataset shards (``preview.png`` drawn from the first one committed), then the manifest once every class has
exactly its asked pairs (docs/architecture.md, "Generation")."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from dataclasses import dataclass, replace
from importlib.metadata import version
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from skindual import __version__
from skindual.card import write_card
from skindual.cli import Progress, check_interrupt
from skindual.cluster import ClusterShape, check_accelerator, check_shared_paths, resolve_gpus
from skindual.errors import UserError
from skindual.generate_actors import DrawCounter, ShardGenerator, shard_items, write_shard_rows
from skindual.generate_config import (CONTROLNET_ONLY, FINGERPRINTED, FINGERPRINTED_WHEN_SET, GenerateConfig,
                                      cpu_threads, without_auto)
from skindual.generate_model import ModelSpec, resolve_model
from skindual.mask_source import MaskSource, load_masks, plan_mask_source, source_table
from skindual.preview import write_preview
from skindual.prompts import attribute_pools, prompt_table
from skindual.run_files import check_output, guard_output, read_run_config, start_run, write_run_files
from skindual.shard_format import CARD_FILE, MANIFEST_FILE
from skindual.shard_store import committed_shards, intact_shards, read_stats
from skindual.storage import Storage, finished, output_storage

log = logging.getLogger(__name__)

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
    `FINGERPRINTED` fields as they are (numbers by their declared type), a `FINGERPRINTED_WHEN_SET` one only at
    another value than skindual sampled with before it existed, the `RESOLVED` ones through the counts and the model
    (the ControlNet by its sha256, when there is one).
    What samples them (the device model, on CPU the thread count) is known only once the cluster is, and is checked
    apart (`device_record`)."""
    cfg = without_auto(cfg)
    types = {f.name: f.type for f in dataclasses.fields(GenerateConfig)}
    value = lambda name: float(getattr(cfg, name)) if types[name] == "float" else getattr(cfg, name)
    plain = {name: value(name) for name in FINGERPRINTED} | {
        name: value(name) for name, before in FINGERPRINTED_WHEN_SET.items()
        if value(name) != before and (spec.controlnet_sha256 or name not in CONTROLNET_ONLY)}
    resolved = {"per_class": ",".join(f"{c}={n}" for c, n in cfg.counts().items()), "base_model": spec.base_id,
                "adapter": f"sha256:{spec.adapter_sha256}" if spec.adapter_sha256 else "none", "layout": spec.layout,
                "qc_segmenter": f"sha256:{spec.qc_sha256}" if spec.qc_sha256 else "none",
                "mask_source": f"sha256:{masks.digest}" if masks is not None else "none"}
    if spec.controlnet_sha256:  # only when there is one: a run without keeps the fingerprint it had
        resolved["controlnet"] = f"sha256:{spec.controlnet_sha256}"
    return plain | resolved


def device_record(cfg: GenerateConfig) -> str:
    """What samples a run's shards, as its output records it: ``cuda:<GPU model>`` (``cuda`` when the cluster
    does not say which), or the CPU with torch's thread count, which changes float results.  `cfg` has its
    devices resolved."""
    if cfg.device == "cuda":
        return f"cuda:{cfg.accelerator_type}" if cfg.accelerator_type else "cuda"
    return f"cpu:{cpu_threads(cfg)} threads"


def shard_run_info(cfg: GenerateConfig, spec: ModelSpec, fingerprint: str) -> dict[str, Any]:
    """`shard_store.write_shard`'s run_info: the settings every sample's json names."""
    return {"base_model": spec.base_id, "adapter_sha256": spec.adapter_sha256, "layout": spec.layout,
            "scheduler": cfg.scheduler, "steps": cfg.steps, "guidance": float(cfg.guidance),
            "fingerprint": fingerprint, "image_format": cfg.image_format, "controlnet_sha256": spec.controlnet_sha256}


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
    cfg = without_auto(cfg)
    spec = resolve_model(cfg)  # the inputs first: a bad one leaves no output folder behind
    masks = (plan_mask_source(cfg.mask_source, cfg.mask_fraction, list(cfg.counts()), cfg.s3_endpoint or None,
                              cfg.partial) if cfg.mask_source else None)
    storage = output_storage(cfg.output, cfg.s3_endpoint or None)
    run = replace(cfg, samples_per_shard=resolve_shard_size(cfg, storage))
    settings = fingerprint_config(run, spec, masks)
    fingerprint = guard_output(storage, settings, cfg.overwrite)
    pairs = sum(run.counts().values())
    shards = tuple(range(math.ceil(pairs / run.samples_per_shard)))
    committed = set() if cfg.overwrite else intact_shards(storage, cfg.verify)
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
                        "--mask-source": cfg.mask_source, "--controlnet": cfg.controlnet,
                        **({"--base-model": cfg.base_model} if Path(cfg.base_model).is_dir() else {})}, shape)
    run = resolve_devices(cfg, shape)
    fingerprint = check_output(storage, plan.settings, cfg.overwrite, device=device_record(run))
    if not cfg.license:
        log.warning("no --license: the dataset card (%s) says 'license: unknown'; pass --license to name the terms "
                    "the pairs may be shared under", storage.join(CARD_FILE))
    size = cfg.samples_per_shard
    start_run(storage, fingerprint, {s: min(size, plan.pairs - s * size) for s in plan.shards})
    todo = list(plan.todo) if not cfg.overwrite else list(plan.shards)
    counts = cfg.counts()
    preview_whole = False  # whether this run's preview shows every class's full row
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

        def first_shard(shard: int) -> None:  # the user sees pairs as soon as there are some
            nonlocal preview_whole
            preview = write_preview(storage, [shard])
            preview_whole = preview is not None and preview.covers(counts)

        _follow(dataset, table, todo, counter, first_shard)
    if not preview_whole:  # classes the first shard lacks (or a resumed run's): from every committed shard
        write_preview(storage)
    manifest = write_run_files(storage, {
        "config": {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)},
        "resolved": {**plan.settings, "device": run.device, "device_model": device_record(run), "dtype": run.dtype,
                     "base_model_path": spec.base_model, "adapter_url": spec.adapter,
                     "num_gpus_per_actor": run.num_gpus_per_actor, "resolution": spec.resolution,
                     **({"controlnet_url": spec.controlnet} if spec.controlnet else {})},
        "asked_per_class": counts, "fingerprint": fingerprint, "complete": False,
        "versions": {"skindual": __version__, **{p: version(p) for p in ("torch", "diffusers", "ray", "webdataset")}},
    })
    write_card(storage, manifest)  # from the same numbers, and again below: it never shows a count the manifest does not
    _check_counts(manifest, counts, cfg, spec)
    _check_devices(storage, manifest)
    # last: the marker that the run is done (`storage.finished`), once its counts and devices are right
    manifest["complete"] = True
    storage.write_bytes(MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
    write_card(storage, manifest)
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


def _follow(dataset, table: pa.Table, todo: list[int], counter, first_shard: Callable[[int], None]) -> None:
    """Drive the dataset: a progress line at least every 30 s (pairs drawn of those to do, rate, ETA, from the
    actors' `DrawCounter`), a line per shard written, and `first_shard` of the first one."""
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
        for written, row in enumerate(dataset.iter_rows()):
            log.info("shard %05d written: %d/%d pairs accepted, %d redraws", row["shard"], row["successes"],
                     row["count"], row["redraws"])
            if not written:
                first_shard(int(row["shard"]))
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
