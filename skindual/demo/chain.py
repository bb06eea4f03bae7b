"""The whole chain on the demo world: data → fine-tune → QC segmenter → generate → evaluate (jobs/demo.py).

`run_demo` (jobs/demo.py) runs the five stages on the current Ray cluster into one local folder
(``data/`` and ``real/``, the procedural data and its prepared dataset, ``runs/``, ``qc/``,
``synthetic/``, ``eval/``), each through its own stage's plan and run, with the fine-tuning settings
of `DEMO_FINETUNE`.  Re-running into the same folder keeps what each stage's plan finds done (its
marker, `storage.finished`): the demo data, a finished fine-tuning run (an unfinished one resumes),
the QC segmenter, the committed shards and the evaluation, while their settings and inputs are the
same; delete a stage's folder to run it again.

The pairs come from one of two recipes (``--pairs``): by default a ControlNet (`DEMO_CONTROLNET`) fine-tuned
beside the stock demo base on the real train pairs draws each image for a real train mask, augmented
(generation's ``--controlnet`` with ``--mask-source``); ``joint`` fine-tunes LoRA (`DEMO_FINETUNE`) so that one
sampling pass draws image and mask together, the shipped demo adapter's recipe.  The ControlNet's pairs are the
ones whose images follow their masks (docs/demo.md, "Pairs that agree").
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import Counter
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from skindual import fidelity, finetune, pairs, quality
from skindual.cli import check_fields, option
from skindual.demo.render import DIFFICULTIES
from skindual.demo.world import (DEMO_LICENSE, DEMO_SEGMENTER_GUIDANCE, DEMO_TEST_PER_CLASS, prepare_demo_world,
                                 world_base)
from skindual.downstream import ARMS, CLASSIFIERS, HYBRIDS
from skindual.errors import UserError
from skindual.evaluate import run_evaluate
from skindual.evaluate_plan import EvaluateConfig, plan_evaluate
from skindual.finetune import plan_finetune, run_finetune
from skindual.finetune_config import FinetuneConfig
from skindual.generate import plan_generate, run_generate
from skindual.generate_config import GenerateConfig
from skindual.prompts import CLASSES
from skindual.qc_model import QCModelConfig, plan_qc_model, run_qc_model
from skindual.storage import is_remote

log = logging.getLogger(__name__)

DEMO_FINETUNE = {"layout": "channels", "train": "lora", "lora_rank": 32, "steps": 400, "lr": 5e-4, "batch_size": 16,
                 "w_prior": 10.0, "ema_decay": 0.995, "lr_schedule": "cosine", "cpus_per_worker": 2}
"""The demo's fine-tuning settings (`skindual.finetune_config.FinetuneConfig` fields; the rest keep their
defaults): how the shipped demo adapter (`skindual/assets/demo_adapter`) was trained.  ``w_prior=10``
pins the image branch to the demo base, which was pretrained on this very domain: without it the
mask objective erodes class control (measured in lab/notes/finetune-quality.md).
Retune here; ``--finetune-steps`` of jobs/demo.py overrides ``steps``."""
DEMO_CONTROLNET = {"train": "controlnet", "steps": 1600, "lr": 5e-4, "batch_size": 16, "ema_decay": 0.995,
                   "lr_schedule": "cosine", "cpus_per_worker": 2}
"""The demo's default fine-tune (``--pairs controlnet``): a ControlNet initialised from the demo base's UNet,
trained on the image term for the real pairs' masks, the base frozen (no prior term: the base stays stock).  Its
step count is the one past which the held-out judge's agreement of its pairs stopped rising (400 steps: 0.80,
800: 0.84, 1,600: 0.83 over 3 seeds) while their diversity still rose (lab/notes/pair-diagnosis.md)."""
DEMO_RECIPES = {"controlnet": DEMO_CONTROLNET, "joint": DEMO_FINETUNE}
"""``--pairs`` → its fine-tuning settings."""
DEMO_SAMPLES_PER_SHARD = 50  # several shards even for a small demo: resumable, spread over --actors


# --------------------------------------------------------------------------- the whole chain (jobs/demo.py)

STAGES = ("demo data", "fine-tune", "qc segmenter", "generate", "evaluate")
DEMO_CONSISTENCY_SHARE = 0.9
"""The demo's automatic --min-consistency is at most this share of the QC segmenter's own Dice on the real val
pairs: a generated pair must agree with it nearly as well as a real pair does, or it is drawn again."""
DEMO_QC_ATTEMPTS = 16  # draws per pair with the QC on (generation's default is 8)
DEMO_PILOT_PER_CLASS = 12  # pairs per class of the scored pilot draw that sets the automatic threshold
DEMO_PILOT_QUANTILE = 0.3
"""...and at most this quantile of the pilot's scores in its weakest class: every class's draws then pass
about 70% of the time, so 16 draws fail a row about once in 10^8 (a threshold the generator cannot meet
would leave classes short, which generation refuses)."""


@dataclass
class DemoConfig:
    output: str = option("skindual-demo-run", "local folder for everything: data/, runs/, synthetic/, eval/")
    pairs: str = option("controlnet", "how the pairs are drawn: controlnet (a ControlNet fine-tuned on the real "
                                      "pairs draws each image for a real train mask, augmented: images that follow "
                                      "their masks) or joint (LoRA fine-tuned so that one pass samples image and mask "
                                      "together; its run, shards and report get their own folders)",
                        choices=list(DEMO_RECIPES))
    finetune_steps: int = option(0, "fine-tuning optimiser steps; 0: the recipe's (controlnet "
                                    f"{DEMO_CONTROLNET['steps']}, joint {DEMO_FINETUNE['steps']}; the other settings: "
                                    "skindual.demo.chain.DEMO_CONTROLNET and DEMO_FINETUNE)")
    per_class: int = option(100, "synthetic pairs per class")
    actors: int = option(2, "generator actors (one CPU each)")
    eval_steps: int = option(150, "optimiser steps of every downstream model in the evaluation")
    seeds: int = option(2, "downstream seeds per (arm, model)")
    real_fraction: float = option(1.0, "share of each class of the real train split the whole chain sees: fine-tuning "
                                        "and both downstream arms (below 1: the low-data regime; its run, shards and "
                                        "report get their own folders)")
    hybrid: str = option(EvaluateConfig.hybrid, "the evaluation's hybrid recipe: pretrain on the synthetic pairs, "
                                                "then fine-tune on the real ones, or mix them", choices=list(HYBRIDS))
    classifier: str = option("small", "downstream classifier (resnet18: the evaluation job's default, slower on CPU)",
                             choices=list(CLASSIFIERS))
    extractor_steps: int = option(EvaluateConfig.extractor_steps, "training steps of the lesion-cnn classifier "
                                                                  "(fidelity features, class fidelity)")
    feature_extractor: str = option("lesion-cnn", "feature space of the fidelity distances (inception gives FID/KID "
                                                  "but needs --inception-weights)", choices=list(fidelity.EXTRACTORS))
    inception_weights: str = option("", f"with --feature-extractor inception: path to clean-fid's "
                                        f"{fidelity.INCEPTION_FILE}")
    max_mask_area: float = option(quality.MaskLimits().max_area,
                                  "generation QC: a larger mask (share of the image) is 'full-frame' and drawn again")
    overwrite: bool = option(False, "replace synthetic shards written with other settings (e.g. another "
                                    "--finetune-steps or --per-class)")
    difficulty: str = option("easy", "the demo world: easy, or hard (hair, low contrast, fuzzy borders, uneven "
                                     "light, lesions at the frame; its own demo base, demo-hard)",
                             choices=list(DIFFICULTIES))
    qc: bool = option(True, "redraw generated pairs the consistency-QC segmenter (trained on the real train pairs) "
                            "disagrees with; --no-qc: only score them (its shards and report get their own folders)")
    min_consistency: float = option(-1.0, "with --qc: the least Dice between a generated mask and the segmenter's "
                                          f"mask of its image; -1: the lower of {DEMO_CONSISTENCY_SHARE:g} × the "
                                          "segmenter's Dice on the real val pairs and the weakest class's "
                                          f"{DEMO_PILOT_QUANTILE:g} quantile in a scored pilot draw "
                                          f"({DEMO_PILOT_PER_CLASS} pairs a class)")
    segmenter_guidance: int = option(DEMO_SEGMENTER_GUIDANCE, "with --pairs controlnet: generation's "
                                                              "--segmenter-guidance, Adam steps that nudge each image "
                                                              "towards one the QC segmenter reads as its mask (0: off; "
                                                              "another value: its shards and report get their own "
                                                              "folders)")
    qc_steps: int = option(QCModelConfig.steps, "training steps of the QC segmenter")
    validation_steps: int = option(FinetuneConfig.validation_steps, "sampling steps of the fine-tune's validation "
                                                                     "grid (runs/NAME/validation_grid.png)")
    prompt_attributes: str = option("adapter", "generation's --prompt-attributes (none: its shards and report get "
                                               "their own folders)", choices=["adapter", "none"])

    def __post_init__(self) -> None:
        if self.finetune_steps < 0:
            raise UserError(f"--finetune-steps {self.finetune_steps}: must be at least 1 (or 0: the recipe's)")
        check_fields(self, ("per_class", "actors", "eval_steps", "seeds", "extractor_steps",
                            "qc_steps", "validation_steps"))
        if self.segmenter_guidance < 0:
            raise UserError(f"--segmenter-guidance {self.segmenter_guidance}: must be 0 (off) or more Adam steps")
        if not (0 <= self.min_consistency <= 1 or self.min_consistency == -1):
            raise UserError(f"--min-consistency {self.min_consistency}: must be in [0, 1] (or -1: automatic)")
        if is_remote(self.output):
            raise UserError(f"--output {self.output}: the demo writes a local folder; run the stage jobs "
                            "(jobs/finetune.py, generate.py, evaluate.py) for s3:// outputs")
        if self.feature_extractor == "inception":
            fidelity.find_inception_weights(self.inception_weights)  # missing weights: say so before any work
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if not 0 < self.max_mask_area <= 1:
            raise UserError(f"--max-mask-area {self.max_mask_area}: must be in (0, 1]")

    @property
    def recipe(self) -> dict:
        """The fine-tuning settings of ``--pairs``, with ``--finetune-steps`` when given."""
        recipe = DEMO_RECIPES[self.pairs]
        return {**recipe, "steps": self.finetune_steps or recipe["steps"]}

    def min_cpus(self) -> int:
        """Logical CPUs the local cluster needs: the training worker's or the actors', plus one for Ray Data."""
        return math.ceil(max(self.recipe["cpus_per_worker"], self.actors, 1)) + 1


def run_demo(cfg: DemoConfig, progress: Callable[[str], None] = print,
             start_ray: Callable[[], None] = lambda: None) -> dict:
    """Run the five stages on the Ray cluster `start_ray` connects to (called before the first stage that has work
    left, so that a rerun of a finished demo starts none), one `progress` line as each starts and ends;
    returns the summary (also written to ``{output}/demo_summary.json``; below ``--real-fraction`` 1,
    ``demo_summary-real{F}.json``, next to that run's own table, run, shards and report)."""
    out = Path(cfg.output).expanduser().resolve()
    seconds: dict[str, float] = {}
    started = time.perf_counter()

    def stage(number: int, what: str):
        name = STAGES[number - 1]
        progress(f"[{number}/{len(STAGES)}] {name}: {what} ...")
        return name, time.perf_counter()

    def done(name: str, t: float, what: str) -> None:
        seconds[name] = round(time.perf_counter() - t, 1)
        progress(f"[{STAGES.index(name) + 1}/{len(STAGES)}] {name}: done in {seconds[name]:.0f} s ({what})")

    name, t = stage(1, f"procedural HAM10000-layout data ({cfg.difficulty}), prepared, and the demo base, "
                       f"into {out / 'real'}")
    with _stage_errors(name):
        world = prepare_demo_world(out, measure=False, difficulty=cfg.difficulty)
    cut = f"-real{cfg.real_fraction:g}" if cfg.real_fraction < 1 else ""
    suffix = cut + ("" if cfg.pairs == "controlnet" else f"-{cfg.pairs}")
    rows = finetune.training_rows(pairs.read_index(str(world.real)), cfg.real_fraction)
    counts = {c.code: int(n) for c, n in zip(CLASSES, np.bincount(np.asarray(rows.column("class_index")), minlength=7))}
    done(name, t, f"{sum(counts.values())} train pairs ({_per_class(counts)}), test set "
                  f"{DEMO_TEST_PER_CLASS} per class")

    ft = FinetuneConfig(training_data=str(world.real), real_fraction=cfg.real_fraction, output=str(out / "runs"),
                        name=f"demo{suffix}", base_model=world_base(cfg.difficulty),
                        validation_steps=cfg.validation_steps, **cfg.recipe)
    what = ("a ControlNet beside the stock base" if ft.train == "controlnet" else
            f"{ft.layout} layout, {ft.train} rank {ft.lora_rank}")
    name, t = stage(2, f"{ft.steps} steps ({what}, batch {ft.batch_size}, lr {ft.lr:g}"
                       f"{'' if ft.train == 'controlnet' else f', prior weight {ft.w_prior:g}'}) into "
                       f"{out / 'runs' / ft.name}")
    with _stage_errors(name):
        plan = plan_finetune(ft, rerun_hint="the demo resumes its fine-tune with the settings it started with: give "
                                            "the same --finetune-steps, or another --output")
        if plan.done is None:
            start_ray()
        step = plan.done["training_config"]["steps"] if plan.done else (run_finetune(plan).metrics or {}).get("step")
    adapter = out / "runs" / ft.name / "adapter"
    done(name, t, f"{'already done: ' if plan.done else ''}{f'step {step}, ' if step else ''}adapter at {adapter}")

    qc = QCModelConfig(training_data=str(world.real), real_fraction=cfg.real_fraction, steps=cfg.qc_steps,
                       output=str(out / f"qc{cut}"), cpus_per_worker=ft.cpus_per_worker)
    name, t = stage(3, f"{qc.steps} steps of a U-Net on the real train pairs into {qc.output}")
    with _stage_errors(name):
        qc_plan = plan_qc_model(qc)
        if qc_plan.done is None:
            start_ray()
        card = qc_plan.done or run_qc_model(qc_plan)
    done(name, t, f"{'already done: ' if qc_plan.done else ''}val Dice {card['val_dice']:.3f} on {card['val_pairs']} "
                  "real pairs")

    suffix += "" if cfg.prompt_attributes == "adapter" else "-noattributes"
    guide = cfg.segmenter_guidance if cfg.pairs == "controlnet" else 0
    suffix += "" if guide == DEMO_SEGMENTER_GUIDANCE or cfg.pairs != "controlnet" else f"-guidance{guide}"
    drawn = ({"controlnet": str(adapter), "mask_source": str(world.real), "mask_fraction": cfg.real_fraction}
             if cfg.pairs == "controlnet" else {"adapter": str(adapter)})
    gen = GenerateConfig(per_class=str(cfg.per_class), **drawn,
                         output=str(out / f"synthetic{suffix}{'' if cfg.qc else '-noqc'}"),
                         samples_per_shard=DEMO_SAMPLES_PER_SHARD, actors=cfg.actors,
                         max_mask_area=cfg.max_mask_area, overwrite=cfg.overwrite, qc_segmenter=qc.output,
                         max_attempts=DEMO_QC_ATTEMPTS if cfg.qc else 8, prompt_attributes=cfg.prompt_attributes,
                         segmenter_guidance=guide, license=DEMO_LICENSE)
    how = ("images drawn by that ControlNet for the real train masks, augmented" if cfg.pairs == "controlnet" else
           "image and mask sampled together by that adapter")
    how += f", each nudged towards its mask by the QC segmenter ({guide} guidance steps)" if guide else ""
    name, t = stage(4, f"{cfg.per_class} pairs per class, {how}, into {gen.output}")
    with _stage_errors(name):
        threshold, pilot = choose_min_consistency(cfg, card, gen, out / f"qc-pilot{suffix}", start_ray)
        if pilot is not None:
            progress(f"[4/5] {name}: min consistency {threshold:g} (segmenter val Dice × {DEMO_CONSISTENCY_SHARE:g}: "
                     f"{pilot['from_val_dice']:g}; pilot's weakest class {pilot['weakest_class']}: "
                     f"{pilot['weakest_quantile']:g})")
        gen, generate_started = replace(gen, min_consistency=threshold), time.perf_counter()
        gen_plan = plan_generate(gen)
        if gen_plan.done is None:
            start_ray()
        manifest = gen_plan.done or run_generate(gen_plan)
        generate_seconds = time.perf_counter() - generate_started
    suffix += "" if cfg.qc else "-noqc"
    totals = manifest["totals"]
    done(name, t, f"{'already done: ' if gen_plan.done else ''}{totals['successes']} pairs in {totals['shards']} shards, "
                  f"{_per_class({c: n['ok'] for c, n in totals['per_class'].items()})}")
    generation = {"seconds": round(generate_seconds, 1),  # without the pilot
                  "pairs_per_s": round(totals["successes"] / max(generate_seconds, 1e-9), 3),
                  "draws": _draws(Path(gen.output))}

    ev = EvaluateConfig(real=str(world.real), test_data=str(world.test_data), synthetic=gen.output,
                        output=str(out / f"eval{suffix}"), feature_extractor=cfg.feature_extractor,
                        inception_weights=cfg.inception_weights, extractor_steps=cfg.extractor_steps,
                        steps=cfg.eval_steps, seeds=cfg.seeds, classifier=cfg.classifier,
                        real_fraction=cfg.real_fraction, actors=cfg.actors, qc_segmenter=qc.output,
                        hybrid=cfg.hybrid)
    name, t = stage(5, f"{cfg.feature_extractor} fidelity, mask statistics, pair quality, downstream "
                       f"({cfg.hybrid}) {cfg.eval_steps} steps x {cfg.seeds} seed(s), into {ev.output}")
    with _stage_errors(name):
        ev_plan = plan_evaluate(ev)
        if ev_plan.done is None:
            start_ray()
        metrics = ev_plan.done or run_evaluate(ev_plan)
    done(name, t, f"{'already done: ' if ev_plan.done else ''}report at {Path(ev.output) / 'report.md'}")

    quality = metrics["pair_quality"]
    summary = {"output": str(out), "stage_seconds": seconds, "total_seconds": round(time.perf_counter() - started, 1),
               "pairs": cfg.pairs, "finetune": {k: getattr(ft, k) for k in cfg.recipe}, "adapter": str(adapter),
               "synthetic": gen.output, "synthetic_per_class": {c: n["ok"] for c, n in totals["per_class"].items()},
               "real_fraction": cfg.real_fraction, "real": str(world.real), "test_data": str(world.test_data),
               "report": str(Path(ev.output) / "report.md"), "metrics": str(Path(ev.output) / "metrics.json"),
               "pair_quality": quality["synthetic"], "real_test_pair_quality": quality["real_test"],
               "difficulty": cfg.difficulty, "qc": card | {"min_consistency": gen.min_consistency, "pilot": pilot},
               "generation": generation | {"segmenter_guidance": guide}, **key_figures(metrics)}
    (out / f"demo_summary{suffix}.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def choose_min_consistency(cfg: DemoConfig, card: dict, gen: GenerateConfig, pilot_output: Path,
                           start_ray: Callable[[], None] = lambda: None) -> tuple[float, dict | None]:
    """Generation's --min-consistency: 0 without the QC, the given one, or the automatic one (and how it was
    set): a pilot draw of `DEMO_PILOT_PER_CLASS` scored pairs a class (its own shards, `pilot_output`; `start_ray`
    before drawing it)."""
    if not cfg.qc:
        return 0.0, None
    if cfg.min_consistency >= 0:
        return cfg.min_consistency, None
    pilot = plan_generate(replace(gen, per_class=str(DEMO_PILOT_PER_CLASS), output=str(pilot_output), min_consistency=0.0))
    if pilot.done is None:
        start_ray()
        run_generate(pilot)
    index = pairs.read_index(str(pilot_output))
    scores: dict[str, list[float]] = {}
    for code, score in zip(index.column("class_code").to_pylist(), index.column("consistency").to_pylist()):
        if score is not None:  # a pair every draw of which failed a mask check has none
            scores.setdefault(code, []).append(score)
    return pilot_threshold(scores, card["val_dice"] or 0.0)


def pilot_threshold(scores: dict[str, list[float]], val_dice: float) -> tuple[float, dict]:
    """The automatic --min-consistency from a pilot's QC scores per class and the segmenter's val Dice: the
    lower of `DEMO_CONSISTENCY_SHARE` × val Dice and the weakest class's `DEMO_PILOT_QUANTILE` quantile."""
    quantiles = {code: float(np.quantile(s, DEMO_PILOT_QUANTILE)) for code, s in scores.items()}
    weakest = min(quantiles, key=quantiles.get)
    cap = DEMO_CONSISTENCY_SHARE * val_dice
    return round(min(cap, quantiles[weakest]), 3), {"from_val_dice": round(cap, 3), "weakest_class": weakest,
                                                    "weakest_quantile": round(quantiles[weakest], 3),
                                                    "quantiles": {c: round(q, 3) for c, q in sorted(quantiles.items())}}


def _draws(shards: Path) -> dict:
    """Draws of a generation output (its parquets): pairs kept, draws made, the redraws' reasons, and the
    kept pairs' QC scores."""
    index = pairs.read_index(str(shards))
    rejections = [r for rs in index.column("rejections").to_pylist() for r in rs]
    kept = pairs.usable_rows(index)
    scores = [v for v in kept.column("consistency").to_pylist() if v is not None] if "consistency" in kept.column_names else []
    return {"kept": kept.num_rows, "draws": index.num_rows + len(rejections),
            "redraw_rate": round(len(rejections) / max(1, index.num_rows + len(rejections)), 4),
            "reasons": dict(Counter(rejections)), "kept_qc_consistency": round(float(np.mean(scores)), 4) if scores else None}


def _per_class(counts: dict) -> str:
    return ", ".join(f"{c}={n}" for c, n in counts.items())


@contextmanager
def _stage_errors(name: str):
    """A stage's `UserError` names the stage (the flag it names is the stage job's)."""
    try:
        yield
    except UserError as err:
        raise UserError(f"{name}: {err}") from None


def key_figures(metrics: dict) -> dict:
    """The figures of the evaluation's metrics.json the summary shows."""
    fid = metrics["fidelity"]
    figures = {"fd_name": fid["fd_name"], "fd": fid["overall"][fid["fd_name"]],
               "fd_per_class": {c: v[fid["fd_name"]] for c, v in fid["per_class"].items()}}
    if "downstream" in metrics:
        summary = metrics["downstream"]["summary"]
        figures["downstream"] = {f"{model} {metric}": {arm: summary[model][metric][arm] for arm in ARMS}
                                 for model, metric in (("classifier", "macro_f1"), ("segmenter", "dice"))}
    return figures


def format_summary(summary: dict) -> str:
    """The demo's closing lines: stage times, key figures, where the report is."""
    lines = [f"demo finished in {summary['total_seconds']:.0f} s:"]
    lines += [f"  {name:<10} {s:7.1f} s" for name, s in summary["stage_seconds"].items()]
    lines.append(f"  {'total':<10} {summary['total_seconds']:7.1f} s")
    q, r = summary["pair_quality"], summary["real_test_pair_quality"]
    lines.append(f"  image-mask consistency (Dice vs an independent segmentation) {q['consistency_dice']:.3f} "
                 f"(real test pairs {r['consistency_dice']:.3f}), sane masks {q['sane_mask_share']:.3f}")
    g = summary.get("generation")
    if g:
        qc = summary.get("qc")
        kept = g["draws"]["kept_qc_consistency"]
        lines.append(f"  generation {g['pairs_per_s']:.2f} pairs/s, redraw rate {g['draws']['redraw_rate']:.3f} "
                     f"{g['draws']['reasons'] or ''}".rstrip()
                     + (f"; QC segmenter (val Dice {qc['val_dice']:.3f}) score of the kept pairs {kept:.3f}, "
                        f"min {qc['min_consistency']:g}" if kept is not None else ""))
    lines.append(f"  class fidelity (classifier trained on real demo images, mean over classes) "
                 f"{q['class_fidelity_mean']:.3f} (its accuracy on real test images {r['classifier_accuracy']:.3f})")
    fd = summary["fd"]
    lines.append(f"  {summary['fd_name']} (all classes) {'n/a' if fd is None else f'{fd:.2f}'}")
    for name, arms in summary.get("downstream", {}).items():
        cells = [f"{arms[a]['mean']:.3f} ± {arms[a]['std']:.3f}" for a in ARMS]
        lines.append(f"  downstream {name}: real {cells[0]} -> real+synthetic {cells[1]}")
    lines.append(f"  report: {summary['report']}")
    return "\n".join(lines)
