"""Generation's settings: `GenerateConfig` (the flags of jobs/generate.py) and which of its fields change
a run's bytes (`FINGERPRINTED`, or `FINGERPRINTED_WHEN_SET` when not at the value that samples as before they existed), enter the fingerprint through what they
resolve to (`RESOLVED`), or neither (`NOT_FINGERPRINTED`); every field is declared once, checked at import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from skindual.card import check_license
from skindual.cli import check_fields, option
from skindual.errors import UserError
from skindual.prompts import MAX_SAMPLES_PER_SHARD, parse_per_class
from skindual.quality import MASK_SMOOTHING, MaskLimits

DTYPES = ("auto", "fp32", "fp16", "bf16")
AUTO_GUIDANCE = -1  # --segmenter-guidance's default: the embedded default's choice, else off
_LIMITS = MaskLimits()


@dataclass(frozen=True)
class GenerateConfig:
    per_class: str = option("100", "pairs per class (5000), or per class (df=5000,vasc=4000) to top up rare classes")
    classes: str = option("", "comma-separated class codes; empty: all seven")
    adapter: str = option("", "the joint model: adapter folder or s3:// prefix from the finetune job, image and mask "
                              "sampled together; empty (jobs/generate.py, no --base-model either): the shipped demo "
                              "ControlNet draws images for --mask-source's masks (default: the demo world's), or with "
                              "only --controlnet given the shipped demo adapter samples the masks")
    base_model: str = option("", "the base pipeline: a base staged by jobs/stage_base.py (s3:// prefix or folder), a "
                                 "Hugging Face Hub id or a diffusers folder; empty: the adapter's base model (when it is a "
                                 "demo base, a staged base or a known SD-2 id), else 'demo' (the shipped demo base)")
    output: str = option("skindual-synthetic", "output folder or s3://bucket/prefix")
    samples_per_shard: int = option(0, "pairs per WebDataset shard; 0: the fewest shards of at most 1,000 pairs "
                                       "that come in whole waves of --actors, so no actor idles at the end "
                                       "(chosen on the first run, kept by reruns)")
    actors: int = option(1, "generator actors")
    num_gpus_per_actor: float = option(-1.0, "GPUs per actor (fractions share one); -1: 1 if the cluster has or its "
                                             "autoscaler can launch GPU nodes, else 0 (CPU)")
    accelerator_type: str = option("", "the GPU model every actor runs on (Ray's accelerator_type, e.g. A10G, L4, H100); "
                                       "needed on a cluster with several: sampled bytes differ between models")
    cpus_per_actor: float = option(1.0, "CPUs per actor (also torch's thread count on CPU)")
    batch_size: int = option(8, "pairs per sampling mini-batch")
    steps: int = option(25, "sampling steps")
    guidance: float = option(4.0, "classifier-free guidance scale (1: off)")
    scheduler: str = option("ddim", "sampling scheduler", choices=["ddim", "dpm", "euler"])
    qc_segmenter: str = option("", "consistency QC: the segmenter jobs/qc_model.py trained on the real data (folder "
                                   "or s3:// prefix); each pair is scored by the Dice between its mask and the "
                                   "segmenter's mask of its image")
    min_consistency: float = option(0.0, "with --qc-segmenter: draw a pair again (reason 'inconsistent') when its "
                                         "score is below this; 0: score and record only")
    mask_source: str = option("", "images for given masks: a prepared real dataset (jobs/prepare.py), folder or "
                                  "s3:// prefix; each row is given one of its train split's masks of the row's "
                                  "class, varied by a seeded augmentation (flips, rotation, scale, shift, elastic), "
                                  "and that mask's site, age and sex; only the image is sampled, the mask held "
                                  "to it.  Empty: image and mask sampled together")
    controlnet: str = option("", "draw each image for its mask with a ControlNet (the adapter folder of a fine-tune "
                                 "with --train controlnet; folder or s3:// prefix): with --mask-source for the given "
                                 "real masks (no --adapter), else for the masks the joint --adapter samples first")
    control_scale: float = option(0.7, "with a ControlNet: the weight of its residuals in the UNet (diffusers' "
                                       "controlnet_conditioning_scale); lower keeps more of the base's class "
                                       "colour and texture, higher follows the mask's outline more closely and "
                                       "varies more (0.7: the demo worlds' best balance; 1: diffusers' default)")
    control_end: float = option(1.0, "with a ControlNet: the share of the sampling steps it steers (diffusers' "
                                     "control_guidance_end); the later steps are the stock base's alone, where the "
                                     "class texture forms on the outline the mask has set")
    segmenter_guidance: int = option(-1, "with a ControlNet and --qc-segmenter (DDIM only): Adam steps, at two points "
                                         "of the sampling, that nudge each image towards one the QC segmenter reads "
                                         "as its mask, the later steps putting the class texture back "
                                         "(skindual.guidance); 0: off.  The QC's scores of guided pairs are then no "
                                         "independent check.  5: the demo's (held-out agreement in the hard demo "
                                         "world 0.84 -> 0.92; generation about 1.6x as long on CPU).  -1: 5 in "
                                         "jobs/generate.py's embedded default (the shipped demo ControlNet, scored "
                                         "and guided by the shipped demo QC segmenter), else 0")
    partial: bool = option(False, "with --mask-source: use the committed shards of a prepared dataset whose run has "
                                  "not finished; without it such a dataset is refused")
    mask_fraction: float = option(1.0, "with --mask-source: only the masks of a seeded share of each class of its "
                                       "train split (seed 0: the fine-tune's and evaluation's --real-fraction cut)")
    prompt_attributes: str = option("adapter", "adapter: each row's body site, age and sex drawn by its seed from "
                                               "the adapter's training data (per class), in its prompt template; "
                                               "none: the class alone", choices=["adapter", "none"])
    mask_smoothing: float = option(MASK_SMOOTHING, "σ of the Gaussian that smooths each decoded mask before its "
                                                   "threshold, in latent cells (× the VAE's scale factor in "
                                                   "pixels: 6 px at SD-2's 512²); "
                                                   "removes the VAE's spiky mask edges; 0: off")
    dtype: str = option("auto", "model dtype; auto: fp16 on GPU, fp32 on CPU", choices=list(DTYPES))
    compile: bool = option(False, "speed levers for GPUs: torch.compile of the UNet, the VAE decoder and a "
                                  "ControlNet (each actor compiles on its first mini-batches), channels-last weights, "
                                  "fused QKV projections; "
                                  "the samples round differently, so an output is written with it on or off "
                                  "throughout (it enters the run's fingerprint when on)")
    seed: int = option(0, "run seed: every pair's seed derives from it and the pair's row id")
    image_format: str = option("jpg", "image encoding in the tars", choices=["jpg", "png"])
    max_attempts: int = option(8, "draws per pair before it counts as rejected (quality control)")
    min_mask_area: float = option(_LIMITS.min_area, "QC: a smaller mask (share of the image) is 'empty'")
    max_mask_area: float = option(_LIMITS.max_area, "QC: a larger mask is 'full-frame'")
    min_main_share: float = option(_LIMITS.min_main_share, "QC: the largest mask component's least share, else 'fragmented'")
    license: str = option("", "the licence of the pairs, as the output's dataset card (README.md) names it: a Hugging "
                              "Face licence id (cc-by-nc-4.0, apache-2.0, other, ...); empty: 'unknown' (the shipped "
                              "demo adapter's pairs: apache-2.0)")
    overwrite: bool = option(False, "replace an output written with other settings")
    verify: bool = option(False, "read every committed shard of --output and check its sha256 before deciding what is "
                                 "done (else only the shards whose size or stamp in storage's listing changed are read)")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("actors", "batch_size", "steps", "max_attempts"))
        check_license(self.license)
        if not 0 <= self.samples_per_shard <= MAX_SAMPLES_PER_SHARD:
            raise UserError(f"--samples-per-shard {self.samples_per_shard}: must be between 1 and "
                            f"{MAX_SAMPLES_PER_SHARD} (or 0: chosen from the pair count and --actors)")
        if self.guidance < 0:
            raise UserError(f"--guidance {self.guidance}: must not be negative")
        if not 0 <= self.mask_smoothing <= 4:
            raise UserError(f"--mask-smoothing {self.mask_smoothing}: must be between 0 (off) and 4 latent cells")
        if self.cpus_per_actor <= 0 or (self.num_gpus_per_actor < 0 and self.num_gpus_per_actor != -1):
            raise UserError("--cpus-per-actor must be positive and --num-gpus-per-actor 0 or more (or -1: auto)")
        if not 0 <= self.min_mask_area < self.max_mask_area <= 1 or not 0 <= self.min_main_share <= 1:
            raise UserError(f"--min-mask-area {self.min_mask_area} / --max-mask-area {self.max_mask_area} / "
                            f"--min-main-share {self.min_main_share}: need 0 <= min < max <= 1 and a share in [0, 1]")
        if not 0 < self.mask_fraction <= 1 or (self.mask_fraction < 1 and not self.mask_source):
            raise UserError(f"--mask-fraction {self.mask_fraction}: must be in (0, 1], and below 1 needs --mask-source")
        if self.partial and not self.mask_source:
            raise UserError("--partial reads the committed part of --mask-source's dataset; without --mask-source "
                            "leave it out")
        if self.controlnet and self.mask_source and self.adapter:
            raise UserError("--adapter: with --controlnet and --mask-source the ControlNet draws every image for its "
                            "real mask and no joint model samples; leave --adapter out")
        if self.control_scale < 0 or not 0 < self.control_end <= 1:
            raise UserError(f"--control-scale {self.control_scale} / --control-end {self.control_end}: the scale must "
                            "not be negative and the end must be a share of the steps in (0, 1]")
        if not 0 <= self.min_consistency <= 1 or (self.min_consistency and not self.qc_segmenter):
            raise UserError(f"--min-consistency {self.min_consistency}: must be in [0, 1], and above 0 needs "
                            "--qc-segmenter")
        if self.segmenter_guidance < AUTO_GUIDANCE:
            raise UserError(f"--segmenter-guidance {self.segmenter_guidance}: must be 0 (off) or more Adam steps "
                            "(or -1: the embedded default's choice)")
        if self.segmenter_guidance > 0 and not (self.qc_segmenter and self.scheduler == "ddim"):
            raise UserError(f"--segmenter-guidance {self.segmenter_guidance}: it nudges each image towards what the QC "
                            "segmenter reads, on DDIM's steps; pass --qc-segmenter with --scheduler ddim, or leave it "
                            "out")
        self.counts()  # --per-class / --classes errors name the flag

    def counts(self) -> dict[str, int]:
        """The asked pairs per class, in class-index order."""
        classes = [c.strip() for c in self.classes.split(",") if c.strip()] or None
        return parse_per_class(self.per_class, classes)

    def limits(self) -> MaskLimits:
        return MaskLimits(self.min_mask_area, self.max_mask_area, self.min_main_share)

    @property
    def device(self) -> str:
        """"cuda" or "cpu", once `resolve_devices` has set ``num_gpus_per_actor``."""
        return "cuda" if self.num_gpus_per_actor > 0 else "cpu"


FINGERPRINTED = ("seed", "samples_per_shard", "steps", "guidance", "scheduler", "mask_smoothing", "dtype",
                 "image_format", "batch_size", "max_attempts", "min_mask_area", "max_mask_area", "min_main_share",
                 "prompt_attributes", "min_consistency", "mask_fraction")
"""Fields whose value changes the output's bytes, entered into the run's fingerprint as they are."""
RESOLVED = ("per_class", "classes", "adapter", "base_model", "num_gpus_per_actor", "cpus_per_actor", "qc_segmenter",
            "accelerator_type", "mask_source", "partial", "controlnet")
"""Fields that enter the fingerprint through what they resolve to: the per-class counts, the model
(`ModelSpec`, the QC segmenter's and the ControlNet's identity too), the given masks (`MaskSource.digest`: which
rows of which shards, so a ``--partial`` read of a dataset names the shards it used), the device and its model,
and on CPU the torch thread count."""
FINGERPRINTED_WHEN_SET = {"compile": False, "control_scale": 1.0, "control_end": 1.0, "segmenter_guidance": 0}
"""Fields added later, each with the value that samples as skindual did before it existed: one enters the
fingerprint only at another value (``control_*`` only with a ControlNet, which they steer), so a run made before
keeps its fingerprint and resumes."""
CONTROLNET_ONLY = ("control_scale", "control_end", "segmenter_guidance")
"""Fields that steer a ControlNet: without one they are refused unless left at their defaults or at the value that
samples as without them (`FINGERPRINTED_WHEN_SET`'s), and never fingerprinted."""
NOT_FINGERPRINTED = ("output", "actors", "overwrite", "verify", "s3_endpoint", "license")
"""Fields that never change the bytes of a shard."""
_declared = FINGERPRINTED + RESOLVED + tuple(FINGERPRINTED_WHEN_SET) + NOT_FINGERPRINTED
if sorted(_declared) != sorted(f.name for f in dataclasses.fields(GenerateConfig)) or len(set(_declared)) != len(_declared):
    raise TypeError("every GenerateConfig field must be declared once in FINGERPRINTED, RESOLVED, "
                    "FINGERPRINTED_WHEN_SET or NOT_FINGERPRINTED")


def without_auto(cfg: GenerateConfig) -> GenerateConfig:
    """`cfg` with ``--segmenter-guidance -1`` resolved to 0 (off): the stages' own choice.  jobs/generate.py's embedded
    default resolves it first, to the demo's guidance (`skindual.demo.world.generate_defaults`)."""
    return dataclasses.replace(cfg, segmenter_guidance=0) if cfg.segmenter_guidance == AUTO_GUIDANCE else cfg


def cpu_threads(cfg: GenerateConfig) -> int:
    """torch's thread count in a CPU actor: its reserved CPUs."""
    return max(1, int(cfg.cpus_per_actor))
