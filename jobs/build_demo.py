"""Build the offline demo world: procedural HAM10000-layout data and the demo base model.

    python jobs/build_demo.py                      # data + base from the shipped artifact + measurements
    python jobs/build_demo.py --rebuild            # pretrain the demo base from scratch (time: README)
    python jobs/build_demo.py --difficulty hard --rebuild --output skindual-demo-hard   # the hard world's base

The base is cached under ~/.cache/skindual (SKINDUAL_CACHE) by the artifact's sha256.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from skindual.base_models import DEMO_BASES
from skindual.demo_data import DIFFICULTIES
from skindual.cli import check_fields, option, run_job
from skindual.demo_model import PretrainRecipe
from skindual.demo_world import DEMO_OUTPUT, prepare_demo_world, world_base
from skindual.errors import UserError

_RECIPE = PretrainRecipe()


@dataclass
class BuildDemoConfig:
    output: str = option(DEMO_OUTPUT, "folder for the demo data, its training table and demo_world.json")
    data_scale: float = option(0.1, "demo images per class as a fraction of HAM10000's counts")
    seed: int = option(0, "seed of the demo data, its split and the measurements")
    difficulty: str = option("easy", "the demo world: easy, or hard (hair, low contrast, fuzzy borders, uneven "
                                     "light, lesions at the frame)", choices=list(DIFFICULTIES))
    artifact: str = option("", "the demo base's safetensors artifact, read or written by --rebuild (default: the "
                               "shipped one of --difficulty)")
    rebuild: bool = option(False, "pretrain the demo base and write --artifact")
    start_from: str = option("", "with --rebuild: an artifact pretraining continues from (default: for --difficulty "
                                 "hard the shipped easy base, for easy a random initialisation)")
    vae_steps: int = option(_RECIPE.vae_steps, "with --rebuild: VAE pretraining steps")
    vae_channels: str = option("", "with --rebuild: the VAE's block widths, comma-separated (e.g. 64,64,128): a fresh "
                                   "VAE where they differ from --start-from's (default: --start-from's, or 32,32,64)")
    vae_colour_weight: float = option(_RECIPE.vae_colour_weight, "with --rebuild: weight of the VAE's low-frequency "
                                                                 "colour term (4 × 4-pooled L1; 0: none)")
    vae_lesion_weight: float = option(_RECIPE.vae_lesion_weight, "with --rebuild: weight of the VAE's colour term on "
                                                                 "the lesion alone (4 × 4-pooled L1 inside the mask; "
                                                                 "0: none)")
    vae_lesion_smooth: bool = option(_RECIPE.vae_lesion_smooth, "with --rebuild: that term on a Gaussian low band "
                                                                "(σ 2 px) instead of the latent's 4 × 4 cells")
    unet_steps: int = option(_RECIPE.unet_steps, "with --rebuild: UNet pretraining steps")
    pretrain_per_class: int = option(_RECIPE.per_class, "with --rebuild: class-balanced pretraining lesions per class")
    measure: bool = option(True, "measure VAE reconstruction and the base's class fidelity")
    samples_per_class: int = option(24, "base samples per class for the class-fidelity figure")
    sample_steps: int = option(25, "sampling steps for those samples")

    def __post_init__(self) -> None:
        if not 0 < self.data_scale <= 1:
            raise UserError(f"--data-scale {self.data_scale}: must be in (0, 1]")
        for flag in ("vae_colour_weight", "vae_lesion_weight"):
            if getattr(self, flag) < 0:
                raise UserError(f"--{flag.replace('_', '-')} {getattr(self, flag)}: must be 0 or more")
        widths = self.vae_channels.split(",") if self.vae_channels else []
        if not all(w.strip().isdigit() and int(w) > 0 and int(w) % 16 == 0 for w in widths):
            raise UserError(f"--vae-channels {self.vae_channels}: give comma-separated block widths, each a multiple "
                            "of 16 (the VAE's norm groups), e.g. 64,64,128")
        for flag in ("vae_steps", "unet_steps", "pretrain_per_class", "samples_per_class", "sample_steps"):
            if getattr(self, flag) < 1:
                raise UserError(f"--{flag.replace('_', '-')} {getattr(self, flag)}: must be at least 1")
        check_fields(self)
        if not self.rebuild and self.artifact and not Path(self.artifact).is_file():
            raise UserError(f"--artifact {self.artifact}: no such file; give the demo base artifact "
                            "or pass --rebuild to pretrain one")


def main(cfg: BuildDemoConfig) -> None:
    recipe = None
    if cfg.rebuild:
        recipe = PretrainRecipe(seed=cfg.seed, per_class=cfg.pretrain_per_class, vae_steps=cfg.vae_steps,
                                unet_steps=cfg.unet_steps, difficulty=cfg.difficulty,
                                vae_channels=tuple(int(c) for c in cfg.vae_channels.split(",") if c),
                                vae_colour_weight=cfg.vae_colour_weight, vae_lesion_weight=cfg.vae_lesion_weight,
                                vae_lesion_smooth=cfg.vae_lesion_smooth,
                                start_from=cfg.start_from or (str(DEMO_BASES["demo"]) if cfg.difficulty == "hard" else ""))
    artifact = cfg.artifact or str(DEMO_BASES[world_base(cfg.difficulty)])
    world = prepare_demo_world(cfg.output, data_scale=cfg.data_scale, seed=cfg.seed, artifact=artifact,
                               rebuild=recipe, difficulty=cfg.difficulty, measure=cfg.measure, samples_per_class=cfg.samples_per_class,
                               sample_steps=cfg.sample_steps)
    print(json.dumps({"data_root": str(world.data_root), "base_model": str(world.base_model), **world.report},
                     indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main, BuildDemoConfig, __doc__))
