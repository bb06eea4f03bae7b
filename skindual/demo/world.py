"""The offline demo world in one call: procedural data, the demo base, the embedded defaults of the jobs.

`prepare_demo_world` writes the procedural HAM10000-layout folder and the separate balanced test
set, prepares both through the prepare job's code (`skindual.prepare`), makes the demo base pipeline
ready from its shipped artifact and, when asked, measures the base: VAE reconstruction of held-out
demo images and masks, and class fidelity of its samples (a small classifier trained on real demo
images, its accuracy on the base's samples of each class).  How the bases were pretrained lives
outside the package, in lab/.

The jobs' embedded defaults come from here, resolved by the job entry points (the stages never
look at the demo world): `finetune_defaults`, `evaluate_defaults`, `qc_defaults` and `generate_defaults` fill the
flags a user left empty with the demo world's datasets and the shipped demo ControlNet, QC segmenter and adapter.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from skindual import data, pairs, quality
from skindual.base_models import DEMO_BASE, DEMO_BASES, demo_base_path
from skindual.demo import render
from skindual.errors import UserError
from skindual.evaluate_plan import EvaluateConfig
from skindual.finetune_config import FinetuneConfig
from skindual.generate_config import AUTO_GUIDANCE, GenerateConfig
from skindual.model import load_pipeline, mask_to_image
from skindual.prepare import PrepareConfig, prepare_here
from skindual.prompts import CLASSES, build_prompt, row_seed
from skindual.qc_model import QCModelConfig
from skindual.run_files import read_run_config
from skindual.storage import LocalStorage

log = logging.getLogger(__name__)

DEMO_OUTPUT = "skindual-demo"
"""Where the jobs' embedded defaults build the demo world (the default --output of jobs/build_demo.py)."""
DEMO_ADAPTER = Path(__file__).parents[1] / "assets" / "demo_adapter"
"""The shipped demo adapter, the joint model: image and mask in one pass (how it was trained:
`skindual.demo.chain.DEMO_FINETUNE`); generation's embedded default when only --controlnet is given (it samples the
masks) or --adapter demo."""
DEMO_CONTROLNET_ADAPTER = Path(__file__).parents[1] / "assets" / "demo_controlnet"
"""The shipped demo ControlNet: generation's embedded default draws each image with it for a mask of the demo
world's real train split, augmented (how it was trained: `skindual.demo.chain.DEMO_CONTROLNET` on the easy demo
world's train pairs, lab/notes/pair-diagnosis.md)."""
DEMO_QC_SEGMENTER = Path(__file__).parents[1] / "assets" / "demo_qc"
"""The shipped demo QC segmenter (`jobs/qc_model.py` on the easy demo world's real pairs, its defaults): generation's
embedded default scores each pair with it and guides the shipped ControlNet's images towards their masks with it."""
DEMO_SEGMENTER_GUIDANCE = 5
"""Generation's --segmenter-guidance in the demo (the embedded default and the demo chain's ControlNet pairs): Adam
steps that nudge each image, twice while it is sampled, towards one the QC segmenter reads as its mask (held-out
agreement in the hard world 0.84 -> 0.92; lab/notes/pair-diagnosis.md, "Segmenter guidance")."""
DEMO_TEST_PER_CLASS = 40
"""Images per class of the demo's separate, balanced held-out test set (``data-test/``, its table
``test_table.parquet``): the downstream benchmark's test set.  The main demo data keeps HAM10000's
imbalance, so its own test split holds only 2 df and 2 vasc images, too few to measure a rare
class's recall; like ISIC 2018's test set for HAM10000, this one is drawn apart (other seed, other
ids) and balanced."""
DEMO_TEST_FIRST_ID = 1_000_000  # its image and lesion ids count from here, apart from the main data's


DEMO_LICENSE = "apache-2.0"
"""The licence of the demo world's data and of the pairs its models sample: the project's own."""
DEMO_PAIRS_PER_SHARD = 250  # the demo's real datasets come in several shards, as a real one does


def world_base(difficulty: str) -> str:
    """The demo base a demo world of `difficulty` is generated with: ``demo`` or ``demo-hard``."""
    return DEMO_BASE if difficulty == "easy" else f"{DEMO_BASE}-{difficulty}"


@dataclass
class DemoWorld:
    data_root: Path  # the procedural HAM10000-layout folder
    real: Path  # its prepared real dataset (jobs/prepare.py's layout)
    base_model: Path  # a from_pretrained folder
    report: dict
    test_data: Path  # the prepared separate balanced test set (`DEMO_TEST_PER_CLASS`)


def _prepared(folder: Path, output: Path, seed: int) -> dict:
    """`folder` through the prepare job's code, in this process (a rerun skips what is committed).  When `output`'s
    run.json names `folder` by another path (a demo world written before every embedded default resolved its folder:
    some named it relative to the working directory), that spelling is kept, so the rerun resumes, not refuses."""
    source, written = str(folder), read_run_config(LocalStorage(output)).get("ham10000", "")
    if written and written != source and Path(written).resolve() == folder.resolve():
        source = written
    return prepare_here(PrepareConfig(ham10000=source, output=str(output), seed=seed,
                                     samples_per_shard=DEMO_PAIRS_PER_SHARD, license=DEMO_LICENSE))


def prepare_demo_world(
    output: str | Path,
    *,
    data_scale: float = 0.1,
    seed: int = 0,
    artifact: str | Path | None = None,
    difficulty: str = "easy",
    measure: bool = True,
    samples_per_class: int = 24,
    sample_steps: int = 25,
    guidance: float = 4.0,
    classifier_steps: int = 200,
) -> DemoWorld:
    """Demo data under `output/data` prepared into `output/real`, the separate test set under
    `output/data-test` prepared into `output/real-test`, the base ready, a report.  `difficulty` "hard":
    the hard demo world (`render.render_lesion`), its base the ``demo-hard`` artifact by default.  `output` is
    resolved: every job's embedded default names the same world's datasets the same way."""
    output = Path(output).resolve()
    started = time.perf_counter()
    report: dict = {"difficulty": difficulty}
    artifact = artifact or DEMO_BASES[world_base(difficulty)]
    previous = output / "demo_world.json"
    if previous.is_file() and json.loads(previous.read_text()).get("difficulty", "easy") != difficulty:
        raise UserError(f"{output} holds a demo world of another difficulty than {difficulty!r}; choose another "
                        "--output")
    data_root, test_root = output / "data", output / "data-test"
    if not (data_root / render.METADATA_CSV).exists():
        render.write_demo_dataset(data_root, render.demo_counts(data_scale), seed=seed, difficulty=difficulty)
    if not (test_root / render.METADATA_CSV).exists():
        render.write_demo_dataset(test_root, {c.code: DEMO_TEST_PER_CLASS for c in CLASSES}, seed=seed + 1,
                                     first_number=DEMO_TEST_FIRST_ID, difficulty=difficulty)
    manifest = _prepared(data_root, output / "real", seed)
    _prepared(test_root, output / "real-test", seed)
    report["data_seconds"] = round(time.perf_counter() - started, 1)
    report["class_counts"] = {c: n["ok"] for c, n in manifest["totals"]["per_class"].items()}
    log.info("demo data: %d pairs at %s (%s)", manifest["totals"]["successes"], output / "real", report["class_counts"])

    base = demo_base_path(artifact)
    report["base_ready_seconds"] = round(time.perf_counter() - started, 1)
    log.info("demo base ready at %s after %.1f s", base, report["base_ready_seconds"])

    if measure:
        report.update(measure_base(base, output / "real", samples_per_class, sample_steps, guidance, seed,
                                   classifier_steps))
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    output.mkdir(parents=True, exist_ok=True)
    (output / "demo_world.json").write_text(json.dumps(report, indent=2) + "\n")
    return DemoWorld(data_root, output / "real", base, report, output / "real-test")


def split_pairs(real: str | Path, split: str, size: int) -> dict[str, np.ndarray]:
    """The classed pairs of one split of a prepared dataset, in memory at `size` (the demo's small data)."""
    index = pairs.read_index(str(real))
    rows = data.classed_rows(pairs.usable_rows(index), split)
    return pairs.load_pairs(str(real), pairs.selection_of(rows), size)


def measure_base(base: Path, real: Path, samples_per_class: int, steps: int, guidance: float, seed: int,
                 classifier_steps: int = 200) -> dict:
    """VAE reconstruction on held-out demo pairs, and class fidelity of the base's samples (by a lesion classifier
    trained `classifier_steps` steps on the real train pairs)."""
    pipe = load_pipeline(base)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    test = split_pairs(real, "test", size)
    recon = vae_reconstruction(pipe.vae, test["image"], test["mask"])
    log.info("VAE on %d held-out demo pairs: PSNR %.1f dB, mask Dice %.3f", len(test["image"]),
             recon["psnr_db"], recon["mask_dice"])

    t = time.perf_counter()
    train = split_pairs(real, "train", size)
    classifier = quality.train_classifier(train["image"], train["class_index"], steps=classifier_steps, seed=seed)
    real_accuracy = float((quality.classify(classifier, test["image"]) == test["class_index"]).mean())
    log.info("class-fidelity classifier: %.3f on held-out real demo images (%.0f s)", real_accuracy,
             time.perf_counter() - t)
    # how much of the classes the VAE keeps: the same classifier on those images after a VAE round trip, as a
    # mean of per-class recalls (the measure class fidelity is); the base's samples rarely do better
    round_trip_predicted = quality.classify(classifier, vae_round_trip(pipe.vae, test["image"]))
    round_trip_accuracy = float((round_trip_predicted == test["class_index"]).mean())
    round_trip = quality.recall_by_class(round_trip_predicted, test["class_index"])
    round_trip_mean = float(np.mean(list(round_trip.values())))
    log.info("class recall after a VAE round trip: mean %.3f %s", round_trip_mean,
             {CLASSES[i].code: round(v, 3) for i, v in round_trip.items()})

    samples, labels = sample_base(pipe, samples_per_class, steps, guidance, seed)
    predicted = quality.classify(classifier, samples)
    fidelity = quality.recall_by_class(predicted, labels)
    confusion = np.zeros((len(CLASSES), len(CLASSES)), int)  # rows: the prompt's class, columns: the classifier's
    np.add.at(confusion, (labels, predicted), 1)
    per_class = {CLASSES[i].code: round(v, 3) for i, v in fidelity.items()}
    log.info("base class fidelity: mean %.3f %s", np.mean(list(fidelity.values())), per_class)
    return {
        "vae_psnr_db": round(recon["psnr_db"], 2), "vae_mask_dice": round(recon["mask_dice"], 4),
        "classifier_real_accuracy": round(real_accuracy, 4), "vae_round_trip_accuracy": round(round_trip_accuracy, 4),
        "vae_round_trip_class_recall": {CLASSES[i].code: round(v, 3) for i, v in round_trip.items()},
        "vae_round_trip_class_recall_mean": round(round_trip_mean, 3),
        "base_class_fidelity": per_class, "base_class_fidelity_mean": round(float(np.mean(list(fidelity.values()))), 3),
        "base_confusion_rows_prompted_cols_predicted": confusion.tolist(),
        "fidelity_samples_per_class": samples_per_class, "sample_steps": steps, "guidance": guidance,
        "classifier_steps": classifier_steps,
    }


@torch.no_grad()
def sample_base(pipe, per_class: int, steps: int, guidance: float, seed: int, batch: int = 56):
    """Image-only samples of the base pipeline, `per_class` of every class: (uint8 images, class indices)."""
    prompts, labels, seeds = [], [], []
    for cls in CLASSES:
        for i in range(per_class):
            prompts.append(build_prompt(cls.code))
            labels.append(cls.index)
            seeds.append(row_seed(seed, cls.index * 100_000 + i))
    images = []
    for i in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        out = pipe(prompts[i:i + batch], num_inference_steps=steps, guidance_scale=guidance,
                   generator=generators, output_type="np").images
        images.append((out * 255).round().astype(np.uint8))
    return np.concatenate(images), np.asarray(labels)



# --------------------------------------------------------------------------- the jobs' embedded defaults


def finetune_defaults(cfg: FinetuneConfig, demo_output: str = DEMO_OUTPUT) -> FinetuneConfig:
    """Without --training-data, the demo world's prepared real dataset (built if missing)."""
    if cfg.training_data:
        return cfg
    world = prepare_demo_world(demo_output, measure=False)
    return replace(cfg, training_data=str(world.real))


def evaluate_defaults(cfg: EvaluateConfig, demo_output: str = DEMO_OUTPUT) -> EvaluateConfig:
    """Without --real, the demo world's prepared real dataset and (without --test-data) its separate
    balanced test set (built if missing)."""
    if cfg.real:
        return cfg
    world = prepare_demo_world(demo_output, measure=False)
    return replace(cfg, real=str(world.real), test_data=cfg.test_data or str(world.test_data))


def qc_defaults(cfg: QCModelConfig, demo_output: str = DEMO_OUTPUT) -> QCModelConfig:
    """Without --training-data, the demo world's prepared real dataset (built if missing)."""
    if cfg.training_data:
        return cfg
    return replace(cfg, training_data=str(prepare_demo_world(demo_output, measure=False).real))


def generate_defaults(cfg: GenerateConfig, demo_output: str = DEMO_OUTPUT) -> GenerateConfig:
    """With neither --adapter nor --base-model (or --base-model demo), without --license the demo world's licence, and
    the model: with no --controlnet, the shipped demo ControlNet drawing each image for a mask of --mask-source, by
    default the demo world's prepared real dataset (built if missing; its train masks, augmented), each pair scored by
    the shipped demo QC segmenter (without --qc-segmenter) and, with --segmenter-guidance left at -1 and DDIM, guided
    by it (`DEMO_SEGMENTER_GUIDANCE`); with --controlnet and no --mask-source, the shipped demo adapter sampling the
    masks it draws the images for."""
    if cfg.adapter or cfg.base_model not in ("", DEMO_BASE):
        return cfg
    licensed = replace(cfg, license=cfg.license or DEMO_LICENSE)
    if cfg.controlnet and cfg.mask_source:  # the ControlNet draws every image for its real mask: no joint model
        return licensed
    if cfg.controlnet:  # the joint model samples each mask first, the given ControlNet draws the image for it
        return replace(licensed, adapter=str(DEMO_ADAPTER))
    masks = cfg.mask_source or str(prepare_demo_world(demo_output, measure=False).real)
    guide = cfg.segmenter_guidance
    if guide == AUTO_GUIDANCE:
        guide = DEMO_SEGMENTER_GUIDANCE if cfg.scheduler == "ddim" else 0
    return replace(licensed, controlnet=str(DEMO_CONTROLNET_ADAPTER), mask_source=masks,
                   qc_segmenter=cfg.qc_segmenter or str(DEMO_QC_SEGMENTER), segmenter_guidance=guide)


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Posterior means of `x` (N×3×H×W in [-1, 1]) in batches."""
    return torch.cat([vae.encode(x[i:i + batch]).latent_dist.mean for i in range(0, len(x), batch)])


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch: int = 128) -> np.ndarray:
    """uint8 images after encode (posterior mean) and decode."""
    x = quality.images_to_tensor(images)
    decoded = torch.cat([vae.decode(z).sample for z in encode_latents(vae, x).split(batch)]).clamp(-1, 1)
    return ((decoded + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@torch.no_grad()
def vae_reconstruction(vae, images: np.ndarray, masks: np.ndarray) -> dict[str, float]:
    """PSNR (dB) of images and Dice of masks (thresholded at 0) after encode/decode."""
    x, m = quality.images_to_tensor(images), mask_to_image(masks)
    rec_x = torch.cat([vae.decode(z).sample for z in encode_latents(vae, x).split(128)]).clamp(-1, 1)
    rec_m = torch.cat([vae.decode(z).sample for z in encode_latents(vae, m).split(128)]).mean(1) > 0
    mse = ((rec_x - x) / 2).pow(2).mean().item()
    truth = torch.as_tensor(masks).bool()
    dice = (2 * (rec_m & truth).sum() / (rec_m.sum() + truth.sum()).clamp(min=1)).item()
    return {"psnr_db": 10 * math.log10(1 / max(mse, 1e-12)), "mask_dice": dice}
