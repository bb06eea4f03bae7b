r"""Draw a dataset's pairs on one sheet: a row per class, each image with its mask's outline (and its ignore
map tinted where it has one).

    python jobs/preview.py --data skindual-synthetic --output sheet.png
    python jobs/preview.py --data s3://bucket/real --output s3://bucket/real-sheet.png --per-class 10

Any dataset jobs/prepare.py or jobs/generate.py wrote, a folder or s3:// prefix; only the shards that hold the
drawn pairs are read.  Both jobs also put such a sheet into their output as preview.png.
"""

from __future__ import annotations

import sys

from skindual.cli import run_job
from skindual.preview import PreviewConfig, run_preview


def main(cfg: PreviewConfig) -> None:
    preview = run_preview(cfg)
    rows = ", ".join(f"{label} {len(keys)}" for label, keys in preview.rows)
    print(f"done: {sum(len(keys) for _, keys in preview.rows)} pairs ({rows}) at {cfg.output}")


if __name__ == "__main__":
    sys.exit(run_job(main, PreviewConfig, __doc__))
