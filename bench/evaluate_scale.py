"""The evaluation at scale: driver memory flat in the number of pairs, streaming FD = in-memory FD, feature-pass rate.

Builds a prepared real dataset (the procedural demo lesions through the prepare job's code) and two
synthetic sets in the generation shard layout (procedural lesions of other seeds, no model needed) of
``--small`` and ``--large`` pairs per class, then runs the real job (``jobs/evaluate.py``, lesion-cnn,
the downstream benchmark included) on each, each in a child process of its own on an embedded local
Ray, in the same run of this script.  Figures:

- ``driver_rss_ratio``: the job driver's peak RSS at ``--large`` over ``--small`` pairs per class (the
  baseline, measured in this run): flat when nothing but small statistics reaches the driver;
- ``fd_max_rel_diff``: over the large run's per-class and overall FD, the largest relative difference
  between the job's streaming FD (moments summed on the driver) and clean-fid's `fid_from_feats` on
  the same features held in memory (read back from the job's ``features/*.parquet``);
- ``pairs_per_s``: pairs through the feature pass per second of it (this machine, CPU actors).

    python bench/evaluate_scale.py [--small 50] [--large 500] [--actors 2]

The last line is one JSON object with those keys and the runs' details.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "evaluate.py"


def child(report: str, argv: list[str]) -> int:
    """Run jobs/evaluate.py in this process (as its driver); write its exit status and peak RSS."""
    sys.argv, code, started = [str(JOB), *argv], 0, time.time()
    try:
        runpy.run_path(str(JOB), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    Path(report).write_text(json.dumps({"rc": code, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, "wall_s": time.time() - started}))
    return code


def synthetic_set(root: Path, per_class: int, size: int, per_shard: int = 250) -> None:
    """`per_class` procedural lesions of every class at size², committed as generation-layout shards."""
    from skindual.demo.render import render_lesion
    from skindual.prompts import CLASSES, build_prompt, sample_key
    from skindual.shard_format import Sample
    from skindual.shard_store import write_shard
    from skindual.storage import open_storage

    storage = open_storage(root)
    run_info = {"base_model": "bench", "adapter_sha256": "", "layout": "channels", "scheduler": "ddim", "steps": 1,
                "guidance": 1.0, "fingerprint": "bench", "image_format": "jpg"}
    rows = [(c, i) for i in range(per_class) for c in CLASSES]
    for start in range(0, len(rows), per_shard):
        shard, samples = start // per_shard, []
        for index, (c, i) in enumerate(rows[start:start + per_shard]):
            image, mask = render_lesion(c.code, 5_000_000 + 10_000 * c.index + i, (size, size))
            samples.append(Sample(key=sample_key(shard, index), row_id=start + index, class_code=c.code,
                                  class_index=c.index, prompt=build_prompt(c.code), seed=i, image=image, mask=mask))
        write_shard(storage, shard, samples, run_info)


def in_memory_fd(output: Path) -> dict[str, float]:
    """clean-fid's FD per class and overall on the job's per-pair features (all in memory here)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from skindual.fidelity import frechet_distance
    from skindual.prompts import CLASS_CODES

    tables = {name: pa.concat_tables([pq.read_table(p) for p in sorted((output / "features").glob(f"{name}-*.parquet"))])
              for name in ("real", "synthetic")}
    feats = {name: (np.stack(t.column("features").to_numpy(zero_copy_only=False)).astype(np.float64),
                    np.asarray(t.column("class_index"))) for name, t in tables.items()}
    (real, real_labels), (syn, syn_labels) = feats["real"], feats["synthetic"]
    out = {"all": frechet_distance(real, syn)}
    for c in np.unique(syn_labels):
        if (real_labels == c).sum() >= 2:
            out[CLASS_CODES[c]] = frechet_distance(real[real_labels == c], syn[syn_labels == c])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=50, help="pairs per class of the baseline run")
    parser.add_argument("--large", type=int, default=500, help="pairs per class of the large run")
    parser.add_argument("--real-per-class", type=int, default=40, help="real demo images per class")
    parser.add_argument("--size", type=int, default=64, help="side of the synthetic pairs")
    parser.add_argument("--actors", type=int, default=2)
    args = parser.parse_args()

    from skindual.demo import render
    from skindual.prepare import PrepareConfig, prepare_here
    from skindual.prompts import CLASS_CODES

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"PYTHONUNBUFFERED": "1"}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-evaluate-") as tmp_dir:
        tmp = Path(tmp_dir)
        render.write_demo_dataset(tmp / "data", {c: args.real_per_class for c in CLASS_CODES}, seed=2)
        prepare_here(PrepareConfig(ham10000=str(tmp / "data"), output=str(tmp / "real"), samples_per_shard=100),
                    distributed=False)
        for name, per_class in (("small", args.small), ("large", args.large)):
            synthetic_set(tmp / f"synthetic-{name}", per_class, args.size)
            output = tmp / f"eval-{name}"
            argv = ["--real", str(tmp / "real"), "--synthetic", str(tmp / f"synthetic-{name}"), "--output", str(output),
                    "--feature-extractor", "lesion-cnn", "--extractor-steps", "100", "--cache-dir", str(tmp / "cache"),
                    "--actors", str(args.actors), "--classifier", "small", "--steps", "20", "--seeds", "1",
                    "--kid-subsets", "20"]
            report = tmp / f"{name}.json"
            with open(tmp / f"{name}.log", "w") as log:
                subprocess.run([sys.executable, __file__, "--child", str(report), *argv], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, check=False)
            result = json.loads(report.read_text())
            if result["rc"]:
                sys.exit(f"the {name} run failed:\n" + (tmp / f"{name}.log").read_text()[-4000:])
            metrics = json.loads((output / "metrics.json").read_text())
            pairs = sum(sum(n.values()) for k, n in metrics["counts"].items() if k != "real_train")
            runs[name] = {"per_class": per_class, "driver_peak_rss_mb": round(result["peak_rss_mb"], 1),
                          "wall_s": round(result["wall_s"], 1), "feature_pass_pairs": pairs,
                          "stage_seconds": metrics["stage_seconds"]}
            print(f"{name}: {per_class} pairs per class, driver peak RSS {result['peak_rss_mb']:.0f} MB, "
                  f"feature pass {pairs} pairs in {metrics['stage_seconds']['features']:.1f} s", flush=True)
        fid = metrics["fidelity"]
        streamed = {"all": fid["overall"][fid["fd_name"]]} | {c: v[fid["fd_name"]] for c, v in fid["per_class"].items()
                                                             if v[fid["fd_name"]] is not None}
        reference = in_memory_fd(tmp / "eval-large")
    diffs = {k: abs(streamed[k] - reference[k]) / max(abs(reference[k]), 1e-12) for k in reference}
    large = runs["large"]
    print(json.dumps({"driver_rss_ratio": round(large["driver_peak_rss_mb"] / runs["small"]["driver_peak_rss_mb"], 3),
                      "fd_max_rel_diff": float(f"{max(diffs.values()):.3g}"),
                      "pairs_per_s": round(large["feature_pass_pairs"] / large["stage_seconds"]["features"], 2),
                      "actors": args.actors, "device": "cpu", "runs": runs}))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3:]))
    main()
