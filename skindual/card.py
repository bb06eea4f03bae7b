"""The dataset card of an output: ``README.md`` in the Hugging Face dataset-card form, rendered from the
output's ``manifest.json`` (the same numbers), written by prepare and generate each time they write the
manifest, and given the headline figures of an evaluation of the pairs (`add_evaluation`).

The YAML header names the licence (``unknown`` until ``--license`` names one), the task categories, the
size category, tags, the shards as the data files and their features, so ``datasets.load_dataset`` reads
an output folder, or its copy on the Hub, as it is.  The body: what the pairs are (and are not for), the
pairs per class (and split), the files and fields, how they were made, and the loading recipes
(`RECIPES`, which README.md quotes verbatim and the tests run).  A README.md that is not such a card is
never overwritten.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from skindual.errors import UserError
from skindual.prompts import CLASS_BY_CODE
from skindual.shard_format import CARD_FILE, MANIFEST_FILE
from skindual.storage import Storage

log = logging.getLogger(__name__)

PREVIEW_FILE = "preview.png"
MARK = "<!-- skindual dataset card: written from manifest.json by the job that wrote this output; edits are lost -->"
EVALUATION = re.compile(r"<!-- skindual evaluation (\{.*\}) -->\n")
LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
SIZE_CATEGORIES = ("n<1K", "1K<n<10K", "10K<n<100K", "100K<n<1M", "1M<n<10M", "10M<n<100M", "100M<n<1B")
UNKNOWN_LICENSE = ("No licence was given (`license: unknown`): rerun the job with `--license` (a Hugging Face "
                   "licence id such as `cc-by-nc-4.0` or `apache-2.0`; the command is otherwise the same and "
                   "only this card and the manifest change) before you share the pairs.")
EXPORT_MSD = "python jobs/export.py --format msd --synthetic skindual-synthetic --output skindual-msd"

RECIPES: dict[str, str] = {
    "webdataset": '''import numpy as np
import torch
import webdataset as wds

from skindual.shards import shard_urls  # verified pipe: URLs; without skindual: sorted(glob("*/*.tar")), unchecked


def ignore_nothing_by_default(sample):  # a pair without {key}.ignore.png
    sample.setdefault("ignore.png", np.zeros_like(sample["seg.png"]))
    return sample


pairs = (wds.WebDataset(shard_urls("skindual-synthetic"), shardshuffle=100)
         .decode(wds.imagehandler("rgb8", ["jpg"]), wds.imagehandler("l8", ["png"]))  # masks: H×W, 0/255
         .map(ignore_nothing_by_default).to_tuple("jpg", "seg.png", "ignore.png", "cls", "json"))
loader = torch.utils.data.DataLoader(pairs.batched(16), batch_size=None, num_workers=2)
''',
    "skindual": '''from skindual.shards import read_shards  # a folder or s3://; each shard verified whole before its pairs

for sample in read_shards("skindual-synthetic", to_tensors=True):
    image, mask, label = sample["image"], sample["mask"], sample["class_index"]  # 3×H×W, 1×H×W, int
    ignore = sample["ignore"]  # 1×H×W, 1: leave out of the loss (all 0 without a map)
    meta = sample["meta"]  # the pair's json
''',
    "datasets": '''from datasets import Features, Image, Json, Value, load_dataset

features = Features({"__key__": Value("string"), "jpg": Image(), "seg.png": Image(), "ignore.png": Image(),
                     "cls": Value("int64"), "txt": Value("string"), "json": Json()})  # --image-format png: "png"
pairs = load_dataset("webdataset", data_files={"train": "skindual-synthetic/*.tar"}, split="train",
                     features=features)
pair = pairs[0]  # "jpg": RGB image, "seg.png": its mask (L, 0/255), "cls": int, "json": dict; "ignore.png": None if no map
''',
    "datasets-card": '''from datasets import load_dataset

pairs = load_dataset("skindual-synthetic", split="train")  # README.md declares the features: those above it has
''',
    "ray-data": '''import os

import ray

# checks no sha256; the workers read it: a folder every node has (by its absolute path), or s3://...
pairs = ray.data.read_webdataset(os.path.abspath("skindual-synthetic"), file_extensions=["tar"])
''',
    "monai": '''from monai.data import Dataset, load_decathlon_datalist
from monai.transforms import LoadImaged

items = load_decathlon_datalist("skindual-msd/Task501_SkinDualGen/dataset.json", data_list_key="training")
keys = [k for k in ("image", "label", "ignore") if k in items[0]]  # "ignore": the pairs' ignore maps, if any
pairs = Dataset(items, LoadImaged(keys=keys, ensure_channel_first=True))
pair = pairs[0]  # "image": 3×W×H, "label": 1×W×H (0/1), "ignore": 1×W×H (1: leave out), "class": int
''',
}
"""The loading recipes of README.md's "Loading the pairs", verbatim (a test runs each on a real output); the
``monai`` one after ``EXPORT_MSD``."""
REAL_RECIPES = ("webdataset", "skindual", "datasets", "datasets-card", "ray-data")


def check_license(value: str) -> None:
    """A `UserError` unless `value` is empty (unknown) or shaped like a Hugging Face licence id."""
    if value and not LICENSE_ID.fullmatch(value):
        raise UserError(f"--license {value!r}: give a licence id as the Hugging Face Hub spells it, lower case "
                        "(cc-by-4.0, cc-by-nc-4.0, apache-2.0, other, ...)")


def size_category(pairs: int) -> str:
    """The Hub's ``size_categories`` bucket of `pairs` rows."""
    return next((name for power, name in enumerate(SIZE_CATEGORIES, 3) if pairs < 10 ** power), "1B<n<10B")


def is_real(manifest: Mapping[str, Any]) -> bool:
    return manifest.get("kind") == "real"


def _fields(manifest: Mapping[str, Any]) -> list[tuple[str, str, str]]:
    """The tar members of every pair: (name, the Hub's dtype, what it holds)."""
    cfg = manifest.get("config", {})
    image = "jpg" if is_real(manifest) else cfg.get("image_format", "jpg")
    side = manifest.get("resolved", {}).get("resolution")
    fields = [("__key__", "string", "the pair's key, its files' name: 9 digits, shard·10⁴ + index"),
              (image, "image", f"the image, RGB{f', {side}×{side}' if side else ''}"
                               + (" (the download's JPEG, or resized with --max-side)" if is_real(manifest) else "")),
              ("seg.png", "image", "the lesion mask: 8-bit grayscale, 0 background, 255 lesion")]
    if cfg.get("qc_segmenter"):
        fields.append(("ignore.png", "image", "the ignore map: 8-bit, 255 where a segmenter trained on the real "
                                              "pairs confidently contradicts the mask (and a band of 1/64 of the "
                                              "side around); a segmenter trained on the pairs leaves those pixels "
                                              "out of its loss"))
    fields += [("cls", "int64", "the class index as text: " + ", ".join(f"{c.index} {c.code}" for c in CLASS_BY_CODE.values())
                + (" (-1: ISIC 2018's unclassed pairs)" if is_real(manifest) else "")),
               ("txt", "string", "the prompt"),
               ("json", "json", "the pair's metadata: image and lesion id, split, site, age, sex, source, diagnosis "
                                "type" if is_real(manifest) else
                                "the pair's metadata: seed, base model, adapter sha256, layout, scheduler, steps, "
                                "guidance, QC status, attempts, consistency score and ignore-map share, mode (joint or "
                                "mask) and, in mask mode, its given mask's source key and augmentation seed")]
    return fields


def _header(manifest: Mapping[str, Any]) -> str:
    cfg, totals = manifest.get("config", {}), manifest["totals"]
    tags = ["synthetic"] if not is_real(manifest) else ["real"]
    tags += ["medical", "dermatology", "skin-lesion", "dermoscopy", "webdataset", "skindual"]
    if is_real(manifest):
        tags += [t for t, flag in (("ham10000", "ham10000"), ("isic-2018", "isic2018")) if cfg.get(flag)]
    lines = ["---", f"license: {cfg.get('license') or 'unknown'}",
             f"pretty_name: {'Skin-lesion image and mask pairs' if is_real(manifest) else 'Synthetic skin-lesion image and mask pairs'}",
             "task_categories:", "- image-segmentation", "- image-classification",
             "size_categories:", f"- {size_category(int(totals['successes']))}", "tags:", *[f"- {t}" for t in tags],
             "configs:", "- config_name: default", "  data_files:", "  - split: train", '    path: "*.tar"',
             "dataset_info:", "  features:"]
    for name, dtype, _ in _fields(manifest):
        lines += [f"  - name: {json.dumps(name)}", f"    dtype: {dtype}"]
    return "\n".join(lines + ["---", MARK, ""])


def _shards(n: int) -> str:
    return f"{n} WebDataset shard{'' if n == 1 else 's'}"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows])


def _class_name(code: str) -> str:
    return CLASS_BY_CODE[code].name if code in CLASS_BY_CODE else "no class (ISIC 2018)"


def _counts(manifest: Mapping[str, Any]) -> str:
    totals = manifest["totals"]
    per_class = totals["per_class"]
    codes = sorted(per_class, key=lambda c: CLASS_BY_CODE[c].index if c in CLASS_BY_CODE else 99)
    if is_real(manifest):
        splits = sorted(totals.get("per_split", {}))
        rows = [[f"`{c}`", _class_name(c), *(totals["per_split"][s].get(c, 0) for s in splits), per_class[c]["ok"]]
                for c in codes]
        rows.append(["all", "", *(sum(totals["per_split"][s].values()) for s in splits), totals["successes"]])
        return _table(["class", "diagnosis", *splits, "pairs"], rows)
    asked = manifest.get("asked_per_class", {})
    rows = [[f"`{c}`", _class_name(c), per_class[c]["ok"], asked.get(c, "")] for c in codes]
    rows.append(["all", "", totals["successes"], sum(asked.values()) if asked else ""])
    return _table(["class", "diagnosis", "pairs", "asked"], rows)


def _made(manifest: Mapping[str, Any]) -> str:
    """How the pairs were made: the model, the sampler, quality control and the share of draws kept."""
    cfg, resolved, totals = manifest.get("config", {}), manifest.get("resolved", {}), manifest["totals"]
    draws, kept = int(totals.get("draws", 0)), int(totals["successes"])
    share = f"{kept} of {draws} draws passed quality control ({kept / draws:.1%})" if draws else f"{kept} pairs"
    qc = (f"mask area between {cfg.get('min_mask_area')} and {cfg.get('max_mask_area')} of the image, the largest "
          f"component at least {cfg.get('min_main_share')} of the mask")
    if cfg.get("qc_segmenter"):
        qc += (f"; QC segmenter `{resolved.get('qc_segmenter', '')}`, image–mask consistency (Dice) at least "
               f"{cfg.get('min_consistency')}")
    mode = (f"mask mode: each image sampled for a given real train mask (`{resolved.get('mask_source', '')}`), "
            "augmented" if cfg.get("mask_source") else "joint: image and mask sampled together")
    if cfg.get("controlnet"):
        mode += (f"; each image drawn for its mask by the ControlNet `{resolved.get('controlnet', '')}`"
                 + ("" if cfg.get("mask_source") else ", the mask sampled first by the joint model"))
    if cfg.get("segmenter_guidance"):
        mode += (f"; segmenter guidance: {cfg['segmenter_guidance']} Adam steps, twice while sampling, nudged each "
                 "image towards one the QC segmenter reads as its mask (so its consistency scores are no independent "
                 "check)")
    rows = [["base model", f"`{resolved.get('base_model', '')}`"],
            ["adapter", f"`{resolved.get('adapter', 'none')}`, layout `{resolved.get('layout', '')}`"],
            ["resolution", resolved.get("resolution", "")], ["mode", mode],
            ["sampler", f"{cfg.get('scheduler')}, {cfg.get('steps')} steps, guidance {cfg.get('guidance')}, "
                        f"seed {cfg.get('seed')}, batch {cfg.get('batch_size')}, {resolved.get('dtype', cfg.get('dtype'))}"],
            ["prompts", "the adapter's template; site, age and sex drawn from its training data"
             if cfg.get("prompt_attributes") == "adapter" else "the class alone"],
            ["quality control", f"{qc}; up to {cfg.get('max_attempts')} draws per pair"],
            ["kept", f"{share}; {totals.get('failed_to_generate', 0)} rows failed every draw"],
            ["device", f"`{resolved.get('device_model', '')}`"],
            ["versions", ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))],
            ["settings fingerprint", f"`{manifest.get('fingerprint', '')}`"]]
    return _table(["", ""], rows)


def _sources(manifest: Mapping[str, Any]) -> str:
    cfg, totals = manifest.get("config", {}), manifest["totals"]
    skipped = sum(manifest.get("skipped", {}).values())
    rows = [["sources", ", ".join(f"{name} `{cfg[flag]}`" for name, flag in (("HAM10000", "ham10000"),
                                                                                ("ISIC 2018", "isic2018")) if cfg.get(flag))],
            ["split", f"by lesion, seed {cfg.get('seed')}: val {cfg.get('val_fraction')}, test {cfg.get('test_fraction')}"],
            ["stored", f"resized to at most {cfg['max_side']} px a side" if cfg.get("max_side") else "the download's bytes"],
            ["skipped", f"{skipped} bad rows or files (listed in manifest.json)" if skipped else "none"],
            ["shards", f"{totals['shards']} of at most {cfg.get('samples_per_shard')} pairs"],
            ["versions", ", ".join(f"{k} {v}" for k, v in sorted(manifest.get("versions", {}).items()))]]
    return _table(["", ""], rows)


def _evaluation(block: Mapping[str, Any]) -> str:
    marker = f"<!-- skindual evaluation {json.dumps(dict(block), sort_keys=True)} -->\n"
    lines = [f"- {line}" for line in block.get("lines", [])]
    return marker + "## Evaluation\n\n" + f"By `jobs/evaluate.py` into `{block.get('report', '')}`:\n\n" + "\n".join(lines) + "\n"


def render_card(manifest: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None, preview: bool = False) -> str:
    """The card of an output from its manifest (a synthetic set's, or a prepared real dataset's), with an
    evaluation's headline (`add_evaluation`'s block) and the preview image when given."""
    cfg, totals = manifest.get("config", {}), manifest["totals"]
    real, pairs, shards = is_real(manifest), int(totals["successes"]), int(totals["shards"])
    license_id = cfg.get("license") or ""
    parts = [_header(manifest)]
    if real:
        parts.append(f"# Skin-lesion image and mask pairs\n\n{pairs:,} dermoscopy images with their lesion masks "
                     f"in {_shards(shards)}, prepared by skindual's `jobs/prepare.py` from real data: each "
                     "image is a real patient's lesion. Every later skindual stage reads them.\n")
    else:
        mode = "for a given real mask" if cfg.get("mask_source") else "together with its mask"
        parts.append(f"# Synthetic skin-lesion image and mask pairs\n\n{pairs:,} synthetic dermoscopy-style images "
                     f"with their lesion masks in {_shards(shards)}, class-balanced, made by skindual's "
                     f"`jobs/generate.py`. **Synthetic**: a diffusion model sampled every image {mode}; no image "
                     "shows a real patient.\n")
    if preview:
        parts.append(f"![preview]({PREVIEW_FILE})\n")
    if not manifest.get("complete", False):
        parts.append("**Partial**: this output is not complete (a run cut short, or classes that quality control left "
                     "short); the counts below are of its committed shards only. Run the same command again to finish it.\n")
    parts.append(("## Pairs per class and split\n\n" if real else "## Pairs per class\n\n") + _counts(manifest) + "\n")
    fields = _table(["file", "holds"], [[f"`{{key}}.{name}`" if name != "__key__" else "`{key}`", what]
                                        for name, dtype, what in _fields(manifest)])
    parts.append(f"## Files\n\nEach shard `{{shard:05d}}.tar` holds, per pair:\n\n{fields}\n\nBeside the tars: "
                 "`{shard:05d}.parquet` (every row, rejected ones with their reason), `{shard:05d}_stats.json` (counts, "
                 "sizes and sha256 of the shard's files, written last: the commit marker), `sizes.json`, "
                 "`manifest.json` (the settings and the totals this card shows) and `run.json`.\n")
    parts.append(("## Where they come from\n\n" + _sources(manifest) if real else
                  "## How they were made\n\n" + _made(manifest)) + "\n")
    if evaluation is not None and not real:
        parts.append(_evaluation(evaluation))
    parts.append(_use(real, license_id))
    names = REAL_RECIPES if real else tuple(RECIPES)
    recipes = [f"```bash\n{EXPORT_MSD}\n```\n\n```python\n{RECIPES[n]}```" if n == "monai" else f"```python\n{RECIPES[n]}```"
               for n in names]
    parts.append("## Loading\n\nFrom the folder that holds this output as `skindual-synthetic` (or with its path in "
                 "place of that name):\n\n" + "\n\n".join(recipes) + "\n")
    return "\n".join(parts)


def _use(real: bool, license_id: str) -> str:
    licence = f"Licence: `{license_id}`." if license_id else UNKNOWN_LICENSE
    if real:
        return ("## Use and limits\n\n- Real patients' lesions: the licence and terms of the source download bind "
                f"this copy. {licence}\n- The source's class imbalance and population (HAM10000: two clinics' "
                "patients, mostly light skin) carry over to everything trained on it.\n")
    return ("## Use and limits\n\n- For research and development of lesion segmentation and classification: "
            "augmenting rare classes, pretraining, testing pipelines.\n- Not for diagnosis or any clinical "
            "decision, not as evidence about real lesions or their prevalence, and not as a test set: measure "
            "models on real held-out pairs.\n- A mask is as faithful as the model: the pair's json holds its QC "
            "scores, and the ignore maps mark the pixels to distrust.\n- The pairs inherit the biases of the "
            "model's training data and of its base model.\n"
            f"- {licence} The licences of the base model and of the data the adapter was trained on bind the "
            "pairs too.\n")


def _is_ours(storage: Storage) -> tuple[bool, str]:
    """(whether the output's README.md may be written: absent or a skindual card, its text)."""
    try:
        text = storage.read_bytes(CARD_FILE).decode("utf-8", "replace")
    except FileNotFoundError:
        return True, ""
    return MARK in text, text


def has_card(storage: Storage) -> bool:
    """Whether the output holds a skindual card (a run that starts afresh deletes it with the manifest)."""
    ours, text = _is_ours(storage)
    return ours and bool(text)


def write_card(storage: Storage, manifest: Mapping[str, Any], evaluation: Mapping[str, Any] | None = None) -> bool:
    """Write the output's card from `manifest` (atomically), keeping an earlier evaluation of the same pairs (its
    fingerprint) unless `evaluation` replaces it; False, with a warning, where a README.md that is not a skindual
    card is in the way."""
    ours, text = _is_ours(storage)
    if not ours:
        log.warning("%s is not a skindual dataset card: left as it is, no card written", storage.join(CARD_FILE))
        return False
    if evaluation is None and (found := EVALUATION.search(text)):
        earlier = json.loads(found.group(1))
        evaluation = earlier if earlier.get("fingerprint") == manifest.get("fingerprint") else None
    card = render_card(manifest, evaluation, preview=storage.exists(PREVIEW_FILE))
    storage.write_bytes(CARD_FILE, card.encode())
    return True


def update_license(storage: Storage, manifest: dict[str, Any], license_id: str) -> dict[str, Any]:
    """A finished output given another licence: its manifest (the same otherwise) and card say so; the manifest."""
    if not license_id or manifest.get("config", {}).get("license") == license_id:
        return manifest
    manifest = {**manifest, "config": {**manifest.get("config", {}), "license": license_id}}
    storage.write_bytes(MANIFEST_FILE, json.dumps(manifest, sort_keys=True, indent=1).encode())
    write_card(storage, manifest)
    log.info("%s: licence now %s", storage.url, license_id)
    return manifest


def add_evaluation(storage: Storage, lines: list[str], report: str) -> bool:
    """Put an evaluation's headline `lines` (and where its `report` is) into the card of the synthetic output in
    `storage`; False where the output has no manifest (no card to add to) or another README.md."""
    try:
        manifest = json.loads(storage.read_bytes(MANIFEST_FILE))
    except FileNotFoundError:
        return False
    block = {"fingerprint": manifest.get("fingerprint"), "lines": list(lines), "report": report}
    return write_card(storage, manifest, block)
