r"""Prepare the real data: a HAM10000 and/or ISIC 2018 download → one dataset on storage that every stage reads.

    python jobs/prepare.py --ham10000 ~/data/HAM10000 --output skindual-real
    ray job submit --working-dir . -- python jobs/prepare.py --ham10000 s3://bucket/raw/HAM10000 \
        --isic2018 s3://bucket/raw/ISIC2018 --max-side 1024 --output s3://bucket/real

Writes WebDataset shards with the image and mask bytes inside ({key}.jpg, {key}.seg.png, {key}.cls,
{key}.txt, {key}.json with lesion id, split, site, age and sex), a parquet per shard and manifest.json
(counts per class and split, skipped files).  A rerun skips committed shards; a bad file stops the
job naming it, or with --skip-bad is counted and listed.
"""

from __future__ import annotations

import sys

from skindual.card import update_license
from skindual.cli import run_job
from skindual.cluster import init_ray
from skindual.prepare import PrepareConfig, plan_prepare, run_prepare


def main(cfg: PrepareConfig) -> None:
    plan = plan_prepare(cfg)  # the output, earlier runs' settings and the source's metadata checked before Ray
    manifest = plan.done
    if manifest is not None:  # done; a new --license still reaches its manifest and card
        manifest = update_license(plan.storage, manifest, cfg.license)
    else:
        init_ray(min_cpus=2)
        manifest = run_prepare(plan)
    totals = manifest["totals"]
    splits = ", ".join(f"{split} {sum(n.values())}" for split, n in totals.get("per_split", {}).items())
    skipped = f", {sum(manifest['skipped'].values())} skipped" if manifest["skipped"] else ""
    print(f"{'done' if plan.done is None else 'already done'}: {totals['successes']} pairs in {totals['shards']} shards ({splits}){skipped} at "
          f"{cfg.output.rstrip('/')}")


if __name__ == "__main__":
    sys.exit(run_job(main, PrepareConfig, __doc__))
