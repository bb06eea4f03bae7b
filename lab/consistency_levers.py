"""Which fine-tune lever makes the kept pairs follow their masks?  The consistency reward's weight, the prior's
weight and the fine-tune's length, each judged by a held-out segmenter, with the downstream segmenter beside it.

lab/pair_recipes.py measures the recipes through the stages on a local Ray cluster; this script asks one narrower
question and runs in one process with no Ray, on a GPU when there is one (``--device auto``), so that a sweep of
fine-tunes fits a few minutes of a lent GPU.  It uses the stages' own pieces: the QC segmenter (the small in-house
U-Net, trained on the real cut as jobs/qc_model.py does, written by `qc_model.write_segmenter`), the fine-tune's
`JointTrainer` (the demo chain's settings, changed per variant by ``FIELD=VALUE``), its adapter written by
`finetune_worker.write_outputs`, and generation's `ShardGenerator` (the QC, its redraws, its ignore maps).  Per variant:

  1. fine-tune on the real cut (``--real-fraction``), write the adapter;
  2. raw draws: ``--per-class`` pairs a class, the QC scoring but not rejecting (generation's first pass), and
     from them an estimate of what each of ``--thresholds`` would keep (`threshold_estimates`);
  3. the threshold: the one the demo chain would choose from these draws (`pilot_threshold`, these draws as its
     pilot), or ``--min-consistency``;
  4. the kept set: the same rows drawn with that threshold and ``DEMO_QC_ATTEMPTS`` draws per pair;
  5. each set's consistency by the judge (segmentation_models_pytorch's U-Net, ResNet-18 encoder, trained on the
     whole real train split: another architecture than the QC's and the reward's), and downstream: the in-house
     U-Net's Dice and the classifier's macro-F1 on the real test set, mixed (real cut + kept pairs, ignore maps
     out of the loss) and pretrained (kept pairs, then the real cut), against real only and real only twice the
     steps, over ``--seeds`` (0: none).

Its pieces (`load_world`, `build_judges`, `fine_tune`, `generation_config`, `draw_sets`) serve lab/pair_diagnosis.py
too.  The report (``OUTPUT/consistency_levers-<difficulty>-real<f>.json``) is rewritten after every variant, so a run
cut short keeps what it measured; each variant's raw draws' QC and judge scores go to ``OUTPUT/scores-<variant>.npz``.
A rerun reuses the fine-tunes it finds done under ``OUTPUT/runs``.

    python lab/consistency_levers.py --difficulty hard --real-fraction 0.2 --output RUN \\
        --variants "" "w_consistency=1" "w_consistency=4" "w_consistency=16" "w_consistency=4,w_prior=1"
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import io
import json
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from finetune_quality import parse_fields
from pair_recipes import batches, segmenter_dice, train
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from skindual import downstream, pairs
from skindual.demo.chain import (
    DEMO_FINETUNE,
    DEMO_QC_ATTEMPTS,
    DEMO_SAMPLES_PER_SHARD,
    pilot_threshold,
)
from skindual.demo.world import prepare_demo_world, split_pairs, world_base
from skindual.finetune import plan_finetune, training_rows
from skindual.finetune_config import FinetuneConfig
from skindual.finetune_worker import make_trainer, write_outputs
from skindual.generate import generation_prompts
from skindual.generate_actors import ShardGenerator
from skindual.generate_config import GenerateConfig
from skindual.generate_model import resolve_model
from skindual.mask_source import load_masks, plan_mask_source
from skindual.pairs import local_batches
from skindual.prompts import CLASS_CODES
from skindual.qc_model import QCModelConfig, QCSegmenter, write_segmenter
from skindual.quality import dice, images_to_tensor

SIZE = 64
POOL = ("image", "mask", "label", "ignore")  # what a downstream pool holds


def per_pair_dice(model, images: np.ndarray, masks: np.ndarray, device: torch.device) -> np.ndarray:
    """Each pair's Dice between its mask and `model`'s mask of its image (1 when both are empty)."""
    with torch.no_grad():
        model = model.to(device).eval()
        out = [(model(images_to_tensor(images[i:i + 256], device))[:, 0] > 0).cpu().numpy()
               for i in range(0, len(images), 256)]
    return np.asarray([dice(p, m) for p, m in zip(np.concatenate(out), masks)])


def as_set(split: dict) -> dict:
    return {"image": split["image"], "mask": split["mask"], "label": split["class_index"].astype(np.int64),
            "ignore": np.zeros_like(split["mask"]), "key": split["key"]}


def decode(records: list[dict]) -> dict:
    """The kept samples of `ShardGenerator` records, in memory at `SIZE`."""
    kept = [r for r in records if r["status"] == "ok"]

    def load(b: bytes, mode: str) -> np.ndarray:
        im = Image.open(io.BytesIO(b)).convert(mode)
        return np.asarray(im if im.size == (SIZE, SIZE) else im.resize((SIZE, SIZE), Image.NEAREST))

    return {"image": np.stack([load(r["image_bytes"], "RGB") for r in kept]),
            "mask": np.stack([load(r["mask_bytes"], "L") > 127 for r in kept]).astype(np.uint8),
            "ignore": np.stack([load(r["ignore_bytes"], "L") > 127 if r["ignore_bytes"] else
                                np.zeros((SIZE, SIZE), bool) for r in kept]).astype(np.uint8),
            "label": np.asarray([r["class_index"] for r in kept], np.int64),
            "qc": np.asarray([r["consistency"] for r in kept], np.float64),
            "draws": sum(r["attempts"] for r in records), "rows": len(records)}


def threshold_estimates(labels: np.ndarray, qc: np.ndarray, judged: np.ndarray, thresholds: list[float],
                        attempts: int = DEMO_QC_ATTEMPTS) -> dict:
    """What generation with ``--min-consistency τ`` would keep, estimated from first draws: a row is drawn again
    until its QC score reaches τ (at most `attempts` draws), so its kept pair is a draw of its class with a score
    of at least τ.  Per τ: the judge's mean over those (each class weighted by its rows), the share of rows kept
    within `attempts`, the draws per kept pair, and the classes whose pass rate is lowest."""
    out = {}
    for tau in thresholds:
        judge_sum = weight = kept = draws = 0.0
        rates = {}
        for c in np.unique(labels):
            rows, passing = labels == c, (labels == c) & (qc >= tau)
            n, p = int(rows.sum()), float(passing.sum() / rows.sum())
            rates[CLASS_CODES[c]] = round(p, 3)
            share = 1 - (1 - p) ** attempts
            kept += n * share
            draws += n * (share / p if p else attempts)
            if passing.any():
                judge_sum, weight = judge_sum + n * share * float(judged[passing].mean()), weight + n * share
        out[f"{tau:g}"] = {"est_kept_judge": round(judge_sum / weight, 4) if weight else None,
                           "kept_share": round(kept / len(labels), 4), "draws_per_kept_pair": round(draws / max(kept, 1), 2),
                           "pass_rate": round(float((qc >= tau).mean()), 4),
                           "lowest_pass_rates": dict(sorted(rates.items(), key=lambda kv: kv[1])[:2])}
    return out


@dataclass
class Judges:
    """What every variant is measured against: the real pairs in memory at `SIZE` (the whole train split, the
    fine-tune's cut of it, the val split), the QC segmenter (written to ``qc_cfg.output``, the reward's too) and
    its Dice on the val split, and the held-out judge (smp U-Net) trained on the whole train split."""

    real_all: dict
    real_cut: dict
    val: dict
    qc_cfg: QCModelConfig
    qc_val: float
    judge: torch.nn.Module


def load_world(out: Path, difficulty: str, world: str = "", data_scale: float = 0.1) -> tuple[str, str]:
    """The real and real-test datasets: those of a world prepared earlier (`world`), else a demo world prepared
    under `out` (`data_scale` of the demo counts)."""
    if world:
        said = json.loads((Path(world) / "demo_world.json").read_text()).get("difficulty", "easy")
        if said != difficulty:
            raise SystemExit(f"--world {world} is the {said} world, not --difficulty {difficulty}")
        return str(Path(world) / "real"), str(Path(world) / "real-test")
    made = prepare_demo_world(out, measure=False, difficulty=difficulty, data_scale=data_scale)
    return str(made.real), str(made.test_data)


def build_judges(real: str, f: float, out: Path, qc_steps: int, judge_steps: int, device: torch.device) -> Judges:
    """The QC segmenter, as jobs/qc_model.py trains it (the small U-Net on the real cut), written under
    ``out/qc``; the held-out judge, another architecture, on the whole real train split."""
    index = pairs.read_index(real)
    cut_keys = set(training_rows(index, f).column("key").to_pylist())  # the fine-tune's and the QC's cut
    real_all = as_set(split_pairs(real, "train", SIZE))
    real_cut = {k: v[np.asarray([k in cut_keys for k in real_all["key"]])] for k, v in real_all.items()}
    val = as_set(split_pairs(real, "val", SIZE))
    qc_cfg = QCModelConfig(training_data=real, real_fraction=f, output=str(out / "qc"), steps=qc_steps)
    # both are seeded: an earlier run's, trained with the same settings on the same data, are loaded, not trained again
    trained_with = {"data": pairs.dataset_manifest(real).get("fingerprint", real), "real_fraction": f,
                    "qc_steps": qc_steps, "judge_steps": judge_steps, "device": device.type}
    card_file = out / "qc" / "segmenter.json"
    card = json.loads(card_file.read_text()) if card_file.is_file() else {}
    if card.get("lab_trained_with") == trained_with:
        qc_model, qc_val = QCSegmenter.load(qc_cfg.output).model, card["val_dice"]
    else:
        torch.manual_seed(qc_cfg.seed)
        settings = downstream.BenchmarkSettings(steps=qc_cfg.steps, batch_size=qc_cfg.batch_size, lr=qc_cfg.lr)
        qc_model = downstream.train_model(downstream.SmallUNet(qc_cfg.width),
                                          batches(real_cut, qc_cfg.batch_size, qc_cfg.seed, False),
                                          "segmenter", settings, qc_cfg.seed, device)
        qc_val = segmenter_dice(qc_model, val["image"], val["mask"], device)
        write_segmenter(qc_cfg, qc_model.cpu(), {"val_pairs": len(val["label"]), "val_dice": qc_val,
                                                 "train_pairs": len(real_cut["label"]), "fingerprint": "lab",
                                                 "lab_trained_with": trained_with})
    judge_file = out / "judge.safetensors"
    if judge_file.is_file() and safe_open(str(judge_file), "pt").metadata().get("trained_with") == json.dumps(
            trained_with, sort_keys=True):
        judge = downstream.build_model("smp_unet")
        judge.load_state_dict(load_file(str(judge_file)))
        judge = judge.to(device).eval()
    else:
        judge = train("smp_unet", "segmenter", [real_all], judge_steps, 0, False, device)
        save_file({k: v.detach().cpu().contiguous() for k, v in judge.state_dict().items()}, str(judge_file),
                  metadata={"trained_with": json.dumps(trained_with, sort_keys=True)})
    return Judges(real_all, real_cut, val, qc_cfg, qc_val, judge)


class PeakMemory:
    """The peak memory (GB) of what runs inside the block: on a GPU `torch.cuda.max_memory_allocated` (reset on
    entry); on the CPU the resident set's peak (VmHWM, reset on entry) less the resident set on entry, freed heap
    memory first given back to the system (glibc's ``malloc_trim``): a figure to compare variants by, not a GPU's."""

    def __init__(self, device: torch.device):
        self.device, self.gb = device, 0.0

    @staticmethod
    def _rss_gb(field: str) -> float:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
        return int(line.split()[1]) / 1024**2

    def __enter__(self) -> "PeakMemory":
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current resident set
            self.start = self._rss_gb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.gb = torch.cuda.max_memory_allocated() / 1024**3
        else:
            self.gb = self._rss_gb("VmHWM") - self.start


def write_adapter(cfg: FinetuneConfig, trainer, plan) -> dict:
    """`train_adapter`'s default output: the adapter folder by `write_outputs` (marked done with the plan's
    fingerprint); no figures of its own."""
    write_outputs(cfg, trainer, plan.prompting, plan.fingerprint)
    return {}


def train_adapter(ft: FinetuneConfig, device_type: str, build=make_trainer, write=write_adapter) -> dict:
    """The fine-tune `ft` in this process (its trainer over `local_batches`, no Ray), its adapter written by
    `write_outputs` under ``{output}/{name}/adapter``.  Returns the last step's losses, the seconds a step (the first
    left out: it pays for the allocations) and the peak memory of loading the model and training (`PeakMemory`).
    A lab variant gives its own trainer (`build(cfg, device)`) and output (`write(cfg, trainer, plan)`, which
    returns figures to add; module-level callables, so that a spawned process can run them)."""
    device = torch.device(device_type)
    plan = plan_finetune(ft)
    cfg = plan.config
    last, seconds = {}, []
    with PeakMemory(device) as memory:
        trainer = build(cfg, device)  # the joint model's, or a ControlNet's with --train controlnet
        epoch = 0
        while trainer.step < cfg.steps:
            epoch += 1
            given = len(seconds)
            for batch in local_batches(cfg.training_data, plan.selection, cfg.resolution, cfg.batch_size,
                                       cfg.seed + epoch):
                t = time.perf_counter()
                last = trainer.train_step(batch) or last
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - t)
                if trainer.step >= cfg.steps:
                    break
            if len(seconds) == given:  # an epoch gave no batch: the loop would never end
                raise SystemExit(f"{cfg.training_data}: an epoch has fewer pairs than a batch ({cfg.batch_size})")
    extra = write(cfg, trainer, plan)
    timed = seconds[1:] or seconds
    return {"steps": cfg.steps, **extra, "seconds_per_step": round(float(np.mean(timed)), 4),
            "peak_memory_gb": round(memory.gb, 3),
            "last_step_losses": {k: round(float(v), 4) for k, v in last.items() if k != "time"}}


def fine_tune(ft: FinetuneConfig, device: torch.device, build=make_trainer, write=write_adapter) -> dict:
    """`train_adapter`'s figures of the fine-tune `ft` (`build`, `write`: as there), kept beside its adapter
    (``train_figures.json``); a run found done (its plan's) is reused with them.  On the CPU it trains in a fresh
    process, so that the resident set's peak counts this fine-tune alone, not what this process loaded or freed
    before."""
    plan = plan_finetune(ft)
    figures_path = Path(plan.config.output) / plan.config.name / "train_figures.json"
    if plan.done is not None:
        return json.loads(figures_path.read_text()) if figures_path.is_file() else {}
    if device.type == "cpu":
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            figures = pool.submit(train_adapter, ft, "cpu", build, write).result()
    else:
        figures = train_adapter(ft, device.type, build, write)
    figures_path.write_text(json.dumps(figures, indent=1) + "\n")
    return figures


def generation_config(adapter: str, judges: Judges, per_class: int, device: torch.device, **fields) -> GenerateConfig:
    """Generation of `per_class` pairs a class with `adapter` and the QC segmenter scoring them, in this process
    (`fields`: other `GenerateConfig` settings, e.g. guidance, seed, steps)."""
    return GenerateConfig(per_class=str(per_class), adapter=adapter, qc_segmenter=judges.qc_cfg.output,
                          samples_per_shard=DEMO_SAMPLES_PER_SHARD, num_gpus_per_actor=float(device.type == "cuda"),
                          dtype="fp16" if device.type == "cuda" else "fp32",
                          batch_size=64 if device.type == "cuda" else 8, cpus_per_actor=torch.get_num_threads(),
                          **fields)


def draw_sets(gen: GenerateConfig, qc_val: float, min_consistency: str = "pilot",
              attempts: int = DEMO_QC_ATTEMPTS) -> tuple[dict, float, str]:
    """The raw draws (generation's first pass: the QC scores every pair, rejects none; only failed mask checks are
    drawn again) and, unless `min_consistency` is ``none``, the kept set: the same rows drawn with the threshold
    the demo chain would pick from the raw draws (`pilot_threshold`, ``pilot``) or the given one, `attempts` draws
    a pair.  Returns ({"raw", "kept"}, the threshold, where it came from)."""
    spec = resolve_model(gen)
    masks = (plan_mask_source(gen.mask_source, gen.mask_fraction, list(gen.counts()), None, gen.partial)
             if gen.mask_source else None)  # mask mode: each row's given real mask travels with the rows
    rows = generation_prompts(gen, spec, masks).to_pylist()
    batch = {"shard": pa.array([0], pa.int32()), "rows": [json.dumps(rows)]}
    if masks is not None:
        given = load_masks(masks, [r["source_key"] for r in rows], None)
        batch["masks"] = [[given[r["source_key"]] for r in rows]]
    batch = pa.table(batch)
    generator = ShardGenerator(gen, spec)  # its pipeline loaded once, for both sets

    def draw(cfg: GenerateConfig) -> dict:
        generator.cfg = cfg  # the settings of this draw (a shard's samples are read from them)
        return decode(generator(batch).column("samples").to_pylist()[0])

    raw = draw(gen)
    scores: dict[str, list[float]] = {}
    for label, score in zip(raw["label"], raw["qc"]):
        scores.setdefault(CLASS_CODES[label], []).append(float(score))
    threshold, how = pilot_threshold(scores, qc_val)
    if min_consistency not in ("pilot", "none"):
        threshold, how = float(min_consistency), "--min-consistency"
    sets = {"raw": raw}
    if min_consistency != "none":
        sets["kept"] = draw(replace(gen, min_consistency=threshold, max_attempts=attempts))
    return sets, threshold, how


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", required=True)
    parser.add_argument("--difficulty", default="hard", choices=["easy", "hard"])
    parser.add_argument("--real-fraction", type=float, default=0.2)
    parser.add_argument("--variants", nargs="+", default=["", "w_consistency=1", "w_consistency=4"],
                        help="fine-tune changes to the demo chain's settings, one comma-separated FIELD=VALUE list "
                             "a variant (empty: the demo settings, no reward); the reward's segmenter is the QC's")
    parser.add_argument("--finetune-steps", type=int, default=DEMO_FINETUNE["steps"])
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--seeds", type=int, default=3, help="downstream seeds; 0: no downstream models")
    parser.add_argument("--no-real-rows", action="store_true",
                        help="leave out the real-only rows (measured already, e.g. by lab/pair_recipes.py)")
    parser.add_argument("--min-consistency", default="pilot",
                        help="the kept set's --min-consistency: pilot (the demo chain's rule, from the raw draws) or "
                             "a number; none: no kept set (raw draws and the estimates only)")
    parser.add_argument("--thresholds", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.85, 0.9],
                        help="thresholds whose kept sets are estimated from the raw draws (`threshold_estimates`)")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps of every downstream model")
    parser.add_argument("--judge-steps", type=int, default=600)
    parser.add_argument("--qc-steps", type=int, default=600)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--world", default="",
                        help="the real and real-test folders of a demo world prepared earlier (e.g. another run's "
                             "OUTPUT); default: prepare the world under OUTPUT")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    out, f = Path(args.output).resolve(), args.real_fraction
    started = time.perf_counter()
    real, test_data = load_world(out, args.difficulty, args.world)
    out.mkdir(parents=True, exist_ok=True)
    report_path = out / f"consistency_levers-{args.difficulty}-real{f:g}.json"
    report: dict = {"difficulty": args.difficulty, "real_fraction": f, "device": torch.cuda.get_device_name()
                    if device.type == "cuda" else "cpu", "torch": torch.__version__, "per_class": args.per_class,
                    "finetune_steps": args.finetune_steps, "seeds": args.seeds, "downstream_steps": args.steps,
                    "variants": {}}

    def save() -> None:
        report["seconds"] = round(time.perf_counter() - started, 1)
        report_path.write_text(json.dumps(report, indent=1) + "\n")

    test = as_set(split_pairs(test_data, "all", SIZE))  # the separate test set, all of it
    test_set = downstream.PairSet(test["image"], test["mask"], test["label"])
    t = time.perf_counter()
    judges = build_judges(real, f, out, args.qc_steps, args.judge_steps, device)
    real_cut, judge = judges.real_cut, judges.judge
    report |= {"real_cut_pairs": int(len(real_cut["label"])), "qc_val_dice": round(judges.qc_val, 4),
               "judge_test_dice": round(segmenter_dice(judge, test["image"], test["mask"], device), 4),
               "judge_on_real_cut": round(float(per_pair_dice(judge, real_cut["image"], real_cut["mask"], device).mean()), 4),
               "qc_and_judge_seconds": round(time.perf_counter() - t, 1)}
    print(json.dumps({k: v for k, v in report.items() if k != "variants"}), flush=True)

    def downstream_figures(pools: list[dict], ignore: bool) -> dict:
        dice, f1 = [], []
        for seed in range(args.seeds):
            seg = train("unet", "segmenter", pools, args.steps, seed, ignore, device)
            dice.append(downstream.test_model(seg, test_set, "segmenter", [], device)["dice"])
            cls = train("small", "classifier", pools, args.steps, seed, False, device)
            f1.append(downstream.test_model(cls, test_set, "classifier", CLASS_CODES, device)["macro_f1"])
        return {"dice": round(float(np.mean(dice)), 4), "dice_std": round(float(np.std(dice, ddof=1)), 4)
                if len(dice) > 1 else 0.0, "macro_f1": round(float(np.mean(f1)), 4)}

    if args.seeds and not args.no_real_rows:
        report["real only"] = downstream_figures([real_cut], False)
        report["real only, twice the steps"] = downstream_figures([real_cut, real_cut], False)
        save()
        print(json.dumps({"real only": report["real only"], "twice": report["real only, twice the steps"]}), flush=True)

    for variant in args.variants:
        fields = parse_fields([p for p in variant.split(",") if p.strip()])
        name = "demo" if not fields else "_".join(f"{k}-{v}" for k, v in sorted(fields.items()))
        if fields.get("w_consistency"):
            fields["consistency_segmenter"] = judges.qc_cfg.output
        t = time.perf_counter()
        ft = FinetuneConfig(training_data=real, real_fraction=f, output=str(out / "runs"), name=name,
                            base_model=world_base(args.difficulty), use_gpu=device.type == "cuda",
                            **{**DEMO_FINETUNE, "steps": args.finetune_steps, **fields})
        trained = fine_tune(ft, device)
        figures: dict = {"settings": {k: v for k, v in fields.items() if k != "consistency_segmenter"},
                         "finetune_seconds": round(time.perf_counter() - t, 1),
                         "last_step_losses": trained.get("last_step_losses", {})}

        t = time.perf_counter()
        gen = generation_config(str(out / "runs" / name / "adapter"), judges, args.per_class, device)
        sets, threshold, how = draw_sets(gen, judges.qc_val, args.min_consistency)
        figures["generation_seconds"] = round(time.perf_counter() - t, 1)
        for which, s in sets.items():
            judged = per_pair_dice(judge, s["image"], s["mask"], device)
            figures[which] = {"pairs": int(len(s["label"])), "draws": int(s["draws"]),
                              "consistency_judge": round(float(judged.mean()), 4),
                              "judge_share_at_least_0.85": round(float((judged >= 0.85).mean()), 4),
                              "consistency_qc": round(float(s["qc"].mean()), 4),
                              "disagreement": round(float(s["ignore"].mean()), 4)}
            if which == "raw":
                figures["estimates"] = threshold_estimates(s["label"], s["qc"], judged, args.thresholds)
                np.savez(out / f"scores-{name}.npz", label=s["label"], qc=s["qc"], judge=judged)
        figures["threshold"], figures["threshold_from"] = threshold, how
        t = time.perf_counter()
        if args.seeds and "kept" in sets:
            kept = sets["kept"]
            figures["mixed, ignore maps"] = downstream_figures([{k: np.concatenate([real_cut[k], kept[k]])
                                                                 for k in POOL}], True)
            figures["pretrain → real"] = downstream_figures([{k: kept[k] for k in POOL}, real_cut], True)
        figures["downstream_seconds"] = round(time.perf_counter() - t, 1)
        report["variants"][name] = figures
        save()
        print(json.dumps({name: figures}), flush=True)
    save()


if __name__ == "__main__":
    main()
