"""What the consistency QC costs in generation throughput: the same generation job without it, scoring only,
and scoring with redraws below --min-consistency, in one run of this script.

Each run is jobs/generate.py on an embedded local Ray (the shipped demo adapter unless ``--adapter``,
CPU actors), into its own output; pairs/s is the run's accepted pairs over the job's whole wall time
(Ray start-up and model loading included, the same for the three); the three runs are repeated
``--repeats`` times in turn and the median taken.  The QC segmenter is ``--qc-segmenter``, or trained
here first on the demo world's real data (jobs/qc_model.py, ``--qc-steps``).

    python bench/qc_cost.py [--per-class 30] [--min-consistency 0.6] [--qc-segmenter DIR] [--repeats 2]

The last line is one JSON object: ``pairs_per_s`` of each run (``off``, ``scored``, ``redraw``), the
ratios to ``off``, and the redraw run's redraw rate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def job(script: str, args: list[str], env: dict) -> float:
    """Run a job; its wall time in seconds."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, str(ROOT / "jobs" / script), *args], cwd=ROOT, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"{script} failed:\n{result.stderr[-4000:]}")
    return time.perf_counter() - started


def rate(output: Path, seconds: float) -> tuple[float, float]:
    """(accepted pairs/s over the job's wall time, redraws per draw) of a generation output."""
    import pyarrow.parquet as pq

    rows = [r for p in output.glob("*.parquet") for r in pq.read_table(p).to_pylist()]
    redraws = sum(len(r["rejections"]) for r in rows)
    return sum(r["status"] == "ok" for r in rows) / seconds, redraws / (len(rows) + redraws)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--min-consistency", type=float, default=0.6)
    parser.add_argument("--repeats", type=int, default=2)
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
        measured: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name, extra in runs.items():
                output = tmp / f"{name}-{repeat}"
                seconds = job("generate.py", [*common, *extra, "--output", str(output)], env)
                measured[name].append(rate(output, seconds))
                print(f"{name} #{repeat}: {measured[name][-1][0]:.3f} pairs/s ({seconds:.1f} s)", flush=True)
        for name, values in measured.items():
            figures[name] = {"pairs_per_s": round(float(statistics.median(v for v, _ in values)), 4),
                             "redraw_rate": round(values[-1][1], 4), "each": [round(v, 4) for v, _ in values]}
    off = figures["off"]["pairs_per_s"]
    print(json.dumps({"pairs_per_s": {n: figures[n]["pairs_per_s"] for n in runs},
                      "ratio_scored": round(figures["scored"]["pairs_per_s"] / off, 3),
                      "ratio_redraw": round(figures["redraw"]["pairs_per_s"] / off, 3),
                      "redraw_rate": figures["redraw"]["redraw_rate"], "min_consistency": args.min_consistency,
                      **figures}))


if __name__ == "__main__":
    main()
