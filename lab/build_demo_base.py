r"""Pretrain a demo base again and write its artifact; then build a demo world on it and measure it.

    python lab/build_demo_base.py                                   # the easy base: skindual/assets/demo_base.safetensors
    python lab/build_demo_base.py --difficulty hard --vae-steps 2000 --vae-colour-weight 4 \
        --vae-lesion-weight 8                                       # the shipped hard base's recipe
    python lab/build_demo_base.py ... --artifact /tmp/new.safetensors --output /tmp/world   # try one, keep the shipped

The demo bases are the fixed test beds of the package (skindual/assets/); this script is kept so that they
can be rebuilt exactly (each artifact records the command that made it; artifacts built before this script
record it as `jobs/build_demo.py --rebuild` with the same flags).  The flags are the `PretrainRecipe`'s
(lab/demo_base.py).  Time: README of lab/.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from demo_base import PretrainRecipe, pretrain_demo_base, save_artifact

from skindual.base_models import ARTIFACT, DEMO_BASES
from skindual.cli import check_fields, option, run_job
from skindual.demo.render import DIFFICULTIES
from skindual.demo.world import prepare_demo_world, world_base
from skindual.errors import UserError


@dataclass
class BuildBaseConfig(PretrainRecipe):
    artifact: str = option("", "the artifact to write (default: the shipped one of --difficulty)")
    output: str = option("skindual-demo-rebuilt", "folder of the demo world it is measured on (data, demo_world.json)")
    data_scale: float = option(0.1, "demo images per class of that world, as a fraction of HAM10000's counts")
    measure: bool = option(True, "measure VAE reconstruction and the base's class fidelity")

    def __post_init__(self) -> None:
        check_fields(self, ("vae_steps", "unet_steps", "per_class"))
        if self.difficulty not in DIFFICULTIES:
            raise UserError(f"--difficulty {self.difficulty!r}: choose one of {', '.join(DIFFICULTIES)}")
        if not all(w.strip().isdigit() and int(w) > 0 and int(w) % 16 == 0
                   for w in self.vae_channels.split(",") if self.vae_channels):
            raise UserError(f"--vae-channels {self.vae_channels}: give comma-separated block widths, each a multiple "
                            "of 16 (the VAE's norm groups), e.g. 64,64,128")
        for flag in ("vae_colour_weight", "vae_lesion_weight"):
            if getattr(self, flag) < 0:
                raise UserError(f"--{flag.replace('_', '-')} {getattr(self, flag)}: must be 0 or more")

    def recipe(self) -> PretrainRecipe:
        recipe = PretrainRecipe(**{f.name: getattr(self, f.name) for f in fields(PretrainRecipe)})
        if self.difficulty == "hard" and not self.start_from:  # the hard base continues from the easy one
            recipe.start_from = str(ARTIFACT)
        return recipe


def main(cfg: BuildBaseConfig) -> None:
    artifact = Path(cfg.artifact or DEMO_BASES[world_base(cfg.difficulty)])
    started = time.perf_counter()
    recipe = cfg.recipe()
    pipe, configs = pretrain_demo_base(recipe)
    save_artifact(pipe, recipe, artifact, configs)
    seconds = round(time.perf_counter() - started, 1)
    world = prepare_demo_world(cfg.output, data_scale=cfg.data_scale, seed=cfg.seed, artifact=artifact,
                               difficulty=cfg.difficulty, measure=cfg.measure)
    report = world.report | {"pretrain_seconds": seconds, "artifact": str(artifact)}
    (Path(cfg.output) / "demo_world.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main, BuildBaseConfig, __doc__))
