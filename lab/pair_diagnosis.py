"""Pairs that agree: what the joint model's fine-tune lets the image learn from its mask, measured before any lever
is chosen.  One command, one table.

Per variant and seed (``--seeds``: the fine-tune's and the generation's seed), in one process with no Ray (GPU when
there is one), on the pieces of lab/consistency_levers.py:

  1. the fine-tune: the demo chain's settings (`DEMO_FINETUNE`) changed by the variant, on the real cut
     (``--real-fraction``); its seconds a step (the first left out) and peak memory (GPU: max_memory_allocated; CPU:
     the resident set's peak over it less the resident set before it);
  2. the raw draws (``--per-class`` a class: the QC scores, rejects none) and the QC-kept draws (the threshold the
     demo chain would pick from the raw draws, ``--qc-attempts`` draws a pair);
  3. agreement: the held-out judge's Dice between each pair's mask and its own segmentation of the pair's image
     (segmentation_models_pytorch's U-Net, ResNet-18 encoder, trained on the whole real train split: another
     architecture than the QC's), mean over the raw and over the kept pairs;
  4. class fidelity of the raw draws (the lesion-cnn trained on the real train split: the share of a class's draws
     it classifies as that class, mean over classes), and per class the diversity ratio: `fidelity.feature_spread`
     of the class's raw draws over that of the real train pairs of the class, in the same lesion-cnn's features
     (the evaluation's measure; 1: as varied as the real pairs), the least over classes and each class's;
  5. a contact sheet (``sheets/<variant>.png``, seed 0): per class a row of raw pairs, each its image and the image
     with its own mask's outline on it (`report.pair_grid`); ``sheets/real.png`` the same of real pairs.

A variant is a comma-separated ``FIELD=VALUE`` list: `FinetuneConfig` fields (``lora_targets=attention+resnet``,
``prior_min_t=600``, ``w_prior=0``, ``train=full``), ``steps=xK`` (K times ``--finetune-steps``), and the sampling
fields of `GENERATION_FIELDS` (``guidance=2``); an empty one is the demo's settings.  ``train=controlnet`` trains a
ControlNet beside the frozen base (`CONTROLNET_SETTINGS`) and draws each image for a given mask: the real cut's
(``masks=real``) or the demo variant's joint samples' (``masks=joint``).  ``--classes`` draws only
those classes (the real row too).  Variants differing only in
sampling share their fine-tunes.  ``--preset issue`` runs `PRESETS["issue"]`.  The first row is the real pairs
(the train cut; their class fidelity is the classifier's on its own training images).

Writes ``OUTPUT/pair_diagnosis.md`` (the table) and ``OUTPUT/pair_diagnosis.json`` (every seed's figures), both
rewritten after each variant, and ends with one JSON line of the table.  A rerun into the same OUTPUT with the same
`SETTINGS` adds to that table: the variants and seeds it holds are kept, not measured again (so a run cut short, or
split over several sessions, continues), and the fine-tunes done under ``OUTPUT/runs`` are reused.

    python lab/pair_diagnosis.py --preset issue --seeds 3 --output RUN
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import controlnet_base_lora
import numpy as np
import torch
from consistency_levers import (SIZE, as_set, build_judges, draw_sets, fine_tune, generation_config, load_world,
                                per_pair_dice)
from finetune_quality import parse_fields

from skindual import fidelity, quality, report
from skindual.demo.chain import DEMO_FINETUNE, DEMO_QC_ATTEMPTS
from skindual.base_models import resolve_base_model
from skindual.demo.world import split_pairs, vae_round_trip, world_base
from skindual.finetune_config import FinetuneConfig
from skindual.model import load_pipeline
from skindual.prompts import CLASS_CODES

SETTINGS = ("difficulty", "real_fraction", "finetune_steps", "per_class", "classes", "sample_steps", "qc_attempts",
            "judge_steps", "qc_steps", "extractor_steps")
"""The flags every figure of a table shares: a rerun into the same --output must give the same ones."""
GENERATION_FIELDS = {"guidance": float, "scheduler": str, "mask_smoothing": float, "control_scale": float,
                     "control_end": float, "segmenter_guidance": int, "masks": str}
"""The variant fields that change the sampling, not the fine-tune (`GenerateConfig` fields, and ``masks``: where a
ControlNet variant's masks come from, ``real`` (default: the real cut's train masks, augmented, generate's
--mask-source) or ``joint`` (the masks the demo variant's joint model samples first, generate's --adapter))."""
CONTROLNET_SETTINGS = {"w_prior": 0.0}
"""What a ``train=controlnet`` variant changes of the demo's settings before its own fields: the prior term is the
joint model's (the ControlNet trains beside a frozen base); steps, lr, batch, EMA and schedule stay the demo's."""
PRESETS = {"issue": [
    "",  # today: LoRA r32 on the attention projections, the prior at weight 10 everywhere, guidance 4
    "lora_rank=16", "lora_rank=64",
    "lora_targets=attention+resnet", "lora_targets=attention+resnet,lora_rank=16",
    "lora_targets=attention+resnet,lora_rank=64",
    "train=full,lr=0.0001",  # the whole UNet, at the learning rate lab/notes/finetune-quality.md trained it with
    "prior_min_t=600",  # the prior only where class and layout form (t >= 600 of 1000)
    "w_prior=0", "w_prior=1", "w_prior=3",
    "guidance=2", "guidance=3",
    "steps=x2", "steps=x4",
    "train=controlnet",  # images drawn for the real cut's masks by a ControlNet beside the frozen base
    "train=controlnet,masks=joint",  # ... for the masks the demo's joint model samples first
]}
"""Named variant lists: ``issue``, the diagnosis of what is trained, the prior term, guidance and length."""


@dataclass(frozen=True)
class Variant:
    name: str  # "demo", or its fields as k-v joined by _
    finetune: dict  # FinetuneConfig fields
    sampling: dict  # GenerateConfig fields
    run_name: str  # its fine-tune's name under OUTPUT/runs, without the seed: variants differing in sampling share it


def parse_variant(text: str, finetune_steps: int) -> Variant:
    """A ``FIELD=VALUE,...`` variant: `GENERATION_FIELDS` to the sampling, ``steps=xK`` to K × `finetune_steps`,
    the rest to the fine-tune (`FinetuneConfig` fields, typed by their defaults)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    finetune, sampling, named = {}, {}, {}
    for part in parts:
        key, _, value = part.partition("=")
        named[key] = value
        if key in GENERATION_FIELDS:
            sampling[key] = GENERATION_FIELDS[key](value)
        elif key == "base_lora":  # lab/controlnet_base_lora.py: LoRA of this rank on the base, with the ControlNet
            finetune["base_lora"] = int(value)
        elif key == "steps" and value.startswith("x"):
            finetune["steps"] = round(float(value[1:]) * finetune_steps)
        else:
            finetune |= parse_fields([part])

    def name(keys) -> str:
        return "_".join(f"{k}-{named[k]}" for k in sorted(keys)) or "demo"

    return Variant(name(named), finetune, sampling, name(set(named) - set(GENERATION_FIELDS)))


def per_class_diversity(features: np.ndarray, labels: np.ndarray, real_features: np.ndarray,
                        real_labels: np.ndarray) -> dict[str, float | None]:
    """Per class, the spread of its features over the spread of the real features of that class (None below 2)."""
    out = {}
    for c, code in enumerate(CLASS_CODES):
        mine = fidelity.feature_spread(features[labels == c])
        real = fidelity.feature_spread(real_features[real_labels == c])
        out[code] = round(mine / real, 4) if mine is not None and real else None
    return out


def pair_figures(pairs: dict, judge, extractor, real_features: np.ndarray, real_labels: np.ndarray,
                 device: torch.device) -> dict:
    """The judge's agreement, class fidelity and per-class diversity of one set of pairs in memory."""
    images, labels = pairs["image"], pairs["label"]
    judged = per_pair_dice(judge, images, pairs["mask"], device)
    fid = quality.class_fidelity(extractor.model, images, labels)
    return {"pairs": int(len(labels)), "draws": int(pairs.get("draws", len(labels))),
            "judge": round(float(judged.mean()), 4) if len(judged) else None,
            "class_fidelity": round(float(np.mean(list(fid.values()))), 4) if fid else None,
            "diversity": per_class_diversity(extractor(images), labels, real_features, real_labels)}


def contact_sheet(pairs: dict, per_class: int, path: Path) -> None:
    """Per class drawn, in class order, a row of its first `per_class` pairs: the image, and the image with its own
    mask's outline drawn on it."""
    rows = [[(pairs["image"][i], pairs["mask"][i]) for i in np.flatnonzero(pairs["label"] == c)[:per_class]]
            for c in np.unique(pairs["label"])]
    path.parent.mkdir(parents=True, exist_ok=True)
    report.pair_grid(rows, alpha=0.0).save(path)


def summary(per_seed: list[dict]) -> dict:
    """The table's row of a variant: each figure's mean (and std over seeds), the least class diversity."""

    def stat(values: list) -> dict:
        values = [v for v in values if v is not None]
        return {"mean": round(float(np.mean(values)), 4) if values else None,
                "std": round(float(np.std(values, ddof=1)), 4) if len(values) > 1 else 0.0}

    diversity = {c: stat([s["raw"]["diversity"][c] for s in per_seed])["mean"] for c in CLASS_CODES}
    known = {c: v for c, v in diversity.items() if v is not None}
    least = min(known, key=known.get) if known else None
    train = [s.get("finetune", {}) for s in per_seed]
    return {"judge_raw": stat([s["raw"]["judge"] for s in per_seed]),
            "judge_kept": stat([s["kept"]["judge"] for s in per_seed]),
            "draws_per_kept_pair": stat([s["kept"]["draws"] / max(s["kept"]["pairs"], 1) for s in per_seed]),
            "class_fidelity": stat([s["raw"]["class_fidelity"] for s in per_seed]),
            "diversity_min": known.get(least), "diversity_min_class": least, "diversity": diversity,
            "seconds_per_step": stat([t.get("seconds_per_step") for t in train]),
            "peak_memory_gb": stat([t.get("peak_memory_gb") for t in train]), "seeds": len(per_seed)}


def markdown(table: dict, device: str) -> str:
    """The table as markdown: mean ± std over seeds."""

    def cell(x: dict | None, digits: int = 3) -> str:
        if not x or x["mean"] is None:
            return "—"
        return f"{x['mean']:.{digits}f}" + (f" ± {x['std']:.{digits}f}" if x.get("std") else "")

    lines = [f"| variant | judge raw | judge kept | draws a kept pair | class fidelity | diversity min | diversity "
             f"({' '.join(CLASS_CODES)}) | s/step | peak GB ({device}) | seeds |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in table.items():
        least = "—" if row["diversity_min"] is None else f"{row['diversity_min']:.2f} ({row['diversity_min_class']})"
        listed = " ".join("—" if row["diversity"][c] is None else f"{row['diversity'][c]:.2f}" for c in CLASS_CODES)
        lines.append(f"| {name} | {cell(row['judge_raw'])} | {cell(row['judge_kept'])} | "
                     f"{cell(row['draws_per_kept_pair'], 1)} | {cell(row['class_fidelity'])} | {least} | {listed} | "
                     f"{cell(row['seconds_per_step'], 2)} | {cell(row['peak_memory_gb'], 2)} | {row['seeds']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--difficulty", default="hard", choices=["easy", "hard"])
    parser.add_argument("--real-fraction", type=float, default=0.2)
    parser.add_argument("--variants", nargs="*", default=[""], help="one comma-separated FIELD=VALUE list a variant")
    parser.add_argument("--preset", choices=list(PRESETS), help="run these variants (after any --variants)")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune and generation seeds 0..N-1 per variant")
    parser.add_argument("--finetune-steps", type=int, default=DEMO_FINETUNE["steps"])
    parser.add_argument("--per-class", type=int, default=50, help="raw (and kept) pairs a class per seed")
    parser.add_argument("--classes", default="", help="comma-separated class codes to draw; empty: all seven")
    parser.add_argument("--sample-steps", type=int, default=25, help="sampling steps (generation's --steps)")
    parser.add_argument("--qc-attempts", type=int, default=DEMO_QC_ATTEMPTS, help="draws a kept pair at most")
    parser.add_argument("--sheet-per-class", type=int, default=8, help="pairs a class on each contact sheet")
    parser.add_argument("--judge-steps", type=int, default=600)
    parser.add_argument("--qc-steps", type=int, default=600)
    parser.add_argument("--extractor-steps", type=int, default=300, help="training steps of the lesion-cnn")
    parser.add_argument("--data-scale", type=float, default=0.1, help="the demo world's size, when it is prepared here")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--world", default="", help="a demo world prepared earlier (its real/ and demo_world.json); "
                                                    "default: prepare one under OUTPUT")
    args = parser.parse_args(argv)
    texts = list(args.variants) + (PRESETS[args.preset] if args.preset else [])
    variants = [parse_variant(v, args.finetune_steps) for v in dict.fromkeys(texts)]
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    device_label = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    out, f = Path(args.output).resolve(), args.real_fraction
    started = time.perf_counter()
    settings = {k: getattr(args, k) for k in SETTINGS} | {"device": device_label}
    earlier = json.loads((out / "pair_diagnosis.json").read_text()) if (out / "pair_diagnosis.json").is_file() else {}
    if earlier and earlier.get("settings") != settings:
        changed = ", ".join(f"{k} {earlier.get('settings', {}).get(k)!r} now {v!r}" for k, v in settings.items()
                            if earlier.get("settings", {}).get(k) != v)
        raise SystemExit(f"{out / 'pair_diagnosis.json'} was measured with other settings ({changed}): give another "
                         "--output, or the same settings to add variants and seeds to it")
    real, real_test = load_world(out, args.difficulty, args.world, args.data_scale)
    out.mkdir(parents=True, exist_ok=True)
    judges = build_judges(real, f, out, args.qc_steps, args.judge_steps, device)
    real_all = judges.real_all
    extractor = fidelity.build_extractor("lesion-cnn", size=SIZE, train=lambda: (real_all["image"], real_all["label"]),
                                         steps=args.extractor_steps, seed=0)
    real_features = extractor(real_all["image"])
    results: dict = {"settings": settings, "torch": torch.__version__, "qc_val_dice": round(judges.qc_val, 4),
                     "judge_on_real_val": round(float(per_pair_dice(judges.judge, judges.val["image"],
                                                                    judges.val["mask"], device).mean()), 4),
                     "variants": {}}
    asked = [CLASS_CODES.index(c) for c in args.classes.split(",")] if args.classes else list(range(len(CLASS_CODES)))
    real_cut = {k: v[np.isin(judges.real_cut["label"], asked)] for k, v in judges.real_cut.items()}
    real_row = pair_figures(real_cut, judges.judge, extractor, real_features, real_all["label"], device)
    contact_sheet(real_cut, args.sheet_per_class, out / "sheets" / "real.png")
    # the ceiling a generator drawing through this base's decoder can be measured against: real pairs the judge never
    # saw (the test split), as they are and with their images round-tripped through the base's VAE (consistent by
    # construction, with the decoder's look)
    test = as_set(split_pairs(real_test, "all", SIZE))
    held_out = {k: v[np.isin(test["label"], asked)] for k, v in test.items()}
    vae = load_pipeline(resolve_base_model(world_base(args.difficulty))).vae.eval()
    round_trip = held_out | {"image": vae_round_trip(vae, held_out["image"])}
    fixed_rows = {"real pairs (train cut)": real_row,
                  "real test pairs (held out from the judge)": pair_figures(
                      held_out, judges.judge, extractor, real_features, real_all["label"], device),
                  "real test pairs through the base's VAE (the decoder's ceiling)": pair_figures(
                      round_trip, judges.judge, extractor, real_features, real_all["label"], device)}
    contact_sheet(round_trip, args.sheet_per_class, out / "sheets" / "real-test-vae.png")
    results["variants"] = {name: [{"raw": row, "kept": row}] for name, row in fixed_rows.items()} | {
        name: per_seed for name, per_seed in earlier.get("variants", {}).items() if name not in fixed_rows}
    table = {name: summary(per_seed) for name, per_seed in results["variants"].items()}

    def save() -> None:
        results["table"], results["seconds"] = table, round(time.perf_counter() - started, 1)
        (out / "pair_diagnosis.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "pair_diagnosis.md").write_text(markdown(table, device_label))

    def finetune_config(run_name: str, seed: int, fields: dict) -> FinetuneConfig:
        return FinetuneConfig(training_data=real, real_fraction=f, output=str(out / "runs"),
                              name=f"{run_name}-seed{seed}", base_model=world_base(args.difficulty),
                              use_gpu=device.type == "cuda", seed=seed,
                              validation_per_class=1, validation_steps=args.sample_steps,
                              **{**DEMO_FINETUNE, "steps": args.finetune_steps, **fields})

    for variant in variants:
        per_seed = results["variants"].get(variant.name, [])  # an earlier run's seeds are kept, not measured again
        controlnet = variant.finetune.get("train") == "controlnet"
        for seed in sorted(set(range(args.seeds)) - {s["seed"] for s in per_seed}):
            fields = dict(variant.finetune)
            base_lora = fields.pop("base_lora", 0)
            if base_lora and not controlnet:
                raise SystemExit(f"variant {variant.name}: base_lora= is a setting of a train=controlnet variant")
            ft = finetune_config(variant.run_name, seed, {**(CONTROLNET_SETTINGS if controlnet else {}), **fields})
            hooks = controlnet_base_lora.hooks(base_lora) if base_lora else {}
            figures: dict = {"seed": seed, "finetune": fine_tune(ft, device, **hooks)}
            t = time.perf_counter()
            adapter, sampling = str(out / "runs" / ft.name / "adapter"), dict(variant.sampling)
            masks = sampling.pop("masks", "real")
            if controlnet and masks == "joint":  # the demo variant's joint model samples each mask first
                joint = finetune_config("demo", seed, {})
                fine_tune(joint, device)
                sampling |= {"controlnet": adapter}
                adapter = str(out / "runs" / joint.name / "adapter")
            elif controlnet:  # the real cut's train masks, augmented (the ControlNet trained on their pairs)
                sampling |= {"controlnet": adapter, "mask_source": real, "mask_fraction": f}
                if base_lora:  # the base it trained beside, its LoRA fused in
                    sampling["base_model"] = str(out / "runs" / ft.name / controlnet_base_lora.BASE_DIR)
                adapter = ""
            elif "masks" in variant.sampling:
                raise SystemExit(f"variant {variant.name}: masks= is a setting of a train=controlnet variant")
            gen = generation_config(adapter, judges, args.per_class, device, seed=seed, steps=args.sample_steps,
                                    classes=args.classes, **sampling)
            sets, figures["threshold"], figures["threshold_from"] = draw_sets(gen, judges.qc_val, "pilot",
                                                                              args.qc_attempts)
            figures["generation_seconds"] = round(time.perf_counter() - t, 1)
            for which, pairs in sets.items():
                figures[which] = pair_figures(pairs, judges.judge, extractor, real_features, real_all["label"], device)
            if seed == 0:
                contact_sheet(sets["raw"], args.sheet_per_class, out / "sheets" / f"{variant.name}.png")
            per_seed.append(figures)
        results["variants"][variant.name] = sorted(per_seed, key=lambda s: s["seed"])
        table[variant.name] = summary(per_seed)
        save()
        print(json.dumps({variant.name: table[variant.name]}), flush=True)
    save()
    line = {"device": device_label, "seconds": results["seconds"], "table": table}
    print(json.dumps(line), flush=True)
    return line


if __name__ == "__main__":
    main()
