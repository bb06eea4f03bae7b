"""The evaluation job: are the synthetic pairs like the real ones, and do they help?

`load_inputs(config)` reads and checks everything first (bad input is one `UserError` before any
cluster work): the synthetic shards through `skindual.shards.read_shards` (all images one square
size S), and the real pairs of the training table, centre-cropped and resized to S as fine-tuning
saw them.  `run_evaluate(config, inputs)` then measures, on the current Ray cluster:

1. fidelity (`skindual.fidelity`): FID/KID with clean-fid's Inception, or FD/KD in the space of
   another extractor under that name; overall and per class; real features cached;
2. mask statistics (`skindual.mask_stats`), real vs synthetic, overall and per class;
3. the downstream benchmark (`skindual.downstream`): real vs real+synthetic, one Ray task per
   (arm, model, seed), tested on the table's held-out ``test`` split;

and writes ``metrics.json``, ``report.md`` and PNGs to ``--output`` (a folder or s3://).
Everything holds the pairs in memory at S (about 0.8 MB per pair at 512²): cap a large
synthetic set with ``--max-per-class``.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from skindual import __version__, data, downstream, fidelity, mask_stats, report
from skindual.cli import check_fields, option
from skindual.downstream import CLASSIFIERS, SEGMENTERS, PairSet
from skindual.errors import UserError
from skindual.prompts import CLASS_CODES
from skindual.shards import read_shards
from skindual.storage import open_storage

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test", "all")


@dataclass
class EvaluateConfig:
    real: str = option("", "training table parquet from the data stage; empty: the demo world's (built if missing)")
    synthetic: str = option("skindual-synthetic", "shard folder or s3:// prefix written by the generate job")
    output: str = option("skindual-eval", "report folder or s3://bucket/prefix")
    feature_extractor: str = option("inception", "feature space of the fidelity distances (only inception gives FID/KID)",
                                    choices=list(fidelity.EXTRACTORS))
    inception_weights: str = option("", f"path to clean-fid's {fidelity.INCEPTION_FILE} (default: clean-fid's cache, "
                                        f"{fidelity.CLEAN_FID_CACHE})")
    extractor_steps: int = option(300, "training steps of the lesion-cnn extractor")
    fid_split: str = option("train", "split of the real table the synthetic pairs are compared with", choices=list(SPLITS))
    max_per_class: int = option(0, "use at most this many pairs per class of each set (0: all)")
    kid_subsets: int = option(100, "KID: number of random subsets")
    kid_subset_size: int = option(1000, "KID: largest subset size")
    cache_dir: str = option("", "real-feature cache (default: $SKINDUAL_CACHE/features)")
    size: int = option(64, "resolution of the downstream models and of the small feature extractors")
    downstream: bool = option(True, "run the downstream benchmark (real vs real+synthetic)")
    classifier: str = option("resnet18", "downstream classifier", choices=list(CLASSIFIERS))
    segmenter: str = option("unet", "downstream segmenter", choices=list(SEGMENTERS))
    steps: int = option(300, "optimiser steps of every downstream model (the same in both arms)")
    batch_size: int = option(32, "downstream batch size")
    lr: float = option(1e-3, "downstream learning rate (AdamW, cosine decay)")
    seeds: int = option(3, "downstream seeds per (arm, model)")
    test_table: str = option("", "downstream test set: a separate real table (all its classed rows), e.g. the "
                                 "ISIC 2018 test images through the data stage; empty: the --real table's test split")
    real_fraction: float = option(1.0, "share of the real train split both downstream arms train on, per class "
                                       "(at least one image each; the test split is unchanged): below 1, the "
                                       "low-data regime where rare classes have a handful of images")
    cpus_per_task: float = option(1.0, "CPUs per downstream Ray task (also its torch threads)")
    num_gpus_per_task: float = option(-1.0, "GPUs per downstream task; -1: 1 if the cluster has GPUs, else 0")
    grid_per_class: int = option(4, "pairs per class in the sample grids")
    seed: int = option(0, "seed of the extractor training and the KID subsets (downstream seeds are seed..seed+seeds-1)")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("extractor_steps", "kid_subsets", "kid_subset_size", "steps", "batch_size", "seeds"))
        if self.size < 16 or self.size % 8:
            raise UserError(f"--size {self.size}: must be a multiple of 8, at least 16")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if self.max_per_class < 0 or self.grid_per_class < 0 or self.cpus_per_task <= 0:
            raise UserError("--max-per-class and --grid-per-class must be >= 0, --cpus-per-task > 0")


@dataclass
class EvalInputs:
    synthetic: PairSet  # at size × size
    real: PairSet  # the --fid-split rows, at size × size
    train: PairSet | None  # downstream: real train split at --size
    test: PairSet | None  # downstream: real test split (or --test-table) at --size
    size: int


def read_synthetic(url: str, s3_endpoint: str | None = None, max_per_class: int = 0) -> tuple[PairSet, list[str]]:
    """All pairs of the committed shards under `url` (keys too); one square size or a `UserError`."""
    images, masks, labels, keys, first = [], [], [], [], None
    taken = np.zeros(len(CLASS_CODES), int)
    for sample in read_shards(url, s3_endpoint):
        label = int(sample["class_index"])
        if not 0 <= label < len(CLASS_CODES):
            raise UserError(f"{url}: sample {sample['key']} has class index {label}; expected 0..{len(CLASS_CODES) - 1}")
        shape = sample["image"].shape[:2]
        first = first or (sample["key"], shape)
        if shape != first[1] or sample["mask"].shape != shape:
            raise UserError(f"{url}: mismatched image sizes: sample {sample['key']} is {shape[1]}x{shape[0]} "
                            f"(mask {sample['mask'].shape[1]}x{sample['mask'].shape[0]}), sample {first[0]} is "
                            f"{first[1][1]}x{first[1][0]}; evaluate one generation run at a time")
        if shape[0] != shape[1]:
            raise UserError(f"{url}: sample {sample['key']} is {shape[1]}x{shape[0]}; the evaluation needs square pairs")
        if max_per_class and taken[label] >= max_per_class:
            continue
        taken[label] += 1
        images.append(sample["image"])
        masks.append(sample["mask"])
        labels.append(label)
        keys.append(sample["key"])
    if not images:
        raise UserError(f"{url}: the committed shards hold no pairs")
    return PairSet(np.stack(images), np.stack(masks), np.asarray(labels, np.int64)), keys


def resize_pairs(pairs: PairSet, size: int) -> PairSet:
    """Square pairs resized as `data.load_pair` does: image Lanczos, mask bilinear thresholded at 0.5."""
    if pairs.images.shape[1] == size:
        return pairs
    images = [np.asarray(Image.fromarray(i).resize((size, size), Image.Resampling.LANCZOS)) for i in pairs.images]
    masks = [np.asarray(Image.fromarray(m.astype(np.float32)).resize((size, size), Image.Resampling.BILINEAR)) >= 0.5
             for m in pairs.masks]
    return PairSet(np.stack(images), np.stack(masks).astype(np.uint8), pairs.labels)


def _rows(table: pa.Table, split: str, max_per_class: int = 0) -> pa.Table:
    classed = table.filter(np.asarray(table.column("class_index")) >= 0)
    if split != "all":
        classed = classed.filter(np.asarray(classed.column("split")) == split)
    if not max_per_class:
        return classed
    labels = np.asarray(classed.column("class_index"))
    keep = np.concatenate([np.flatnonzero(labels == c)[:max_per_class] for c in range(len(CLASS_CODES))])
    return classed.take(np.sort(keep))


def fraction_per_class(rows: pa.Table, fraction: float, seed: int) -> pa.Table:
    """A seeded random `fraction` of each class's rows, rounded up (so at least one per class)."""
    if fraction >= 1:
        return rows
    labels = np.asarray(rows.column("class_index"))
    rng = np.random.default_rng(seed)
    keep = [rng.choice(np.flatnonzero(labels == c), math.ceil(fraction * (labels == c).sum()), replace=False)
            for c in np.unique(labels)]
    return rows.take(np.sort(np.concatenate(keep)))


def load_inputs(cfg: EvaluateConfig) -> EvalInputs:
    """Read and check the synthetic shards and the real table (see the module docstring)."""
    if cfg.feature_extractor == "inception":
        fidelity.find_inception_weights(cfg.inception_weights)  # missing weights: say so before any work
    table = data.read_training_table(cfg.real)
    synthetic, _ = read_synthetic(cfg.synthetic, cfg.s3_endpoint or None, cfg.max_per_class)
    size = synthetic.images.shape[1]
    rows = _rows(table, cfg.fid_split, cfg.max_per_class)
    real_counts = np.bincount(np.asarray(rows.column("class_index"), np.int64), minlength=len(CLASS_CODES))
    missing = [CLASS_CODES[c] for c in np.unique(synthetic.labels) if real_counts[c] == 0]
    if missing:
        raise UserError(f"class {', '.join(missing)} has synthetic pairs in {cfg.synthetic} but no real images in the "
                        f"{cfg.fid_split!r} split of {cfg.real}; add real images of it, choose another --fid-split, "
                        "or evaluate shards of the classes the table has")
    real = PairSet(*data.load_arrays(rows, size))
    train = test = None
    if cfg.downstream:
        train_split = _rows(table, "train")
        train_rows = fraction_per_class(train_split, cfg.real_fraction, cfg.seed)
        test_rows = _test_rows(cfg, table, train_split)
        train, test = (PairSet(*data.load_arrays(t, cfg.size)) for t in (train_rows, test_rows))
        if not len(train):
            raise UserError(f"{cfg.real} has no classed rows in its train split, which the downstream benchmark "
                            "needs; rebuild the table, or pass --no-downstream")
    log.info("%d synthetic pairs at %dx%d, %d real (%s split)%s", len(synthetic), size, size, len(real), cfg.fid_split,
             f", downstream {len(train)} train / {len(test)} test" if train is not None else "")
    return EvalInputs(synthetic, real, train, test, size)


def _test_rows(cfg: EvaluateConfig, table: pa.Table, train: pa.Table) -> pa.Table:
    """The downstream test rows: the table's test split, or every classed row of --test-table, which
    must share no image and no lesion with `train`, the whole train split (before --real-fraction)."""
    if not cfg.test_table:
        rows = _rows(table, "test")
        if not len(rows):
            raise UserError(f"{cfg.real} has no classed rows in its test split, which the downstream benchmark "
                            "needs; rebuild the table, pass --test-table, or pass --no-downstream")
        return rows
    rows = _rows(data.read_training_table(cfg.test_table), "all")
    if not len(rows):
        raise UserError(f"--test-table {cfg.test_table}: no rows with a class; the downstream test set needs "
                        "labelled images")
    for column in ("image_id", "lesion_id"):
        shared = sorted(set(rows.column(column).to_pylist()) & set(train.column(column).to_pylist()))
        if shared:
            raise UserError(f"--test-table {cfg.test_table}: {len(shared)} {column}(s) also in the train split of "
                            f"{cfg.real} (e.g. {shared[0]}); a test set must be held out from training")
    return rows


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def measure_fidelity(cfg: EvaluateConfig, inputs: EvalInputs) -> dict:
    kind = cfg.feature_extractor
    real_small = resize_pairs(inputs.real, cfg.size) if kind != "inception" else inputs.real
    extractor = fidelity.build_extractor(kind, size=cfg.size, device=_device(), inception_weights=cfg.inception_weights,
                                         train=lambda: (real_small.images, real_small.labels),
                                         steps=cfg.extractor_steps, seed=cfg.seed, cache_dir=cfg.cache_dir or None)
    synthetic = resize_pairs(inputs.synthetic, cfg.size) if kind != "inception" else inputs.synthetic
    real_feats, cached = fidelity.cached_features(extractor, real_small.images, cfg.cache_dir or None)
    out = fidelity.fidelity_metrics(extractor.name, real_feats, real_small.labels, extractor(synthetic.images),
                                    synthetic.labels, CLASS_CODES, num_subsets=cfg.kid_subsets,
                                    max_subset_size=cfg.kid_subset_size, seed=cfg.seed)
    fd, kd = (out["overall"][out[k]] for k in ("fd_name", "kd_name"))
    log.info("%s %s, %s %s (real features %s)", out["fd_name"], fd, out["kd_name"], kd, "cached" if cached else "computed")
    return out | {"real_features_cached": cached, "extractor_fingerprint": extractor.fingerprint}


def measure_masks(inputs: EvalInputs) -> tuple[dict, dict]:
    """(comparison overall and per class, the raw statistic tables for the histograms)."""
    real, synthetic = (mask_stats.statistics_table(s.masks) for s in (inputs.real, inputs.synthetic))
    per_class = {}
    for c in np.unique(inputs.synthetic.labels):
        pick = lambda t, labels: {k: v[labels == c] for k, v in t.items()}  # noqa: E731
        per_class[CLASS_CODES[c]] = mask_stats.compare_statistics(pick(real, inputs.real.labels),
                                                                  pick(synthetic, inputs.synthetic.labels))
    return {"overall": mask_stats.compare_statistics(real, synthetic), "per_class": per_class}, {
        "real": real, "synthetic": synthetic}


def run_evaluate(cfg: EvaluateConfig, inputs: EvalInputs | None = None) -> dict:
    """Measure everything and write the report; returns the metrics (also in ``metrics.json``)."""
    started = time.perf_counter()
    inputs = inputs or load_inputs(cfg)
    storage = open_storage(cfg.output, cfg.s3_endpoint or None)
    storage.check()
    metrics: dict = {"config": asdict(cfg), "image_size": inputs.size, "counts": {
        name: {CLASS_CODES[c]: int(n) for c, n in enumerate(np.bincount(s.labels, minlength=7)) if n}
        for name, s in (("real", inputs.real), ("synthetic", inputs.synthetic), ("real_train", inputs.train),
                        ("real_test", inputs.test)) if s is not None}}
    metrics["fidelity"] = measure_fidelity(cfg, inputs)
    metrics["mask_statistics"], tables = measure_masks(inputs)
    if cfg.downstream:
        import ray

        gpus = cfg.num_gpus_per_task if cfg.num_gpus_per_task >= 0 else float(ray.cluster_resources().get("GPU", 0) > 0)
        settings = downstream.BenchmarkSettings(cfg.classifier, cfg.segmenter, cfg.steps, cfg.batch_size, cfg.lr)
        seeds = list(range(cfg.seed, cfg.seed + cfg.seeds))
        log.info("downstream: %d Ray tasks (%s, %s, %d steps)", 4 * len(seeds), cfg.classifier, cfg.segmenter, cfg.steps)
        results = downstream.run_benchmark(inputs.train, resize_pairs(inputs.synthetic, cfg.size), inputs.test,
                                           settings, CLASS_CODES, seeds, cfg.cpus_per_task, gpus)
        metrics["downstream"] = {"settings": asdict(settings) | {"size": cfg.size, "num_gpus_per_task": gpus},
                                 "results": results, "summary": downstream.summarise(results)}
    metrics["versions"] = {"skindual": __version__, **{p: version(p) for p in ("torch", "torchvision", "clean-fid", "ray")}}
    metrics["seconds"] = round(time.perf_counter() - started, 1)
    with tempfile.TemporaryDirectory(prefix="skindual-eval-") as tmp:
        figures = write_figures(Path(tmp), cfg, inputs, metrics, tables)
        for name in figures:
            storage.upload_file(Path(tmp) / name, name)
    storage.write_bytes("metrics.json", (json.dumps(metrics, indent=1, sort_keys=True) + "\n").encode())
    storage.write_bytes("report.md", render_report(metrics, figures).encode())
    log.info("report written to %s", storage.join("report.md"))
    return metrics


# --------------------------------------------------------------------------- figures and report


def write_figures(folder: Path, cfg: EvaluateConfig, inputs: EvalInputs, metrics: dict, tables: dict) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    if cfg.grid_per_class:
        for name, pairs in (("samples_synthetic.png", inputs.synthetic), ("samples_real.png", inputs.real)):
            rows = [[(pairs.images[i], pairs.masks[i]) for i in np.flatnonzero(pairs.labels == c)[:cfg.grid_per_class]]
                    for c in np.unique(inputs.synthetic.labels)]
            report.pair_grid([r for r in rows if r]).save(folder / name)
            names.append(name)
    fid = metrics["fidelity"]
    codes = [c for c, v in fid["per_class"].items() if v[fid["fd_name"]] is not None]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.bar(codes, [fid["per_class"][c][fid["fd_name"]] for c in codes], color="tab:blue")
    ax.axhline(fid["overall"][fid["fd_name"]] or 0, color="k", linestyle="--", linewidth=1, label="all classes")
    ax.set_ylabel(fid["fd_name"])
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "fd_per_class.png")
    names.append("fd_per_class.png")
    fig, axes = plt.subplots(1, len(mask_stats.STATISTICS), figsize=(3 * len(mask_stats.STATISTICS), 2.8), dpi=100)
    for ax, stat in zip(axes, mask_stats.STATISTICS):
        values = [t[stat][np.isfinite(t[stat])] for t in (tables["real"], tables["synthetic"])]
        bins = np.histogram_bin_edges(np.concatenate(values), bins=20)
        for v, label in zip(values, ("real", "synthetic")):
            ax.hist(v, bins=bins, density=True, alpha=0.5, label=label)
        ax.set_title(stat, fontsize=9)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(folder / "mask_statistics.png")
    names.append("mask_statistics.png")
    plt.close("all")
    if "downstream" in metrics:
        names.append(_downstream_plot(folder, metrics["downstream"]["summary"], plt))
    return names


def _downstream_plot(folder: Path, summary: dict, plt) -> str:
    bars = [(model, m) for model, names in downstream.METRICS.items() for m in names if m in summary.get(model, {})]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    x = np.arange(len(bars))
    for k, arm in enumerate(downstream.ARMS):
        means = [summary[model][m][arm]["mean"] for model, m in bars]
        stds = [summary[model][m][arm]["std"] for model, m in bars]
        ax.bar(x + (k - 0.5) * 0.38, means, 0.38, yerr=stds, capsize=3, label=arm)
    ax.set_xticks(x, [m for _, m in bars])
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(folder / "downstream.png")
    plt.close(fig)
    return "downstream.png"


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def render_report(metrics: dict, figures: list[str]) -> str:
    fid, cfg = metrics["fidelity"], metrics["config"]
    fd, kd = fid["fd_name"], fid["kd_name"]
    lines = ["# SkinDualGen evaluation", "",
             f"Synthetic `{cfg['synthetic']}` vs real `{cfg['real']}` ({cfg['fid_split']} split), "
             f"pairs at {metrics['image_size']}². Counts per class: real {metrics['counts']['real']}, "
             f"synthetic {metrics['counts']['synthetic']}.", "", "## Fidelity", ""]
    if fd != "FID":
        lines += [f"Distances in the feature space of `{fid['extractor']}`, not Inception: {fd}/{kd} are not FID/KID "
                  "and are not comparable with published FIDs.", ""]
    lines += [f"Per class is the comparison to read: the synthetic set is class-balanced and the real one is not, so "
              f"the all-class {fd} also measures the class mix. With fewer samples than feature dimensions "
              f"({fd} on n < d) the values are biased upwards; {kd} is unbiased and may dip below 0.", "",
              "Diversity: the mean distance between two images of a set in the same feature space, synthetic "
              "over real (1: as varied as the real images; well below 1: the generator repeats itself).", "",
              f"| class | n real | n synthetic | {fd} | {kd} | diversity (synthetic / real spread) |",
              "|---|---|---|---|---|---|"]
    for code, v in [("all", fid["overall"]), *fid["per_class"].items()]:
        lines.append(f"| {code} | {v['n_real']} | {v['n_synthetic']} | {_fmt(v[fd], 2)} | {_fmt(v[kd], 4)} "
                     f"| {_fmt(v.get('spread_ratio'), 2)} |")
    lines += ["", "![FD per class](fd_per_class.png)", "", "## Mask statistics (all classes)", "",
              "| statistic | real mean | synthetic mean | Wasserstein | KS |", "|---|---|---|---|---|"]
    for stat, v in metrics["mask_statistics"]["overall"].items():
        lines.append(f"| {stat} | {_fmt(v['real_mean'])} | {_fmt(v['synthetic_mean'])} | {_fmt(v['wasserstein'])} "
                     f"| {_fmt(v['ks'])} |")
    lines += ["", "Per class: `metrics.json` → `mask_statistics.per_class`.", "", "![mask statistics](mask_statistics.png)"]
    if "downstream" in metrics:
        d = metrics["downstream"]
        s = d["settings"]
        test = metrics["counts"]["real_test"]
        tested_on = f"`{cfg['test_table']}`" if cfg.get("test_table") else "the real test split"
        lines += ["", "## Downstream: real vs real + synthetic", "",
                  f"{s['classifier']} classifier and {s['segmenter']} segmenter at {s['size']}², {s['steps']} steps of "
                  f"batch {s['batch_size']} in both arms, tested on {tested_on} ({sum(test.values())} pairs: {test}); "
                  f"mean ± std over "
                  f"{len({r['seed'] for r in d['results']})} seeds.", "",
                  "| model | metric | real | real + synthetic | gain |", "|---|---|---|---|---|"]
        for model, entries in d["summary"].items():
            for name, e in entries.items():
                cells = [f"{_fmt(e[a]['mean'])} ± {_fmt(e[a]['std'])}" for a in downstream.ARMS]
                lines.append(f"| {model} | {name} | {cells[0]} | {cells[1]} | {_fmt(e.get('gain'), 3)} |")
        lines += ["", "![downstream](downstream.png)"]
    lines += ["", "## Samples", "", "Each row one class: image | mask overlay.", ""]
    lines += [f"![{n}]({n})" for n in figures if n.startswith("samples_")]
    return "\n".join(lines) + "\n"


def resolve_inputs(cfg: EvaluateConfig, demo_output: str = "skindual-demo") -> EvaluateConfig:
    """Without --real, the demo world's training table and (without --test-table) its separate
    balanced test set (built if missing)."""
    if cfg.real:
        return cfg
    from skindual.demo import prepare_demo_world

    world = prepare_demo_world(demo_output, measure=False)
    return replace(cfg, real=str(world.training_table), test_table=cfg.test_table or str(world.test_table))
