"""Build the offline demo world: procedural HAM10000-layout data, prepared, and the shipped demo base, measured.

    python jobs/build_demo.py                                  # ./skindual-demo: data, real/, real-test/, demo_world.json
    python jobs/build_demo.py --difficulty hard --output skindual-demo-hard   # the hard world, on its own base

The base is materialised from its shipped artifact (skindual/assets/) into ~/.cache/skindual
(SKINDUAL_CACHE), keyed by the artifact's sha256.  The bases are fixed test beds; how they were
pretrained, and the command that pretrains one again, live in lab/ (not installed).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from skindual.cli import check_fields, option, run_job
from skindual.demo.render import DIFFICULTIES
from skindual.demo.world import DEMO_OUTPUT, prepare_demo_world
from skindual.errors import UserError


@dataclass
class BuildDemoConfig:
    output: str = option(DEMO_OUTPUT, "folder for the demo data, its prepared datasets and demo_world.json")
    data_scale: float = option(0.1, "demo images per class as a fraction of HAM10000's counts")
    seed: int = option(0, "seed of the demo data, its split and the measurements")
    difficulty: str = option("easy", "the demo world: easy, or hard (hair, low contrast, fuzzy borders, uneven "
                                     "light, lesions at the frame)", choices=list(DIFFICULTIES))
    artifact: str = option("", "the demo base's safetensors artifact (default: the shipped one of --difficulty)")
    measure: bool = option(True, "measure VAE reconstruction and the base's class fidelity")
    samples_per_class: int = option(24, "base samples per class for the class-fidelity figure")
    sample_steps: int = option(25, "sampling steps for those samples")
    classifier_steps: int = option(200, "training steps of the lesion classifier that measures class fidelity")

    def __post_init__(self) -> None:
        if not 0 < self.data_scale <= 1:
            raise UserError(f"--data-scale {self.data_scale}: must be in (0, 1]")
        check_fields(self, ("samples_per_class", "sample_steps", "classifier_steps"))
        if self.artifact and not Path(self.artifact).is_file():
            raise UserError(f"--artifact {self.artifact}: no such file; give a demo base artifact (the shipped ones "
                            "are in skindual/assets/)")


def main(cfg: BuildDemoConfig) -> None:
    world = prepare_demo_world(cfg.output, data_scale=cfg.data_scale, seed=cfg.seed, artifact=cfg.artifact or None,
                               difficulty=cfg.difficulty, measure=cfg.measure, samples_per_class=cfg.samples_per_class,
                               sample_steps=cfg.sample_steps, classifier_steps=cfg.classifier_steps)
    print(json.dumps({"data_root": str(world.data_root), "base_model": str(world.base_model), **world.report},
                     indent=2))


if __name__ == "__main__":
    sys.exit(run_job(main, BuildDemoConfig, __doc__))
