"""Pictures and reports: contact sheets of pairs (each image with its mask's outline drawn on it: a
dataset's ``preview.png``, the evaluation's per-class sheets), the validation grid (image | mask overlay
per class) and loss curve of a fine-tuning run; the evaluation's figures and its ``report.md``.
matplotlib runs headless (Agg).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

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


MASK_OUTLINE = (0, 255, 0)
"""The colour of a pair's own mask outline on a contact sheet."""
QC_OUTLINE = (0, 200, 255)
"""The colour of the QC segmenter's mask outline beside it."""
IGNORE_TINT = (255, 0, 255)
"""The tint of a pair's ignore map (the pixels a segmenter trained on the pair leaves out)."""
SHEET_BACKGROUND = (255, 255, 255)

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 of the image inside a sheet, x1 and y1 exclusive


def outline(mask: np.ndarray, width: int = 2) -> np.ndarray:
    """The mask's pixels within `width` px of its edge with the background (inside the mask: drawn on the lesion's
    rim, never over the skin around it; where the mask meets the image's frame there is no edge to draw)."""
    from scipy import ndimage

    m = np.asarray(mask).astype(bool)
    return m & ~ndimage.binary_erosion(m, iterations=width, border_value=1)


def sheet_panel(image: np.ndarray, mask: np.ndarray, side: int, ignore: np.ndarray | None = None,
                colour: tuple[int, int, int] = MASK_OUTLINE) -> tuple[np.ndarray, Box]:
    """One pair as a `side`-px square picture: the whole image scaled to fit (its aspect kept, the rest
    background), its ignore map tinted (when given) and the mask's outline (`outline`, 2 px; 1 px below
    96 px) drawn at that scale, so it stays crisp; and the image's box inside the square."""
    h, w = image.shape[:2]
    scale = side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    picture = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.LANCZOS), np.float32)
    scaled = np.asarray(Image.fromarray((np.asarray(mask) > 0).astype(np.uint8) * 255).resize(
        size, Image.Resampling.BILINEAR)) >= 128
    if ignore is not None and np.any(ignore):
        tinted = np.asarray(Image.fromarray((np.asarray(ignore) > 0).astype(np.uint8) * 255).resize(
            size, Image.Resampling.BILINEAR)) >= 128
        picture[tinted] = 0.55 * picture[tinted] + 0.45 * np.asarray(IGNORE_TINT, np.float32)
    picture[outline(scaled, 2 if side >= 96 else 1)] = colour
    out = np.full((side, side, 3), SHEET_BACKGROUND, np.uint8)
    x, y = (side - size[0]) // 2, (side - size[1]) // 2
    out[y:y + size[1], x:x + size[0]] = picture.astype(np.uint8)
    return out, (x, y, x + size[0], y + size[1])


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the small bitmap font
        return ImageFont.load_default()


def contact_sheet(rows: list[tuple[str, list[list[tuple[np.ndarray, Box]]]]], title: str = "",
                  gap: int = 3, group_gap: int = 12) -> tuple[Image.Image, list[list[list[Box]]]]:
    """A contact sheet: one row per (label, groups), the label on the left, each group (one pair: its
    `sheet_panel` pictures side by side, `gap` px apart) `group_gap` px from the next, an optional `title`
    line on top.  Returns the sheet and, per row, group and picture, the image's box on the sheet."""
    font, small = _font(14), _font(12)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max((measure.textlength(label, font=font) for label, _ in rows), default=0)
    left = int(label_width) + 16
    side = max((p.shape[1] for _, groups in rows for g in groups for p, _ in g), default=1)
    # each row as tall as its tallest image (a landscape image's letterbox is left out)
    spans = [(min((b[1] for g in groups for _, b in g), default=0), max((b[3] for g in groups for _, b in g), default=1))
             for _, groups in rows]
    width_of = [sum(len(g) * side + (len(g) - 1) * gap for g in groups) + group_gap * max(0, len(groups) - 1)
                for _, groups in rows]
    top = 24 if title else 8
    width = max(left + max(width_of, default=0) + 8, int(measure.textlength(title, font=small)) + 16)
    sheet = Image.new("RGB", (width, top + sum(y1 - y0 + 8 for y0, y1 in spans)), SHEET_BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    if title:
        draw.text((8, 6), title, fill=(60, 60, 60), font=small)
    boxes: list[list[list[Box]]] = []
    y = top
    for (label, groups), (y0_row, y1_row) in zip(rows, spans):
        draw.text((8, y + (y1_row - y0_row) // 2), label, fill=(0, 0, 0), font=font, anchor="lm")
        x, row_boxes = left, []
        for group in groups:
            group_boxes = []
            for picture, (x0, y0, x1, y1) in group:
                sheet.paste(Image.fromarray(picture[y0_row:y1_row]), (x, y))
                group_boxes.append((x + x0, y + y0 - y0_row, x + x1, y + y1 - y0_row))
                x += side + gap
            row_boxes.append(group_boxes)
            x += group_gap - gap
        boxes.append(row_boxes)
        y += y1_row - y0_row + 8
    return sheet, boxes


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


def controlnet_grid(pipe, given: dict[int, tuple[np.ndarray, np.ndarray]], steps: int, seed: int, path: str | Path,
                    guidance: float = 4.0, batch: int = 4) -> None:
    """Per class of `given` (class index → (real images, their 0/1 masks)), in class order, a row: the images a
    `ControlNetPipeline` draws for those masks (`batch` at a time), then the real pairs the masks came from, each
    image beside itself with its mask's outline; saved as PNG."""
    rows = []
    for c in sorted(given):
        images, masks = given[c]
        prompts = [build_prompt(CLASSES[c].code)] * len(masks)
        seeds = [row_seed(seed, 10**9 + 100 * c + i) for i in range(len(masks))]
        drawn = np.concatenate([pipe(prompts[i:i + batch], seeds[i:i + batch], steps=steps, guidance=guidance,
                                     masks=masks[i:i + batch]).images for i in range(0, len(masks), batch)])
        rows.append(list(zip(drawn, masks)) + list(zip(images, masks)))
    pair_grid(rows, alpha=0.0).save(path)


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


SHEET_CELL = 128
"""Side in pixels of each picture on the evaluation's per-class sheets."""


def sheet_file(code: str) -> str:
    return f"sheet_{code}.png"


def agreement_sheet(rows: dict[str, list[dict]], cell: int = SHEET_CELL) -> tuple[Image.Image, list[list[list[Box]]]]:
    """A class's sheet: per row label (a set) its pairs, each its image with its mask's outline (`MASK_OUTLINE`, its
    ignore map tinted) and, when the pair has ``qc`` (the QC segmenter's mask of its image), the same image with
    that outline (`QC_OUTLINE`) right beside it; and the pictures' boxes (`contact_sheet`)."""
    with_qc = any("qc" in p for pairs in rows.values() for p in pairs)
    title = "green: the pair's mask" + ("; blue, beside it: the QC segmenter's mask of the image" if with_qc else "")
    if any(p["ignore"].any() for pairs in rows.values() for p in pairs):
        title += "; magenta: the ignore map"
    sheet_rows = [(label, [[sheet_panel(p["image"], p["mask"], cell, p["ignore"]),
                            *([sheet_panel(p["image"], p["qc"], cell, colour=QC_OUTLINE)] if "qc" in p else [])]
                           for p in pairs]) for label, pairs in rows.items()]
    return contact_sheet(sheet_rows, title)


def write_figures(folder: Path, metrics: dict, tables: dict, sheets: dict[str, dict[str, list[dict]]]) -> list[str]:
    """The evaluation's PNGs in `folder`: a sheet per class (`sheets`: class code → row label → pairs, see
    `agreement_sheet`), FD per class, the mask-statistic histograms (`tables`: "real"/"synthetic" →
    `mask_stats.statistics_table`) and, with a downstream benchmark in `metrics`, its bars; returns the file
    names."""
    from skindual import mask_stats  # here: the preview's sheets (prepare, generate) need neither it nor torch

    plt = _pyplot()
    names = []
    for code, rows in sheets.items():
        agreement_sheet(rows)[0].save(folder / sheet_file(code))
        names.append(sheet_file(code))
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
    from skindual import downstream

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


GUIDED_NOTE = ("The synthetic images were drawn with `--segmenter-guidance` by this same QC segmenter, which nudged "
               "each towards an image it reads as the pair's mask: its agreement and QC consistency figures for them "
               "are not an independent check (a segmenter of another architecture, trained apart, is).")


def _fmt(v, digits: int = 3) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _per_class_section(metrics: dict, figures: list[str]) -> list[str]:
    """The report's table of agreement and diversity per class, and the class sheets."""
    fid, quality = metrics["fidelity"], metrics.get("pair_quality", {})
    agreement = {name: quality.get(name, {}).get("qc_consistency_per_class", {}) for name in ("synthetic", "real_test")}
    lines = ["", "## Agreement and diversity per class", ""]
    if agreement["synthetic"]:
        lines += ["Agreement: the mean Dice between each pair's mask and the QC segmenter's mask of its image, for the "
                  "synthetic pairs and the real test pairs (held out from the segmenter's training).", ""]
        lines += [GUIDED_NOTE, ""] if metrics.get("synthetic_guided_by_qc_segmenter") else []
    else:
        lines += ["No QC segmenter was given, so there are no agreement figures and no segmenter outlines: train one "
                  "with `jobs/qc_model.py` on the real data and pass its output as `--qc-segmenter`.", ""]
    lines += [f"Diversity: the mean distance between two images of the class in the feature space of "
              f"`{fid['extractor']}`, for the synthetic pairs and the real `{metrics['config']['fid_split']}` split, "
              "and synthetic / real (as in the fidelity table).", "",
              "| class | agreement synthetic | agreement real | diversity synthetic | diversity real | diversity ratio |",
              "|---|---|---|---|---|---|"]
    for code, v in fid["per_class"].items():
        lines.append(f"| {code} | {_fmt(agreement['synthetic'].get(code))} | {_fmt(agreement['real_test'].get(code))} "
                     f"| {_fmt(v.get('spread_synthetic'))} | {_fmt(v.get('spread_real'))} "
                     f"| {_fmt(v.get('spread_ratio'), 2)} |")
    sheets = [name for name in figures if name.startswith("sheet_")]
    if sheets:
        lines += ["", "Per class, a row of synthetic pairs and a row of real test pairs: each image with its mask's "
                  "outline (green; the ignore map tinted magenta)"
                  + (" and, right beside it, the same image with the QC segmenter's outline (blue)." if agreement["synthetic"]
                     else "."), ""]
        for name in sheets:
            code = name.removeprefix("sheet_").removesuffix(".png")
            lines += [f"### {code}", "", f"![{code}]({name})", ""]
    return lines


def render_report(metrics: dict, figures: list[str]) -> str:
    """``report.md`` of an evaluation's metrics (``metrics.json``) and figures."""
    from skindual import downstream

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
        if metrics.get("synthetic_guided_by_qc_segmenter"):
            lines += ["", GUIDED_NOTE]
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
    lines += _per_class_section(metrics, figures)
    return "\n".join(lines) + "\n"


def headline_lines(metrics: dict) -> list[str]:
    """An evaluation's headline figures, a line each (the synthetic set's dataset card shows them): what was
    compared, FD/KD over all classes, the synthetic pairs' quality and the downstream gain."""
    fid, cfg, counts = metrics["fidelity"], metrics["config"], metrics["counts"]
    fd, kd = fid["fd_name"], fid["kd_name"]
    synthetic = counts["synthetic"]
    lines = [f"{sum(synthetic.values())} synthetic pairs ({', '.join(f'{c} {n}' for c, n in synthetic.items())}) "
             f"against the real `{cfg['real']}` ({cfg['fid_split']} split, {sum(counts['real'].values())} pairs) "
             f"at {metrics['image_size']}²",
             f"{fd} {_fmt(fid['overall'][fd], 2)}, {kd} {_fmt(fid['overall'][kd], 4)} over all classes"
             + ("" if fd == "FID" else f" (features of `{fid['extractor']}`: not comparable with published FIDs)")]
    quality = metrics.get("pair_quality", {}).get("synthetic")
    if quality:
        lines.append(f"image–mask consistency (Dice) {_fmt(quality['consistency_dice'])}, sane masks "
                     f"{_fmt(quality['sane_mask_share'])}, class fidelity {_fmt(quality.get('class_fidelity_mean'))}")
    if "downstream" in metrics:
        d = metrics["downstream"]
        for model, metric in (("classifier", "macro_f1"), ("segmenter", "dice")):
            e = d["summary"][model][metric]
            lines.append(f"{model} {metric} on real test pairs: {_fmt(e['real']['mean'])} (real) → "
                         f"{_fmt(e['real+synthetic']['mean'])} (real + synthetic, {d['settings'].get('hybrid', 'mix')}; "
                         f"mean of {len({r['seed'] for r in d['results']})} seeds)")
    return lines
