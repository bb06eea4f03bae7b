"""The whole chain end to end on one machine's GPU, as a user runs it: every stage a real job on a real Ray cluster.

A local cluster (``ray start --head --num-gpus 1`` on 127.0.0.1, its own ports, temp dir and token) runs two
chains, each stage as ``python jobs/<stage>.py``: first on the demo base (seconds on a GPU: a failure shows
fast), then on an SD-2-structured base (`skindual.sd2`, random weights, SD-2-base's exact widths):

  stage_base   jobs/stage_base.py: the base staged once (fp16 on a GPU), as a cluster's nodes fetch it
  finetune     jobs/finetune.py --use-gpu at 512², bf16, 40 steps with a checkpoint every 10 (the demo: 200 at 64²);
               once a checkpoint is registered the training worker is SIGKILLed (as a preempted spot node takes
               it) and Ray Train must restart it from that checkpoint within the same run ("resumed from step N")
  qc_model     jobs/qc_model.py --use-gpu (once, in the first chain: the segmenter learns the real data only)
  generate     jobs/generate.py --num-gpus-per-actor 1 into two shards (QC thresholds open: the random base's
               masks are noise), the QC segmenter scoring every pair on the GPU
  controlnet   jobs/finetune.py --train controlnet --use-gpu: a ControlNet beside the frozen base, one checkpoint's
               steps (the demo's default pairs)
  generate_controlnet
               jobs/generate.py --controlnet --mask-source --segmenter-guidance 2: an image drawn for each real
               train mask on a GPU actor, nudged by the QC segmenter (its peak memory: the backward pass through
               the VAE decoder at 512²), two shards
  evaluate     jobs/evaluate.py with GPU feature actors and GPU downstream tasks

The demo data (`skindual.demo.world`) is the real data of both chains.  Peak GPU memory per stage is the
device's used memory (``nvidia-smi`` polled every 0.2 s: every process of the stage, CUDA contexts included).
Without a usable GPU (or with ``--cpu``) the same chains run in a reduced CPU mode: no --use-gpu, no GPUs asked,
the SD-2 structure at 1/16 width and 128²; that proves the script itself.  Only this script's own cluster is
stopped at the end (its processes, found by a marker in their environment; never ``ray stop``, which would stop
every cluster on the machine).

    python bench/gpu_e2e.py --out gpu-check/e2e --budget-s 250
    python bench/gpu_e2e.py --cpu --chains demo sd2            # the reduced mode

After every stage one JSON line of everything so far (the last line is the run's): the mode, the device, per
chain and stage its exit status, seconds and peak GPU GB, the step the killed worker resumed from, the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from job_runs import registered_steps  # noqa: E402 (the tests' job helpers, as bench/chaos.py uses them)
MARKER = "SKINDUAL_E2E_CLUSTER"
LIMITS = {"stage_base": 120, "finetune": 300, "qc_model": 120, "generate": 180, "controlnet": 300,
          "generate_controlnet": 180, "evaluate": 240}
"""Each stage's own time limit in seconds (the run's budget may cut it shorter)."""


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def gpu_name() -> str | None:
    """The GPU's name when CUDA is usable, else None; asked in a child process, so that this one holds no CUDA
    context (it would count in every stage's GPU memory)."""
    probe = subprocess.run([sys.executable, "-c", "import torch; torch.ones(1, device='cuda').add_(1); "
                            "print(torch.cuda.get_device_name(0))"], capture_output=True, text=True, timeout=300)
    return probe.stdout.strip().splitlines()[-1] if probe.returncode == 0 and probe.stdout.strip() else None


class GpuMemory:
    """``nvidia-smi`` polled in the background: the device's used memory over time, a window's peak."""

    def __init__(self):
        self.samples: list[tuple[float, float]] = []
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                          "-lms", "200"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
            return
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.split(",")[0]) / 1024))
            except ValueError:
                pass

    def peak(self, start: float, end: float) -> float | None:
        inside = [gb for t, gb in list(self.samples) if start <= t <= end + 0.5]
        return round(max(inside), 2) if inside else None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()


class Cluster:
    """A one-node Ray cluster on 127.0.0.1 with its own ports, temp dir, token and marker; `stop` kills only it."""

    def __init__(self, cpus: int, gpus: int, cache: Path):
        self.temp = tempfile.mkdtemp(prefix="ray-e2e-")  # short: unix socket paths are limited to ~107 bytes
        token = Path(self.temp) / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        gcs, *ports = free_ports(8)
        self.address = f"127.0.0.1:{gcs}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                        SKINDUAL_CACHE=str(cache), PYTHONUNBUFFERED="1", **{MARKER: self.temp},
                        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
        names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port", "node-manager-port",
                 "object-manager-port", "runtime-env-agent-port", "ray-client-server-port")
        command = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address=127.0.0.1",
                   f"--port={gcs}", f"--num-cpus={cpus}", f"--num-gpus={gpus}", "--include-dashboard=false",
                   "--disable-usage-stats", f"--temp-dir={self.temp}", *(f"--{n}={p}" for n, p in zip(names, ports))]
        started = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True, timeout=180)
        if started.returncode:
            self.stop()
            raise RuntimeError(f"ray start failed: {started.stdout[-2000:]}{started.stderr[-2000:]}")
        self.env["RAY_ADDRESS"] = self.address

    def stop(self) -> None:
        """Kill this cluster's processes (and the jobs started in it), by the marker in their environment."""
        marker = f"{MARKER}={self.temp}".encode()
        for _ in range(2):  # twice: a worker may start while the first pass runs
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and int(proc.name) != os.getpid() and \
                            marker in (proc / "environ").read_bytes().split(b"\0"):
                        os.kill(int(proc.name), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            time.sleep(0.5)
        shutil.rmtree(self.temp, ignore_errors=True)


class Run:
    """The chains' stages, their figures and the one JSON line."""

    def __init__(self, args: argparse.Namespace, gpu: str | None):
        self.args, self.gpu, self.started = args, gpu is not None, time.monotonic()
        self.out = Path(args.out).resolve()
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.memory = GpuMemory() if gpu else None
        self.report = {"mode": "gpu" if gpu else "cpu", "device": gpu or "cpu", "ok": False, "chains": {},
                       "skipped": [], "logs": str(self.logs)}
        self.cluster: Cluster | None = None

    def left(self) -> float:
        return self.args.budget_s - (time.monotonic() - self.started) if self.args.budget_s else float("inf")

    def emit(self) -> None:
        self.report["seconds"] = round(time.monotonic() - self.started, 1)
        print(json.dumps(self.report), flush=True)

    def say(self, line: str) -> None:
        print(f"[e2e {time.monotonic() - self.started:6.0f} s] {line}", file=sys.stderr, flush=True)

    def job(self, chain: str, stage: str, args: list[str], watch=None, script: str = "") -> bool:
        """Run ``jobs/<script or stage>.py args`` in the cluster under its time limit (`watch(proc, log)` polls it
        while it runs); record its exit status, seconds and peak GPU memory under `stage`."""
        record = self.report["chains"][chain]["stages"]
        limit = min(LIMITS[stage] * self.args.limit_scale, self.left())
        if limit < 15:
            self.report["skipped"].append(f"{chain}/{stage}: {self.left():.0f} s of the budget left")
            return False
        log_path = self.logs / f"{chain}-{stage}.log"
        self.say(f"{chain}: {stage} (limit {limit:.0f} s, log {log_path})")
        start = time.monotonic()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{script or stage}.py"), *args], cwd=ROOT,
                                    env=self.cluster.env, stdout=log, stderr=subprocess.STDOUT, text=True,
                                    start_new_session=True)
            rc = None
            while rc is None and time.monotonic() - start < limit:
                if watch is not None:
                    watch(proc, log_path)
                time.sleep(0.2)
                rc = proc.poll()
            if rc is None:  # over its limit: the job and its children, then the record says so
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = "timeout"
        end = time.monotonic()
        record[stage] = {"rc": rc, "seconds": round(end - start, 1)}
        if self.memory is not None:
            record[stage]["peak_gpu_gb"] = self.memory.peak(start, end)
        tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or [""]
        self.say(f"{chain}: {stage} {'ok' if rc == 0 else f'FAILED ({rc})'} in {end - start:.0f} s: {tail[0][:200]}")
        self.emit()
        return rc == 0


def worker_killer(run: Path, record: dict):
    """A `Run.job` watch: once the first checkpoint is registered, SIGKILL the training worker (its pid from the
    job's "worker 0 of 1 ... pid N" line), once."""
    def watch(proc, log_path: Path) -> None:
        if "killed_pid" in record or not registered_steps(run):
            return
        found = re.findall(r"worker 0 of 1 on .+?, pid (\d+)", log_path.read_text(errors="replace"))
        if found:
            record["killed_pid"], record["killed_after_step"] = int(found[-1]), registered_steps(run)[-1]
            try:
                os.kill(int(found[-1]), signal.SIGKILL)
            except ProcessLookupError:
                record["killed_pid"] = None
    return watch


def chain(run: Run, name: str, source: str, world, settings: dict, qc: Path) -> bool:
    """One chain: stage the base from `source`, fine-tune (killing its worker once), train the QC segmenter into
    `qc` unless an earlier chain did, generate two shards, evaluate them."""
    gpu, home = run.gpu, run.out / name
    record = run.report["chains"].setdefault(name, {"ok": False, "stages": {}})
    base, runs, synthetic = home / "base", home / "runs", home / "synthetic"
    cpus = "2" if gpu else "1"
    if not run.job(name, "stage_base", ["--source", source, "--output", str(base), "--dtype", settings["base_dtype"]]):
        return False
    steps, every = settings["steps"]
    finetune = ["--training-data", str(world.real), "--base-model", str(base), "--output", str(runs), "--name", "e2e",
                "--resolution", str(settings["resolution"]), "--mixed-precision", "bf16", "--steps", str(steps),
                "--checkpoint-every", str(every), "--batch-size", "2", "--lora-rank", "4",
                "--validation-per-class", "1", "--validation-steps", "2", "--validation-batch", "7", "--cpus-per-worker", cpus,
                "--geo-crop", str(settings["geo_crop"]), *(["--use-gpu"] if gpu else [])]
    if not run.job(name, "finetune", finetune, watch=worker_killer(runs / "e2e", record)):
        return False
    log = (run.logs / f"{name}-finetune.log").read_text(errors="replace")
    resumed = re.findall(r"resumed from step (\d+)", log)
    record["resumed_from_step"] = int(resumed[-1]) if resumed else None
    if record["resumed_from_step"] is None:
        run.say(f"{name}: the training worker was not resumed from a checkpoint (killed: {record.get('killed_pid')})")
        return False
    if (qc / "segmenter.json").is_file():
        record["qc_model"] = f"the segmenter at {qc}"
    elif not run.job(name, "qc_model", ["--training-data", str(world.real), "--output", str(qc), "--steps", "60",
                                        "--cpus-per-worker", cpus, *(["--use-gpu"] if gpu else [])]):
        return False
    generate = ["--adapter", str(runs / "e2e" / "adapter"), "--per-class", "2", "--samples-per-shard", "7",
                "--actors", "1", "--num-gpus-per-actor", "1" if gpu else "0", "--cpus-per-actor", cpus,
                "--steps", "8", "--batch-size", "7", "--dtype", "bf16" if gpu else "fp32", "--qc-segmenter", str(qc),
                "--min-mask-area", "0", "--max-mask-area", "1", "--min-main-share", "0", "--max-attempts", "2",
                "--output", str(synthetic), *settings.get("generate", [])]
    if not run.job(name, "generate", generate):
        return False
    record["shards"] = sorted(p.name for p in synthetic.glob("*.tar"))
    # the demo's default pairs: a ControlNet fine-tuned beside the frozen base, then drawing an image for each real
    # train mask (augmented) on a GPU actor
    controlnet = ["--training-data", str(world.real), "--base-model", str(base), "--output", str(runs),
                  "--name", "e2e-controlnet", "--train", "controlnet", "--resolution", str(settings["resolution"]),
                  "--mixed-precision", "bf16", "--steps", str(every), "--checkpoint-every", str(every),
                  "--batch-size", "2", "--validation-per-class", "1", "--validation-steps", "2",
                  "--validation-batch", "7", "--cpus-per-worker", cpus, *(["--use-gpu"] if gpu else [])]
    if not run.job(name, "controlnet", controlnet, script="finetune"):
        return False
    drawn = [*generate[:generate.index("--output")], "--output", str(home / "synthetic-controlnet")]
    drawn[:2] = ["--controlnet", str(runs / "e2e-controlnet" / "adapter"), "--mask-source", str(world.real)]
    drawn += ["--segmenter-guidance", "2"]  # the QC segmenter nudges each image: backward through the VAE decoder
    if not run.job(name, "generate_controlnet", drawn, script="generate"):
        return False
    record["controlnet_shards"] = sorted(p.name for p in (home / "synthetic-controlnet").glob("*.tar"))
    evaluate = ["--real", str(world.real), "--test-data", str(world.test_data), "--synthetic", str(synthetic),
                "--output", str(home / "eval"), "--feature-extractor", "lesion-cnn", "--extractor-steps", "20",
                "--steps", "10", "--seeds", "1", "--actors", "1", "--cpus-per-actor", cpus, "--cpus-per-task", cpus,
                "--num-gpus-per-actor", "1" if gpu else "0", "--num-gpus-per-task", "1" if gpu else "0",
                "--kid-subsets", "5", "--classifier", "small", "--qc-segmenter", str(qc)]
    if not run.job(name, "evaluate", evaluate):
        return False
    record["ok"] = len(record["shards"]) == 2 and len(record["controlnet_shards"]) == 2
    return record["ok"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu-e2e", help="the work folder (data, bases, runs, shards, reports, logs)")
    parser.add_argument("--cpu", action="store_true", help="the reduced CPU mode even where a GPU is usable")
    parser.add_argument("--chains", nargs="+", default=["demo", "sd2"], choices=["demo", "sd2"])
    parser.add_argument("--budget-s", type=float, default=0, help="seconds for the whole run (0: none); a stage that "
                                                                  "cannot start with 15 s left is skipped")
    parser.add_argument("--limit-scale", type=float, default=1.0, help="multiplies every stage's own time limit")
    parser.add_argument("--keep-going", action="store_true", help="run the SD-2 chain even when the demo chain failed")
    parser.add_argument("--build-sd2", nargs=3, metavar=("FOLDER", "WIDTH", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build_sd2:
        return build_sd2(args.build_sd2[0], int(args.build_sd2[1]), args.build_sd2[2])
    gpu = None if args.cpu else gpu_name()
    run = Run(args, gpu)

    def stop(signum, frame):  # a time limit's SIGTERM: clean up in the finally below
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    try:
        run.say(f"mode {run.report['mode']} on {run.report['device']}; the demo world into {run.out / 'world'}")
        os.environ["SKINDUAL_CACHE"] = str(run.out / "cache")
        t = time.monotonic()
        from skindual.demo.world import prepare_demo_world

        world = prepare_demo_world(run.out / "world", measure=False)
        run.report["world_s"] = round(time.monotonic() - t, 1)
        t = time.monotonic()
        run.cluster = Cluster(max(4, os.cpu_count() or 1), 1 if run.gpu else 0, run.out / "cache")
        run.report["ray_start_s"] = round(time.monotonic() - t, 1)
        run.say(f"ray cluster at {run.cluster.address} (temp dir {run.cluster.temp})")
        # on a GPU a step takes a fraction of a second: enough steps after the first checkpoint that the worker
        # is killed mid-run
        settings = {"demo": {"resolution": 64, "geo_crop": 0, "base_dtype": "fp32",
                             "steps": (200, 10) if run.gpu else (6, 2)},
                    "sd2": ({"resolution": 512, "geo_crop": 32, "base_dtype": "fp16", "width": 1, "steps": (40, 10)}
                            if run.gpu else
                            {"resolution": 128, "geo_crop": 8, "base_dtype": "fp32", "width": 16, "steps": (6, 2)})}
        results = []
        for name in args.chains:
            if results and not all(results) and not args.keep_going:
                run.report["skipped"].append(f"{name}: an earlier chain failed (--keep-going runs it)")
                continue
            source = "demo"
            if name == "sd2":
                t = time.monotonic()
                source = str(run.out / "sd2-source")
                if not (Path(source) / "model_index.json").exists():  # in a child: this process holds no CUDA
                    subprocess.run([sys.executable, __file__, "--build-sd2", source, str(settings["sd2"]["width"]),
                                    settings["sd2"]["base_dtype"]], check=True, timeout=600)
                run.report["sd2_build_s"] = round(time.monotonic() - t, 1)
            results.append(chain(run, name, source, world, settings[name], run.out / "qc"))
        run.report["ok"] = bool(results) and all(results) and len(results) == len(args.chains)
    finally:
        if run.cluster is not None:
            run.cluster.stop()
        if run.memory is not None:
            run.memory.stop()
        run.emit()
    sys.exit(0 if run.report["ok"] else 1)


def build_sd2(folder: str, width: int, dtype: str) -> None:
    """SD-2-base's architecture at `width` with random weights, saved as a diffusers folder in `dtype`; initialised
    on the GPU when there is one (much faster than on the CPU at SD-2's size)."""
    import torch

    from skindual.model import place
    from skindual.sd2 import build_sd2_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        pipe = build_sd2_pipeline("base", width)
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):  # model.place: diffusers' .to(dtype) warns for each
        place(model, device, {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    pipe.save_pretrained(folder, safe_serialization=True)


if __name__ == "__main__":
    main()
