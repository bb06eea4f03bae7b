"""Pictures and reports: the validation grid (image | mask overlay per class) and loss curve of a
fine-tuning run; the evaluation's figures and its ``report.md``.  matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from skindual import downstream, mask_stats
from skindual.prompts import CLASSES, build_prompt, row_seed


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overlay(image: np.ndarray, mask: np.ndarray, colour=(0, 255, 0), alpha: float = 0.45) -> np.ndarray:
    """The image with the mask tinted on top and its outline drawn."""
    from scipy import ndimage

    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    edge = m & ~ndimage.binary_erosion(m)
    out[edge] = colour
    return out.astype(np.uint8)


def pair_grid(rows: list[list[tuple[np.ndarray, np.ndarray]]], scale: int = 2, alpha: float = 0.45) -> Image.Image:
    """A grid with one row per list: each pair shown as image | overlay (the mask tinted at `alpha`, 0: its outline
    only), 2 px gaps."""
    cells = max(len(r) for r in rows)
    h, w = rows[0][0][0].shape[:2]
    gap = 2
    canvas = np.full((len(rows) * (h + gap), cells * (2 * w + gap), 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, (image, mask) in enumerate(row):
            y, x = i * (h + gap), j * (2 * w + gap)
            canvas[y:y + h, x:x + w] = image
            canvas[y:y + h, x + w:x + 2 * w] = overlay(image, mask, alpha=alpha)
    img = Image.fromarray(canvas)
    return img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)


def validation_grid(dual, per_class: int, steps: int, seed: int, path: str | Path, guidance: float = 4.0,
                    batch: int = 4) -> None:
    """Sample `per_class` pairs of every class with a `DualPipeline`, `batch` prompts at a time (memory
    stays that of one batch), and save the grid PNG."""
    prompts = [build_prompt(c.code) for c in CLASSES for _ in range(per_class)]
    seeds = [row_seed(seed, 10**9 + i) for i in range(len(prompts))]
    pairs = []
    for start in range(0, len(prompts), batch):
        sample = dual(prompts[start:start + batch], seeds[start:start + batch], steps=steps, guidance=guidance)
        pairs += list(zip(sample.images, sample.masks))
    pair_grid([pairs[c * per_class:(c + 1) * per_class] for c in range(len(CLASSES))]).save(path)


def loss_curve(history: list[dict], path: str | Path) -> None:
    """Each loss term against the optimiser step (log scale), saved as PNG."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    steps = [h["step"] for h in history]
    for term in ("total", "img", "mask", "geo", "prior"):
        values = [h.get(term, 0.0) for h in history]  # "prior": runs from before that term have none
        if any(values):
            ax.plot(steps, values, label=term, linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# --------------------------------------------------------------------------- the evaluation's figures and report


def write_figures(folder: Path, metrics: dict, tables: dict, grids: dict[str, list]) -> list[str]:
    """The evaluation's PNGs in `folder`: the sample grids (`grids`: file name → rows of pairs), FD per
    class, the mask-statistic histograms (`tables`: "real"/"synthetic" → `mask_stats.statistics_table`)
    and, with a downstream benchmark in `metrics`, its bars; returns the file names."""
    plt = _pyplot()
    names = []
    for name, rows in grids.items():
        pair_grid(rows).save(folder / name)
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


def _recipe(settings: dict) -> str:
    """How the downstream arms trained, in words (reports written before the hybrid recipe existed: mix)."""
    steps = f"{settings['steps']} steps of batch {settings['batch_size']}"
    if settings.get("hybrid", "mix") == "mix":
        return f"{steps} in both arms, the hybrid arm on the pool of real and synthetic pairs"
    return (f"two schedules of {steps} in both arms: the hybrid arm pretrained on the synthetic pairs, then "
            f"fine-tuned on the real ones; the real arm both times on the real pairs")


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
    """``report.md`` of an evaluation's metrics (``metrics.json``) and figures."""
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
    quality = metrics.get("pair_quality", {})
    if quality:
        lines += ["", "## Pair quality", "",
                  "Image–mask consistency: Dice between each mask and an independent, training-free segmentation of "
                  "its image; sane: the mask passes generation's checks (not empty, not full-frame, one main "
                  "component); class fidelity: the share of each class's images the lesion-cnn classifier (trained on "
                  "the real images) assigns to that class; QC consistency (with --qc-segmenter): Dice between the "
                  "mask and the QC segmenter's mask of the image.", "",
                  "| set | pairs | consistency | QC consistency | sane masks | class fidelity (mean) |",
                  "|---|---|---|---|---|---|"]
        for name, q in quality.items():
            lines.append(f"| {name} | {q['pairs']} | {_fmt(q['consistency_dice'])} | {_fmt(q.get('qc_consistency_dice'))} "
                         f"| {_fmt(q['sane_mask_share'])} | {_fmt(q.get('class_fidelity_mean'))} |")
    if "downstream" in metrics:
        d = metrics["downstream"]
        s = d["settings"]
        test = metrics["counts"]["real_test"]
        tested_on = f"`{cfg['test_data']}`" if cfg.get("test_data") else "the real test split"
        lines += ["", "## Downstream: real vs real + synthetic", "",
                  f"{s['classifier']} classifier and {s['segmenter']} segmenter at {s['size']}², "
                  f"{_recipe(s)}, tested on {tested_on} ({sum(test.values())} pairs: {test}); "
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
