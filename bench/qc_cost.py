"""What the consistency QC costs in generation throughput: the same generation job without it, scoring only,
and scoring with redraws below --min-consistency, in one run of this script.

Each run is jobs/generate.py on an embedded local Ray (the shipped demo adapter unless ``--adapter``,
CPU actors), into its own output; pairs/s is the run's accepted pairs over its wall time after its
first shard is committed (model loading and Ray start-up left out, read from the shards' commit
times).  The QC segmenter is ``--qc-segmenter``, or trained here first on the demo world's real data
(jobs/qc_model.py, ``--qc-steps``).

    python bench/qc_cost.py [--per-class 30] [--min-consistency 0.85] [--qc-segmenter DIR]

The last line is one JSON object: ``pairs_per_s`` of each run (``off``, ``scored``, ``redraw``), the
ratios to ``off``, and the redraw run's redraw rate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(script: str, args: list[str], env: dict) -> None:
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{script} failed:\n{result.stderr[-4000:]}")


def rate(output: Path) -> tuple[float, float]:
    """(accepted pairs/s after the first committed shard, redraws per draw) of a generation output."""
    import pyarrow.parquet as pq

    stats = sorted(output.glob("*_stats.json"), key=lambda p: p.stat().st_mtime)
    times = [p.stat().st_mtime for p in stats]
    later = [json.loads(p.read_text())["successes"] for p in stats[1:]]
    rows = [r for p in output.glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    redraws = sum(len(r["rejections"]) for r in rows)
    return sum(later) / (times[-1] - times[0]), redraws / (len(rows) + redraws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--min-consistency", type=float, default=0.85)
    parser.add_argument("--qc-segmenter", default="", help="a trained segmenter (default: train one here)")
    parser.add_argument("--qc-steps", type=int, default=600)
    parser.add_argument("--adapter", default="", help="default: the shipped demo adapter")
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    common = ["--per-class", str(args.per_class), "--steps", str(args.steps), "--samples-per-shard", "35",
              "--actors", "1", "--cpus-per-actor", "2", *(["--adapter", args.adapter] if args.adapter else [])]
    figures: dict = {"settings": {"per_class": args.per_class, "steps": args.steps, "device": "cpu"}}
    with tempfile.TemporaryDirectory(prefix="bench-qc-") as tmp_dir:
        tmp = Path(tmp_dir)
        segmenter = args.qc_segmenter or str(tmp / "qc")
        if not args.qc_segmenter:
            job("qc_model.py", ["--steps", str(args.qc_steps), "--output", segmenter], env)
        runs = {"off": [], "scored": ["--qc-segmenter", segmenter],
                "redraw": ["--qc-segmenter", segmenter, "--min-consistency", str(args.min_consistency),
                           "--max-attempts", "16"]}
        for name, extra in runs.items():
            job("generate.py", [*common, *extra, "--output", str(tmp / name)], env)
            figures[name] = dict(zip(("pairs_per_s", "redraw_rate"), (round(x, 4) for x in rate(tmp / name))))
            print(f"{name}: {figures[name]}", flush=True)
    off = figures["off"]["pairs_per_s"]
    print(json.dumps({"pairs_per_s": {n: figures[n]["pairs_per_s"] for n in runs},
                      "ratio_scored": round(figures["scored"]["pairs_per_s"] / off, 3),
                      "ratio_redraw": round(figures["redraw"]["pairs_per_s"] / off, 3),
                      "redraw_rate": figures["redraw"]["redraw_rate"], "min_consistency": args.min_consistency,
                      **figures}))


if __name__ == "__main__":
    main()
