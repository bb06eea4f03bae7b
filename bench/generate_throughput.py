"""Generation job throughput: pairs/s of the Ray job (1 actor, and 2) vs a bare in-process loop.

The bare loop loads the same generator the job uses (the demo base + the shipped demo adapter, on
CPU, fp32 as --dtype auto resolves there), runs the same prompt-table rows through the same
quality-control loop (`generate_samples`, with its 2-thread encoder) and writes the same shards
with `write_shard`, one shard after the other, with torch on 1 thread and OMP_NUM_THREADS=1 (what a
Ray actor with --cpus-per-actor 1 gets).  The Ray figures come from the real job
(``jobs/generate.py``) on its own embedded local Ray (`init_ray`), ``--cpus-per-actor 1``.  Every
measurement is its own process, all in the same run of this script, one after the other.

Steady state is read from each shard's commit time (its ``_stats.json`` mtime), the same way for
both: pairs of the shards after the first ``actors`` commits over the time from that commit to the
last, so model load and the first shard (Ray start, actor start) are left out; start-up (process
start → first committed shard) is reported apart.  Both write the same bytes (same seeds, same
thread count), which ``same_bytes`` checks through the shards' tar sha256.

Memory: peak RSS (VmHWM) of each actor process, found among the job's descendants by its
``ShardGenerator`` title and sampled during the run, vs the bare loop's peak RSS (ru_maxrss); and
the job driver's own peak RSS at two --per-class sizes with tiny work per pair (1 step, no
guidance, QC thresholds off so every pair takes one draw), which must stay flat because the job
streams shards.  ``driver_output_mb`` is what the whole output weighs: what a driver that held
every result would add, for judging how meaningful flatness is at the demo's 64-pixel images.

The tail: ``busy_share`` is the share of actor time that does work for the mission's run, 35,000
pairs on 16 actors, with the default split of the pairs into shards (`auto_samples_per_shard`),
against fixed 1,000-pair shards (``busy_share_1000_per_shard``), each shard's time ∝ its pairs.

    python bench/generate_throughput.py [--per-class 16] [--classes df,nv,vasc] [--steps 10]
        [--batch-size 8] [--samples-per-shard 8] [--driver-per-class 50 500] [--skip-driver]

The last line is one JSON object: ``ratio`` (Ray with one actor ÷ the bare loop, steady pairs/s),
``busy_share``, ``busy_share_1000_per_shard``, ``scaling_ray2_over_ray1``, ``same_bytes``, ``driver_rss_ratio``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "jobs" / "generate.py"
ACTOR_TITLE = "ShardGenerator"  # in the actor's process title, e.g. ray::MapWorker(MapBatches(ShardGenerator))


# --------------------------------------------------------------------------- child processes

def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child_job(report: str, argv: list[str]) -> int:
    """Run jobs/generate.py in this process (its driver), then write its exit status and peak RSS."""
    import runpy

    sys.argv, code = [str(JOB), *argv], 0
    try:
        runpy.run_path(str(JOB), run_name="__main__")
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    Path(report).write_text(json.dumps({"rc": code, "peak_rss_mb": _peak_rss_mb()}))
    return code


def child_baseline(report: str, output: str, job_args: list[str]) -> int:
    """The bare loop: the job's model, rows, QC loop and shard writer, in this one process."""
    started = time.time()
    import torch

    torch.set_num_threads(1)
    from concurrent.futures import ThreadPoolExecutor

    import pyarrow.compute as pc

    from dataclasses import replace

    from skindual.cli import parse_config
    from skindual.cluster import this_machine
    from skindual.demo.world import generate_defaults
    from skindual.generate import device_record, generation_prompts, plan_generate, resolve_devices, shard_run_info
    from skindual.generate_config import GenerateConfig
    from skindual.generate_model import load_generator
    from skindual.redraw import generate_samples
    from skindual.run_files import check_output
    from skindual.shard_store import write_shard

    # the job's own plan (shard size, model, fingerprint), its devices resolved for this machine alone
    plan = plan_generate(replace(generate_defaults(parse_config(GenerateConfig, [*job_args, "--output", output], "")),
                                 overwrite=True))
    cfg, spec, storage = resolve_devices(plan.config, this_machine()), plan.model, plan.storage
    with tempfile.TemporaryDirectory(prefix="skindual-adapter-") as tmp:
        pipe = load_generator(spec, cfg, tmp)
    loaded = time.time()
    table = generation_prompts(cfg, spec)
    fingerprint = check_output(storage, plan.settings, overwrite=True, device=device_record(cfg))
    run_info = shard_run_info(cfg, spec, fingerprint)

    def generate(rows, seeds):
        out = pipe([r["prompt"] for r in rows], seeds, steps=cfg.steps, guidance=cfg.guidance)
        return out.images, out.masks

    with ThreadPoolExecutor(2) as encoder:
        for shard in sorted(set(table.column("shard").to_pylist())):
            rows = table.filter(pc.equal(table.column("shard"), shard)).to_pylist()
            samples = generate_samples(rows, generate, cfg.seed, cfg.batch_size, cfg.max_attempts, cfg.limits(),
                                       cfg.image_format, encoder)
            write_shard(storage, shard, samples, run_info)
    Path(report).write_text(json.dumps({"rc": 0, "peak_rss_mb": _peak_rss_mb(), "started": started,
                                        "model_load_s": loaded - started}))
    return 0


# --------------------------------------------------------------------------- the parent

def _vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def run_child(args: list[str], env: dict[str, str], log_path: Path) -> tuple[dict, dict[int, float], float]:
    """Run this script as a child; return (its report, actor pid → peak RSS MB, start time)."""
    import psutil

    report = log_path.with_suffix(".json")
    started = time.time()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *args[:1], str(report), *args[1:]],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        parent, actors = psutil.Process(proc.pid), {}
        while proc.poll() is None:
            try:
                children = parent.children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for child in children:
                try:
                    title = " ".join(child.cmdline())
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                if ACTOR_TITLE in title:
                    hwm = _vm_hwm_mb(child.pid)
                    if hwm is not None:
                        actors[child.pid] = max(actors.get(child.pid, 0.0), hwm)
            time.sleep(0.25)
    if proc.returncode != 0 or not report.exists():
        tail = log_path.read_text()[-3000:]
        raise SystemExit(f"{' '.join(args[:1])} child failed (exit {proc.returncode}); log {log_path}:\n{tail}")
    return json.loads(report.read_text()), actors, started


def read_commits(output: Path) -> list[dict]:
    """The run's committed shards in commit order: time (stats mtime), count, tar sha256."""
    commits = []
    for path in output.glob("*_stats.json"):
        stats = json.loads(path.read_text())
        commits.append({"shard": stats["shard"], "time": path.stat().st_mtime, "count": stats["count"],
                        "successes": stats["successes"], "tar_sha256": stats["tar_sha256"],
                        "bytes": stats["tar_bytes"] + stats["parquet_bytes"]})
    return sorted(commits, key=lambda c: c["time"])


def steady_rate(commits: list[dict], skip: int) -> float:
    """Pairs/s from the `skip`-th commit to the last, counting the pairs of the shards after it."""
    pairs = sum(c["count"] for c in commits[skip:])
    return pairs / (commits[-1]["time"] - commits[skip - 1]["time"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=16, help="pairs per class of the throughput runs")
    parser.add_argument("--classes", default="df,nv,vasc", help="classes of the throughput runs")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--samples-per-shard", type=int, default=8,
                        help="pairs per shard (make the shard count a multiple of 2, at least 4)")
    parser.add_argument("--driver-per-class", type=int, nargs=2, default=[50, 500], metavar=("SMALL", "LARGE"))
    parser.add_argument("--driver-batch-size", type=int, default=16)
    parser.add_argument("--driver-samples-per-shard", type=int, default=25)
    parser.add_argument("--skip-driver", action="store_true", help="leave out the driver-memory runs")
    args = parser.parse_args()

    n_classes = len([c for c in args.classes.split(",") if c.strip()])
    pairs = args.per_class * n_classes
    shards = -(-pairs // args.samples_per_shard)
    if shards < 4:
        parser.error(f"{shards} shards: need at least 4 (1 and 2 start-up shards, then steady state)")
    common = ["--per-class", str(args.per_class), "--classes", args.classes, "--steps", str(args.steps),
              "--batch-size", str(args.batch_size), "--samples-per-shard", str(args.samples_per_shard),
              "--num-gpus-per-actor", "0", "--cpus-per-actor", "1"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # always an embedded local Ray
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")  # the bare loop's threads as an actor's

    result: dict = {"cpu_count": os.cpu_count(), "loadavg_1m_at_start": round(os.getloadavg()[0], 1),
                    "settings": {"per_class": args.per_class, "classes": args.classes, "pairs": pairs,
                                 "shards": shards, "steps": args.steps, "batch_size": args.batch_size,
                                 "samples_per_shard": args.samples_per_shard, "device": "cpu", "dtype": "fp32",
                                 "threads_per_generator": 1}}
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp_dir:
        tmp = Path(tmp_dir)
        report, _, _ = run_child(["_baseline", str(tmp / "bare"), *common], env, tmp / "bare.log")
        bare_commits = read_commits(tmp / "bare")
        bare_rate = steady_rate(bare_commits, 1)
        bare = {"steady_pairs_per_s": round(bare_rate, 3), "model_load_s": round(report["model_load_s"], 1),
                "startup_s": round(bare_commits[0]["time"] - report["started"], 1),
                "peak_rss_mb": round(report["peak_rss_mb"], 1)}
        result["bare_loop"] = bare
        hashes = {"bare": [c["tar_sha256"] for c in sorted(bare_commits, key=lambda c: c["shard"])]}
        for actors in (1, 2):
            out = tmp / f"ray{actors}"
            report, actor_rss, started = run_child(
                ["_job", *common, "--actors", str(actors), "--output", str(out)], env, tmp / f"ray{actors}.log")
            commits = read_commits(out)
            rate = steady_rate(commits, actors)
            result[f"ray_{actors}_actor{'s' if actors > 1 else ''}"] = {
                "steady_pairs_per_s": round(rate, 3), "startup_s": round(commits[0]["time"] - started, 1),
                "actor_peak_rss_mb": round(max(actor_rss.values()), 1) if actor_rss else None,
                "actors_seen": len(actor_rss), "driver_peak_rss_mb": round(report["peak_rss_mb"], 1)}
            hashes[f"ray{actors}"] = [c["tar_sha256"] for c in sorted(commits, key=lambda c: c["shard"])]
        one, two = result["ray_1_actor"], result["ray_2_actors"]
        result["ratio_ray1_over_bare"] = round(one["steady_pairs_per_s"] / bare_rate, 3)
        result["scaling_ray2_over_ray1"] = round(two["steady_pairs_per_s"] / one["steady_pairs_per_s"], 3)
        if one["actor_peak_rss_mb"]:
            result["ratio_actor_rss_over_bare"] = round(one["actor_peak_rss_mb"] / bare["peak_rss_mb"], 3)
        result["same_bytes"] = hashes["ray1"] == hashes["bare"] == hashes["ray2"]

        if not args.skip_driver:
            driver: dict = {"settings": {"classes": "df", "actors": 1, "steps": 1, "guidance": 1.0,
                                         "batch_size": args.driver_batch_size,
                                         "samples_per_shard": args.driver_samples_per_shard, "qc": "off"}}
            for per_class in args.driver_per_class:
                out = tmp / f"driver{per_class}"
                report, _, started = run_child(
                    ["_job", "--per-class", str(per_class), "--classes", "df", "--steps", "1", "--guidance", "1",
                     "--batch-size", str(args.driver_batch_size),
                     "--samples-per-shard", str(args.driver_samples_per_shard), "--min-mask-area", "0",
                     "--max-mask-area", "1", "--min-main-share", "0", "--num-gpus-per-actor", "0",
                     "--cpus-per-actor", "1", "--actors", "1", "--output", str(out)], env, tmp / f"driver{per_class}.log")
                commits = read_commits(out)
                driver[str(per_class)] = {"driver_peak_rss_mb": round(report["peak_rss_mb"], 1),
                                          "pairs": sum(c["count"] for c in commits), "shards": len(commits),
                                          "driver_output_mb": round(sum(c["bytes"] for c in commits) / 2**20, 2),
                                          "wall_s": round(commits[-1]["time"] - started, 1)}
            small, large = (driver[str(n)]["driver_peak_rss_mb"] for n in args.driver_per_class)
            driver["ratio_large_over_small"] = round(large / small, 3)
            result["driver_memory"] = driver
    result["tail"] = tail_figures()
    print(json.dumps(result, indent=2))
    print(json.dumps({"ratio": result["ratio_ray1_over_bare"], "busy_share": result["tail"]["busy_share"],
                      "busy_share_1000_per_shard": result["tail"]["busy_share_1000_per_shard"],
                      "scaling_ray2_over_ray1": result["scaling_ray2_over_ray1"], "same_bytes": result["same_bytes"],
                      "driver_rss_ratio": result.get("driver_memory", {}).get("ratio_large_over_small")}))


def tail_figures(pairs: int = 35_000, actors: int = 16) -> dict:
    """The share of busy actor time for the mission's run (`--per-class 5000`: 35,000 pairs on 16 actors):
    the default split (`auto_samples_per_shard`) against fixed 1,000-pair shards, one shard a task."""
    from skindual.generate import SHARD_PAIRS, auto_samples_per_shard, busy_share

    size = auto_samples_per_shard(pairs, actors)
    split = [size] * (pairs // size) + ([pairs % size] if pairs % size else [])
    fixed = [SHARD_PAIRS] * (pairs // SHARD_PAIRS) + ([pairs % SHARD_PAIRS] if pairs % SHARD_PAIRS else [])
    return {"pairs": pairs, "actors": actors, "samples_per_shard": size, "shards": len(split),
            "busy_share": round(busy_share(split, actors), 4),
            "busy_share_1000_per_shard": round(busy_share(fixed, actors), 4)}


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "_job":
        sys.exit(child_job(sys.argv[2], sys.argv[3:]))
    if len(sys.argv) > 3 and sys.argv[1] == "_baseline":
        sys.exit(child_baseline(sys.argv[2], sys.argv[3], sys.argv[4:]))
    main()
