"""What holding a small selection's decoded pairs saves the evaluation's downstream benchmark: one downstream task
(`evaluate_downstream.run_task`: a model trained a schedule per stage on a stream of pairs, then tested) run in
this process with the stream decoding every epoch again (``hold=False``, what it did before) and holding the
pairs it decoded once (``hold=True``, the default), in turn, ``--repeats`` times, the median taken.

The sets are the demo world's real train split (``--world DIR``: a demo world folder, built there if missing, of
``--difficulty``; default a temporary one) and, for the hybrid arm's pretraining stage, ``--synthetic`` shards
(default: the real train split again, standing in at its size); ``--steps`` a schedule (the demo's 150), ``--size``
64, the demo's real test set.

    python bench/downstream_stream.py [--world DIR] [--synthetic DIR] [--task segmenter|classifier] [--steps 150]

The last line is one JSON object: each variant's seconds, the ratio, and whether the two trained models tested
the same (they must: the stream is the same pair for pair).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", default="")
    parser.add_argument("--synthetic", default="")
    parser.add_argument("--task", default="segmenter", choices=["segmenter", "classifier"])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--difficulty", default="easy", choices=["easy", "hard"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from skindual import downstream, evaluate_downstream, pairs
    from skindual.demo.world import prepare_demo_world
    from skindual.evaluate_plan import EvaluateConfig, plan_evaluate

    folder = args.world or tempfile.mkdtemp(prefix="skindual-bench-world-")
    world = prepare_demo_world(folder, measure=False, difficulty=args.difficulty)
    cfg = EvaluateConfig(real=str(world.real), test_data=str(world.test_data),
                         synthetic=args.synthetic or str(world.real), output=tempfile.mkdtemp(prefix="skindual-bench-"),
                         feature_extractor="lesion-cnn", steps=args.steps, size=args.size)
    plan = plan_evaluate(cfg)
    settings = downstream.BenchmarkSettings(cfg.classifier, cfg.segmenter, cfg.steps, cfg.batch_size, cfg.lr,
                                            ignore_maps=cfg.ignore_maps)
    stages = downstream.arm_stages("real+synthetic", cfg.hybrid, plan.train, plan.sets["synthetic"])
    real_stream = pairs.stream_pairs
    seconds: dict[str, list[float]] = {"decode_every_epoch": [], "held": []}
    metrics: dict[str, dict] = {}
    for _ in range(args.repeats):
        for name, hold in (("decode_every_epoch", False), ("held", True)):
            pairs.stream_pairs = lambda *a, _hold=hold, **kw: real_stream(*a, hold=_hold, **kw)
            started = time.perf_counter()
            row = evaluate_downstream.run_task("real+synthetic", args.task, 0, stages, plan.sets["real_test"],
                                               settings, args.size, None, threads=2)
            seconds[name].append(time.perf_counter() - started)
            metrics[name] = {k: v for k, v in row.items() if isinstance(v, float) and k != "seconds"}
            print(f"{name}: {seconds[name][-1]:.1f} s", flush=True)
    pairs.stream_pairs = real_stream
    median = {name: statistics.median(v) for name, v in seconds.items()}
    ratio = median["decode_every_epoch"] / median["held"]
    print(f"one {args.task} task, {args.steps} steps a schedule, {len(stages)} schedules: "
          f"{median['decode_every_epoch']:.1f} s decoding every epoch, {median['held']:.1f} s held ({ratio:.2f}x)")
    print(json.dumps({"task": args.task, "steps": args.steps, "size": args.size, "schedules": len(stages),
                      "train_pairs": {name: len(s) for name, s in (("real", plan.train),
                                                                   ("synthetic", plan.sets["synthetic"]))},
                      "seconds": median, "speedup": round(ratio, 3),
                      "same_test_figures": metrics["held"] == metrics["decode_every_epoch"]}))


if __name__ == "__main__":
    main()
