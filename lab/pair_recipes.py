"""Which synthetic pairs help segmentation: one table of recipes on the demo world.

Rows (each against the same real train cut, test set and seeds):
  real only; + joint pairs, raw (no QC); + joint pairs with the pair-level QC; + ignore maps (the same pairs,
  their ignore maps out of the segmenter's loss); + pairs of the consistency-reward fine-tune (QC, ignore
  maps); + mask-conditioned pairs (generate --mask-source with an adapter fine-tuned with
  --mask-condition-rate, QC, ignore maps); pretrain on the QC'd joint
  pairs, then fine-tune on real; and its control, real only with the same two schedules (twice the steps);
  + ControlNet pairs (the demo chain's default: a ControlNet fine-tuned with `DEMO_CONTROLNET` draws each
  image for a real train mask of the cut, augmented; QC) mixed in, and pretrain on them, then fine-tune on real.
Columns: each synthetic set's consistency judged by a held-out segmenter of another architecture
(segmentation_models_pytorch's U-Net with a ResNet-18 encoder, trained on the whole real train split; the QC
and the reward use the small in-house U-Net), downstream segmenter Dice and IoU (in-house U-Net), classifier
macro-F1 and the two rarest classes' recall (in-house classifier), class fidelity and diversity (lesion-cnn
features: mean pairwise distance, the real train cut's beside it).

The fine-tunes and generations run through their stage plans on an embedded local Ray cluster (a rerun
reuses what is done); the judge and the downstream models train in this process on pools held in memory,
each batch drawn uniformly from the arm's pool (so the synthetic share of a batch is its share of the pool),
the same seeds in every row.

    python lab/pair_recipes.py --difficulty hard --real-fraction 0.2 --seeds 3 --output RUN
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from skindual import data, downstream, fidelity, finetune, pairs, quality
from skindual.cluster import init_ray
from skindual.demo.chain import (
    DEMO_CONTROLNET,
    DEMO_FINETUNE,
    DEMO_QC_ATTEMPTS,
    DEMO_SAMPLES_PER_SHARD,
    DemoConfig,
    choose_min_consistency,
)
from skindual.demo.world import prepare_demo_world, world_base
from skindual.errors import UserError
from skindual.finetune import plan_finetune, run_finetune
from skindual.finetune_config import FinetuneConfig
from skindual.generate import plan_generate, run_generate
from skindual.generate_config import GenerateConfig
from skindual.prompts import CLASS_CODES
from skindual.qc_model import QCModelConfig, plan_qc_model, run_qc_model
from skindual.storage import LocalStorage

SIZE = 64
ROW_SETS = {"real only": None, "+ joint pairs, raw": "raw", "+ joint pairs, pair-level QC": "qc", "+ ignore maps": "qc",
            "+ consistency-reward fine-tune": "consistency", "+ mask-conditioned pairs": "mask",
            "pretrain synthetic → fine-tune real": "qc", "real only, twice the steps": None,
            "+ ControlNet pairs, pair-level QC": "controlnet",
            "pretrain ControlNet pairs → fine-tune real": "controlnet"}
"""The synthetic set each row adds (None: real pairs only)."""
SET_ADAPTER = {"raw": "joint", "qc": "joint", "consistency": "consistency", "mask": "mask-conditioned",
               "controlnet": "controlnet"}
"""The fine-tune whose adapter draws each set."""


def load_set(url: str, selection: dict | None = None, partial: bool = False) -> dict[str, np.ndarray]:
    """Every usable pair of a dataset (or `selection`), with its ignore map, in memory at `SIZE` (`partial`: also a
    generation the QC left short, which never finishes)."""
    storage = LocalStorage(url)
    if selection is None:
        selection = pairs.selection_of(data.classed_rows(pairs.usable_rows(pairs.read_index(url, partial=partial))))
    decoded = [pairs.decode_sample(s, SIZE) for shard in sorted(selection)
               for s in pairs.iter_shard(storage, shard, selection[shard])]
    return {"image": np.stack([d["image"] for d in decoded]), "mask": np.stack([d["mask"] for d in decoded]),
            "ignore": np.stack([d["ignore"] for d in decoded]),
            "label": np.asarray([d["class_index"] for d in decoded], np.int64)}


def concat(*sets: dict) -> dict:
    return {k: np.concatenate([s[k] for s in sets]) for k in sets[0]}


def batches(pool: dict, batch_size: int, seed: int, ignore: bool):
    g = np.random.default_rng(seed)
    while True:
        idx = g.integers(0, len(pool["label"]), batch_size)
        out = (pool["image"][idx], pool["mask"][idx], pool["label"][idx])
        yield (*out, pool["ignore"][idx]) if ignore else out


def train(kind: str, task: str, pools: list[dict], steps: int, seed: int, ignore: bool,
          device: torch.device = torch.device("cpu")) -> torch.nn.Module:
    """One model trained on each pool in turn (`steps` each): one pool, or pretraining then fine-tuning."""
    torch.manual_seed(seed)
    model = downstream.build_model(kind)
    settings = downstream.BenchmarkSettings(steps=steps, batch_size=32, lr=1e-3, ignore_maps=ignore)
    for k, pool in enumerate(pools):
        model = downstream.train_model(model, batches(pool, 32, seed * 100 + k, ignore), task, settings, seed,
                                       device)
    return model


def segmenter_dice(model: torch.nn.Module, images: np.ndarray, masks: np.ndarray,
                   device: torch.device = torch.device("cpu")) -> float:
    test = downstream.PairSet(images, masks, np.zeros(len(images), np.int64))
    return downstream.test_model(model, test, "segmenter", [], device)["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--difficulty", default="hard", choices=["easy", "hard"])
    parser.add_argument("--real-fraction", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--finetune-steps", type=int, default=DEMO_FINETUNE["steps"])
    parser.add_argument("--controlnet-steps", type=int, default=DEMO_CONTROLNET["steps"],
                        help="the ControlNet rows' fine-tune (DEMO_CONTROLNET's other settings)")
    parser.add_argument("--w-consistency", type=float, default=1.0)
    parser.add_argument("--mask-condition-rate", type=float, default=0.5,
                        help="the mask-conditioned row's fine-tune: its share of samples trained with the mask given")
    parser.add_argument("--mask-attempts", type=int, default=32, help="the mask-conditioned row's --max-attempts")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps of every downstream model")
    parser.add_argument("--judge-steps", type=int, default=600)
    parser.add_argument("--rows", nargs="*", default=[],
                        help="only these rows, and only the fine-tunes and synthetic sets they use (default: all)")
    args = parser.parse_args()
    out, f = Path(args.output).resolve(), args.real_fraction
    started = time.perf_counter()
    world = prepare_demo_world(out, measure=False, difficulty=args.difficulty)
    init_ray(DemoConfig().min_cpus())
    real = str(world.real)

    qc = QCModelConfig(training_data=real, real_fraction=f, output=str(out / "qc"),
                       cpus_per_worker=DEMO_FINETUNE["cpus_per_worker"])
    qc_plan = plan_qc_model(qc)
    card = qc_plan.done or run_qc_model(qc_plan)
    unknown = sorted(set(args.rows) - set(ROW_SETS))
    if unknown:
        raise SystemExit(f"--rows {', '.join(map(repr, unknown))}: no such row; the rows are {', '.join(map(repr, ROW_SETS))}")
    needed_sets = {which for row, which in ROW_SETS.items() if which and (not args.rows or row in args.rows)}
    adapters = {}
    joint = {**DEMO_FINETUNE, "steps": args.finetune_steps}
    for name, settings in (("joint", joint),
                           ("consistency", {**joint, "w_consistency": args.w_consistency,
                                            "consistency_segmenter": qc.output}),
                           ("mask-conditioned", {**joint, "mask_condition_rate": args.mask_condition_rate}),
                           ("controlnet", {**DEMO_CONTROLNET, "steps": args.controlnet_steps})):
        if not any(SET_ADAPTER[which] == name for which in needed_sets):  # only what the asked rows use
            continue
        ft = FinetuneConfig(training_data=real, real_fraction=f, output=str(out / "runs"), name=name,
                            base_model=world_base(args.difficulty), **settings)
        plan = plan_finetune(ft)
        if plan.done is None:
            run_finetune(plan)
        adapters[name] = str(out / "runs" / name / "adapter")

    demo = DemoConfig(output=str(out), qc=True, min_consistency=-1)
    base = GenerateConfig(per_class=str(args.per_class), samples_per_shard=DEMO_SAMPLES_PER_SHARD, actors=2,
                          qc_segmenter=qc.output, max_attempts=DEMO_QC_ATTEMPTS)
    sets = {"raw": lambda: replace(base, adapter=adapters["joint"], qc_segmenter="", max_attempts=8,
                                   output=str(out / "syn-raw")),
            "qc": lambda: replace(base, adapter=adapters["joint"], output=str(out / "syn-qc")),
            "consistency": lambda: replace(base, adapter=adapters["consistency"], output=str(out / "syn-consistency")),
            "mask": lambda: replace(base, adapter=adapters["mask-conditioned"], mask_source=real, mask_fraction=f,
                                    max_attempts=args.mask_attempts, output=str(out / "syn-mask")),
            "controlnet": lambda: replace(base, controlnet=adapters["controlnet"], mask_source=real, mask_fraction=f,
                                          output=str(out / "syn-controlnet"))}
    sets = {name: make() for name, make in sets.items() if name in needed_sets}
    thresholds, seconds = {}, {}
    for name, gen in sets.items():
        if name != "raw":
            thresholds[name], _ = choose_min_consistency(demo, card, gen, out / f"pilot-{name}")
            gen = sets[name] = replace(gen, min_consistency=thresholds[name])
        t = time.perf_counter()
        plan = plan_generate(gen)
        try:
            manifest = plan.done or run_generate(plan)
        except UserError as short:  # the QC kept fewer than asked: the table uses what it kept, and says so
            print(f"{name}: {short}", flush=True)
            manifest = json.loads((Path(gen.output) / "manifest.json").read_text())
        seconds[name] = {"seconds": round(time.perf_counter() - t, 1), "pairs": manifest["totals"]["successes"],
                         "rejected": manifest["totals"].get("failed_to_generate", 0),
                         "already_done": plan.done is not None}

    train_rows = finetune.training_rows(pairs.read_index(real), f)
    real_cut = load_set(real, pairs.selection_of(train_rows))
    real_all = load_set(real, pairs.selection_of(data.classed_rows(pairs.usable_rows(pairs.read_index(real)), "train")))
    test = load_set(str(world.test_data))
    synthetic = {name: load_set(gen.output, partial=seconds[name]["pairs"] < sum(gen.counts().values()))
                 for name, gen in sets.items()}

    judge = train("smp_unet", "segmenter", [real_all], args.judge_steps, 0, False)
    judge_test = segmenter_dice(judge, test["image"], test["mask"])
    extractor = fidelity.build_extractor("lesion-cnn", size=SIZE, train=lambda: (real_all["image"], real_all["label"]),
                                         steps=300)
    fidelity_model = quality.train_classifier(real_all["image"], real_all["label"], steps=300, seed=0)
    counts = np.bincount(real_cut["label"], minlength=len(CLASS_CODES))
    rarest = [int(c) for c in np.argsort(counts)[:2]]

    def set_figures(s: dict) -> dict:
        fid = quality.class_fidelity(fidelity_model, s["image"], s["label"])
        return {"consistency_judge": round(segmenter_dice(judge, s["image"], s["mask"]), 4),
                "class_fidelity": round(float(np.mean(list(fid.values()))), 4),
                "diversity": round(fidelity.feature_spread(extractor(s["image"])), 3),
                "disagreement": round(float(s["ignore"].mean()), 4), "pairs": int(len(s["label"]))}

    def mixed(which: str) -> list[dict]:
        return [concat(real_cut, synthetic[which])]

    rows = {"real only": (lambda: [real_cut], False),  # (the pools of its schedules, ignore maps on); its set: ROW_SETS
            "+ joint pairs, raw": (lambda: mixed("raw"), False),
            "+ joint pairs, pair-level QC": (lambda: mixed("qc"), False),
            "+ ignore maps": (lambda: mixed("qc"), True),
            "+ consistency-reward fine-tune": (lambda: mixed("consistency"), True),
            "+ mask-conditioned pairs": (lambda: mixed("mask"), True),
            "pretrain synthetic → fine-tune real": (lambda: [synthetic["qc"], real_cut], True),
            "+ ControlNet pairs, pair-level QC": (lambda: mixed("controlnet"), False),
            "pretrain ControlNet pairs → fine-tune real": (lambda: [synthetic["controlnet"], real_cut], True),
            # the control of the row above: the same two schedules, both on real, so the same optimiser steps
            "real only, twice the steps": (lambda: [real_cut, real_cut], False)}
    if args.rows:
        rows = {k: v for k, v in rows.items() if k in args.rows}
    table = {}
    for row, (make_pools, ignore) in rows.items():
        pools, which = make_pools(), ROW_SETS[row]
        figures: dict = {"dice": [], "iou": [], "macro_f1": [], "rare_recall": []}
        for seed in range(args.seeds):
            seg = train("unet", "segmenter", pools, args.steps, seed, ignore)
            seg_metrics = downstream.test_model(seg, downstream.PairSet(test["image"], test["mask"], test["label"]),
                                                "segmenter", [], torch.device("cpu"))
            cls = train("small", "classifier", pools, args.steps, seed, False)
            cls_metrics = downstream.test_model(cls, downstream.PairSet(test["image"], test["mask"], test["label"]),
                                                "classifier", CLASS_CODES, torch.device("cpu"))
            figures["dice"].append(seg_metrics["dice"])
            figures["iou"].append(seg_metrics["iou"])
            figures["macro_f1"].append(cls_metrics["macro_f1"])
            figures["rare_recall"].append(float(np.mean([cls_metrics["per_class_recall"][CLASS_CODES[c]]
                                                         for c in rarest])))
        table[row] = {k: {"mean": round(float(np.mean(v)), 4), "std": round(float(np.std(v, ddof=1)), 4)
                          if len(v) > 1 else 0.0} for k, v in figures.items()}
        table[row]["set"] = set_figures(synthetic[which]) if which else set_figures(real_cut)
        print(json.dumps({row: table[row]}), flush=True)

    report = {"difficulty": args.difficulty, "real_fraction": f, "seeds": args.seeds, "per_class": args.per_class,
              "downstream_steps": args.steps, "finetune_steps": args.finetune_steps,
              "controlnet_steps": args.controlnet_steps,
              "w_consistency": args.w_consistency, "mask_condition_rate": args.mask_condition_rate,
              "qc_val_dice": card.get("val_dice"), "thresholds": thresholds,
              "judge_test_dice": round(judge_test, 4), "rarest_classes": [CLASS_CODES[c] for c in rarest],
              "generation": seconds, "table": table, "seconds": round(time.perf_counter() - started, 1)}
    path = out / f"pair_recipes-{args.difficulty}-real{f:g}.json"
    if args.rows and path.exists():  # a run of some rows adds them to the report of the earlier runs
        earlier = json.loads(path.read_text())
        report["table"] = earlier["table"] | table
        report["generation"] = earlier["generation"]
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
