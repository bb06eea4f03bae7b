"""Quality control of one shard's pairs: draw, check each mask (and with a QC segmenter its image–mask
consistency), draw the failed rows again with their next seeds, and encode the kept pairs; a row that
fails every draw is kept as ``rejected`` with its reasons, never dropped."""

from __future__ import annotations

from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, Sequence

import numpy as np

from skindual.prompts import row_seed
from skindual.qc_model import Judgement
from skindual.quality import MaskLimits, mask_check
from skindual.shard_format import Sample, encode_sample

GenerateFn = Callable[[list[str], list[int]], tuple[np.ndarray, np.ndarray]]
"""(prompts, seeds) → (uint8 images N×H×W×3, uint8 masks N×H×W 0/1)."""


JudgeFn = Callable[[np.ndarray, np.ndarray], Judgement]
"""(uint8 images N×H×W×3, masks N×H×W) → each pair's image–mask consistency (Dice, 0..1), ignore map and
disagreement (`qc_model.QCSegmenter.judge`)."""


def generate_samples(rows: Sequence[dict], generate: GenerateFn, run_seed: int, batch_size: int,
                     max_attempts: int, limits: MaskLimits, image_format: str = "jpg",
                     encoder: Executor | None = None, judge: JudgeFn | None = None,
                     min_consistency: float = 0.0) -> list[Sample]:
    """The samples of one shard's prompt rows, quality-controlled and encoded, in row order.

    Draw 0 uses each row's table seed; rows whose mask fails `mask_check`, or (with `judge`) whose
    consistency is below `min_consistency` (reason ``inconsistent``), are drawn again with
    ``row_seed(run_seed, row_id, attempt)``, in mini-batches of the failed rows in row order, up to
    `max_attempts` draws.  A kept pair records its consistency, its ignore map and the map's share of
    its pixels.  Accepted pairs are encoded on `encoder` while the next mini-batch runs.  `generate`
    gets the rows and seeds and gives back images and masks (mask mode: the rows' given masks).
    """
    done: dict[int, Future | Sample] = {}
    failures: dict[int, list[str]] = {r["row_id"]: [] for r in rows}
    last: dict[int, tuple[int, int, int, float, float | None]] = {}  # row id → (seed, h, w, area, score)
    pending, pool = list(rows), encoder or ThreadPoolExecutor(2)
    try:
        for attempt in range(max_attempts):
            failed = []
            for start in range(0, len(pending), batch_size):
                chunk = pending[start:start + batch_size]
                seeds = [r["seed"] if attempt == 0 else row_seed(run_seed, r["row_id"], attempt) for r in chunk]
                images, masks = generate(chunk, seeds)
                said = judge(images, masks) if judge is not None else None
                for i, (row, seed, image, mask) in enumerate(zip(chunk, seeds, images, masks)):
                    reason, rid = mask_check(mask, limits), row["row_id"]
                    consistency = None if said is None else round(float(said.consistency[i]), 6)
                    if reason is None and consistency is not None and consistency < min_consistency:
                        reason = "inconsistent"
                    if reason is None:
                        extra = {} if said is None else {"ignore": said.ignore[i],
                                                         "disagreement": round(float(said.disagreement[i]), 6)}
                        sample = _sample(row, seed, attempt + 1, failures[rid], image=image, mask=mask,
                                         consistency=consistency, **extra)
                        done[rid] = pool.submit(encode_sample, sample, image_format)
                    else:
                        failures[rid].append(reason)
                        last[rid] = (seed, *mask.shape[:2], float(mask.mean()), consistency)
                        failed.append(row)
            pending = failed
            if not pending:
                break
        for row in pending:
            seed, height, width, area, consistency = last[row["row_id"]]
            done[row["row_id"]] = _sample(row, seed, max_attempts, failures[row["row_id"]], status="rejected",
                                          reason=failures[row["row_id"]][-1], height=height, width=width, area=area,
                                          consistency=consistency)
        return [s.result() if isinstance(s, Future) else s for s in (done[r["row_id"]] for r in rows)]
    finally:
        if encoder is None:
            pool.shutdown()


def _sample(row: dict, seed: int, attempts: int, rejections: list[str], **kwargs: Any) -> Sample:
    fields = {"image": None, "mask": None, **kwargs}
    if row.get("source_key"):
        fields |= {"mode": "mask", "source_key": row["source_key"], "augmentation_seed": row["augmentation_seed"]}
    return Sample(key=row["key"], row_id=row["row_id"], class_code=row["class_code"], class_index=row["class_index"],
                  prompt=row["prompt"], seed=seed, attempts=attempts, rejections=list(rejections), **fields)
