"""A chaos run: one generation job to S3 and one fine-tune, under seeded random faults, end as uninterrupted runs.

On a real SeaweedFS (tests/s3server.py, on 127.0.0.1) and the jobs' own embedded Ray, as a user runs them:

1. the reference: ``jobs/generate.py`` (the shipped demo adapter) into ``s3://.../reference``, nothing
   interrupted;
2. the same job into ``s3://.../chaos-1``, started again after every run with a fault or a failure, while a seeded
   schedule injects ``--faults`` faults (every kind twice from 12 on), each at a random moment of a run (up to 0.4
   of the reference's wall after the last; when a round's output is done with faults left, they go to a fresh
   round, ``chaos-2`` and so on):

   - ``actor``: a generator actor SIGKILLed (Ray Data restarts it and retries its shard);
   - ``driver``: the driver SIGKILLed (the job is run again);
   - ``s3``: the S3 server stopped and started again mid-upload (boto3 retries, or the run fails and is run again);
   - ``truncate``: a committed shard's tar cut to half behind its ``_stats.json`` (the next run must find it by
     its size and write it again);
   - ``flip``: one byte of a committed shard's tar or parquet flipped, the size kept (S3 gives the rewritten
     object another ETag: the next run must see the stamp changed, hash the file and write the shard again);
   - ``cut``: the run cut short (the driver SIGKILLed once it has committed shards and none is damaged); before it
     is run again, ``jobs/export.py`` on the unfinished output must refuse it in one line naming ``--partial``
     (exit 2, nothing written), ``skindual.shards.read_shards`` must refuse it, and with ``partial=True`` read
     exactly its committed shards, each file and each pair the reference's;

   and after the last run a truncated tar, a flipped tar byte and a flipped parquet byte, each in another shard,
   which one more run must name and write again;
3. the checks: every shard file of each round's output has the reference's bytes, the counts are exact, every
   shard matches its ``_stats.json`` (sha256), no temporary or half-written object is visible, and a job run
   once more finds the work done;
4. a fine-tune (``jobs/finetune.py``, 8 steps) with its training worker SIGKILLed after the first checkpoint
   (Ray Train restarts it) and then the driver SIGKILLed and the job run again, against an uninterrupted one:
   the same adapter bytes.

    python bench/chaos.py [--seed 0] [--faults 16] [--per-class 3] [--samples-per-shard 3]

The last line is one JSON object: ``faults`` (kind, run, round, seconds into it, what it hit), ``faults_by_kind``,
``runs``, ``rounds``, ``checks`` (each True or the mismatch), ``ok``, and the walls.  Exit status 1 when a check
fails.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
KINDS = ("actor", "driver", "s3", "truncate", "flip", "cut")


def job(name: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    return subprocess.Popen([sys.executable, str(ROOT / "jobs" / f"{name}.py"), *args], cwd=ROOT, env=env,
                            stdout=out, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def descendants(pid: int, live: bool = False) -> list[int]:
    """Every process of the job's session (its embedded Ray included); with `live`, not those already dead."""
    found = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if os.getsid(int(proc.name)) == pid and not (
                        live and (proc / "stat").read_text().rpartition(")")[2].split()[0] == "Z"):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def processes_named(pid: int, needle: str) -> list[int]:
    found = []
    for child in descendants(pid):
        try:
            if needle in Path(f"/proc/{child}/cmdline").read_bytes().decode(errors="replace"):
                found.append(child)
        except OSError:
            continue
    return found


def kill_session(pid: int) -> None:
    for child in descendants(pid):
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass


def snapshot(storage) -> dict[str, str]:
    """sha256 of every shard file; stats without what the listing said of the files at commit (not reproducible)."""
    from fixture_data import shard_snapshot

    return shard_snapshot(storage)


def wait(proc: subprocess.Popen, timeout: float) -> int | None:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return None


def settled_shards(storage) -> list[int]:
    """The committed shards whose tar and parquet the listing shows with the size and stamp their ``_stats.json``
    records: neither damaged since nor due to be written again by the running job, so what the bench does to
    one is found only by the next run."""
    from skindual.shard_format import shard_names
    from skindual.shard_store import committed_shards, read_stats

    listing = storage.listing()
    settled = []
    for shard in committed_shards(storage, listing):
        stats = read_stats(storage, shard)
        tar, parquet, _ = shard_names(shard)
        if stats is not None and all(
                name in listing and listing[name].size == size and stamp and listing[name].stamp == stamp
                for name, size, stamp in ((tar, stats.tar_bytes, stats.tar_stamp),
                                          (parquet, stats.parquet_bytes, stats.parquet_stamp))):
            settled.append(shard)
    return settled


def flip_byte(storage, name: str, rng: random.Random) -> int:
    """Write `name` again with one byte inverted, the size kept; the byte's offset."""
    data = bytearray(storage.read_bytes(name))
    at = rng.randrange(len(data))
    data[at] ^= 0xFF
    storage.write_bytes(name, bytes(data))
    return at


class Injector:
    """The faults of the chaos outputs: `inject` one into a running job; the outcome of each cut's reader checks
    in `cuts`."""

    def __init__(self, server, reference: str, env: dict[str, str], work: Path, rng: random.Random) -> None:
        self.server, self.reference, self.env, self.work, self.rng = server, reference, env, work, rng
        self.cuts: list[dict] = []
        self._reference_pairs: dict[str, dict] | None = None

    def inject(self, kind: str, proc: subprocess.Popen, output: str) -> str | None:
        """One fault into the running job `proc` writing `output`: what it hit ("" when nothing to name), or None
        when there is nothing to hit yet (no generator actor, no committed shard)."""
        from skindual.shard_format import shard_names
        from skindual.storage import open_storage

        rng = self.rng
        if kind == "actor":
            actors = processes_named(proc.pid, "ShardGenerator")
            if not actors:
                return None
            os.kill(rng.choice(actors), signal.SIGKILL)
        elif kind == "driver":
            kill_session(proc.pid)
        elif kind == "s3":
            self.server.stop()
            time.sleep(rng.uniform(2, 6))
            self.server.start()
        elif kind == "truncate":
            storage = open_storage(output)
            tars = [n for n in storage.list()
                    if n.endswith(".tar") and storage.exists(n.replace(".tar", "_stats.json"))]
            if not tars:
                return None
            name = rng.choice(tars)
            data = storage.read_bytes(name)
            storage.write_bytes(name, data[: len(data) // 2])  # behind its commit marker
            return name
        elif kind == "flip":
            storage = open_storage(output)
            shards = settled_shards(storage)
            if not shards:
                return None
            name = shard_names(rng.choice(shards))[rng.randrange(2)]  # its tar or its parquet
            return f"{name} byte {flip_byte(storage, name, rng)}"
        elif kind == "cut":
            return self.cut(proc, output)
        return ""

    def cut(self, proc: subprocess.Popen, output: str) -> str | None:
        """Cut the run short once it has committed shards, none damaged; then point the readers at what it left."""
        from skindual.shard_store import committed_shards, damaged_shards, unfinished
        from skindual.storage import open_storage

        storage = open_storage(output)
        committed = committed_shards(storage)
        if not committed or unfinished(storage, committed) is None or damaged_shards(storage, verify=True):
            return None  # nothing committed yet, the run not started (or done), or a fault of its own to find first
        kill_session(proc.pid)
        proc.wait()
        deadline = time.monotonic() + 60
        while descendants(proc.pid, live=True) and time.monotonic() < deadline:  # nothing left to write
            time.sleep(0.2)
        committed = committed_shards(storage)
        self.cuts.append({"run": output, "committed": len(committed), **self.read_cut(output, committed)})
        return f"{len(committed)} shards committed"

    def read_cut(self, output: str, committed: list[int]) -> dict[str, object]:
        """The readers on an unfinished output: the export job and `read_shards` refuse it; `read_shards` with
        ``partial=True`` gives the committed shards' pairs, each the reference's, from files with its bytes."""
        from skindual.errors import UserError
        from skindual.shard_format import shard_names
        from skindual.shards import read_shards
        from skindual.storage import open_storage

        export = self.work / f"export-cut-{len(self.cuts) + 1}"
        done = subprocess.run([sys.executable, str(ROOT / "jobs" / "export.py"), "--synthetic", output, "--output",
                               str(export)], cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=600)
        lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
        job_refused = (done.returncode == 2 and len(lines) == 1 and "--partial" in lines[0]
                       and "has not finished" in lines[0] and not export.exists()) or lines[-3:]
        try:
            next(iter(read_shards(output)))
            reader_refused: object = "read as whole"
        except UserError as err:
            reader_refused = "partial=True" in str(err) and "\n" not in str(err) or str(err)
        if self._reference_pairs is None:
            self._reference_pairs = {s["key"]: s for s in read_shards(self.reference)}
        pairs = list(read_shards(output, partial=True))
        read = sorted({int(s["key"]) // 10**4 for s in pairs})
        differ = [s["key"] for s in pairs if not same_pair(s, self._reference_pairs.get(s["key"]))]
        a, b = snapshot(open_storage(self.reference)), snapshot(open_storage(output))
        files = [name for shard in committed for name in shard_names(shard) if a.get(name) != b.get(name)]
        partial = (read == committed and len(pairs) > 0 and not differ and not files) or {
            "shards_read": read, "pairs_differ": differ, "files_differ": files}
        return {"job_refused": job_refused, "reader_refused": reader_refused, "partial_same_bytes": partial}


def same_pair(a: dict, b: dict | None) -> bool:
    import numpy as np

    return b is not None and all(np.array_equal(a[k], b[k]) for k in ("image", "mask", "ignore")) and all(
        a[k] == b[k] for k in ("class_index", "prompt", "meta"))


def named(log: str, shard: int, why: str) -> bool:
    """Whether a line of `log` names `shard` as damaged for `why`."""
    return any(f"shard {shard:05d}" in line and why in line for line in log.splitlines())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--faults", type=int, default=16)
    parser.add_argument("--per-class", type=int, default=3)
    parser.add_argument("--samples-per-shard", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--no-finetune", action="store_true", help="skip the fine-tune part")
    args = parser.parse_args()

    from s3server import RestartableSeaweedFS

    from skindual.shard_format import shard_names
    from skindual.storage import open_storage

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="chaos-"))
    server = RestartableSeaweedFS(Path(tempfile.mkdtemp(prefix="weed-")))
    started = time.monotonic()
    faults: list[dict] = []
    checks: dict[str, object] = {}
    runs, rounds, reference_seconds = 0, [], 0.0
    try:
        bucket = server.server.create_bucket()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))} | {
            "AWS_ACCESS_KEY_ID": server.server.access_key, "AWS_SECRET_ACCESS_KEY": server.server.secret_key,
            "AWS_ENDPOINT_URL": server.server.endpoint, "AWS_DEFAULT_REGION": server.server.region,
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "SKINDUAL_CACHE": str(work / "cache"),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
        os.environ.update({k: v for k, v in env.items() if k.startswith("AWS_")})  # this process reads S3 too
        generate = ["--per-class", str(args.per_class), "--samples-per-shard", str(args.samples_per_shard),
                    "--steps", str(args.steps), "--batch-size", "3"]
        reference = f"s3://{bucket}/reference"
        t = time.monotonic()
        assert job("generate", [*generate, "--output", reference], env, work / "reference.log").wait() == 0, \
            (work / "reference.log").read_text()[-3000:]
        reference_seconds = time.monotonic() - t
        injector = Injector(server, reference, env, work, rng)

        # the chaos outputs: run the job again after each failure, faults at random moments of the runs (scaled to
        # the reference's wall); a round whose output is done while faults remain hands them to a fresh round
        pending = (list(KINDS) * 2)[:args.faults] + [rng.choice(KINDS) for _ in range(args.faults - 2 * len(KINDS))]
        rng.shuffle(pending)  # every kind at least once from 6 faults on, twice from 12
        latest = max(4.0, 0.4 * reference_seconds)
        while pending and len(rounds) < args.faults and "finished" not in checks:
            chaos = f"s3://{bucket}/chaos-{len(rounds) + 1}"
            rounds.append(chaos)
            while True:
                runs += 1
                log = work / f"chaos-{runs}.log"
                proc = job("generate", [*generate, "--output", chaos], env, log)
                run_started, injected = time.monotonic(), len(faults)
                while pending and proc.poll() is None:
                    kind = pending[0]
                    if wait(proc, rng.uniform(3, latest)) is not None:
                        break  # the run ended before the fault: the fault waits for the next run
                    at = round(time.monotonic() - run_started, 1)
                    hit = injector.inject(kind, proc, chaos)
                    if hit is None:  # nothing to hit yet (no actor, no committed shard): the fault waits
                        continue
                    pending.pop(0)
                    at = f"{at} ({hit})" if hit else at
                    faults.append({"kind": kind, "run": runs, "round": len(rounds), "at_s": at})
                code = proc.wait()
                # done, and no fault in this run (a shard damaged behind the run is for the next run to find)
                if code == 0 and len(faults) == injected and re.search(r"^(already )?done: ", log.read_text(), re.M):
                    break
                if runs > 4 * args.faults:
                    checks["finished"] = f"the job did not finish after {runs} runs (last exit {code}, log {log})"
                    break
        # damage planted after the last run, each in another shard: the next run must name it and write it again
        chaos = rounds[-1]
        storage = open_storage(chaos)
        shards = sorted(int(n[:5]) for n in storage.list() if n.endswith(".tar"))
        first, middle, last = shards[0], shards[len(shards) // 2], shards[-1]
        storage.write_bytes(shard_names(first)[0], storage.read_bytes(shard_names(first)[0])[:1000])
        planted = {first: ("truncate", shard_names(first)[0], "bytes where its _stats.json records")}
        for shard, name in ((last, shard_names(last)[0]), (middle, shard_names(middle)[1])):  # a tar, a parquet
            if shard not in planted:
                planted[shard] = ("flip", f"{name} byte {flip_byte(storage, name, rng)}", "does not match the sha256")
        runs += 1
        for kind, hit, _ in planted.values():
            faults.append({"kind": kind, "run": runs, "round": len(rounds), "at_s": f"before it ({hit})"})
        rerun = job("generate", [*generate, "--output", chaos], env, work / "chaos-final.log")
        checks["rerun_after_damage_exit"] = rerun.wait()
        final_log = (work / "chaos-final.log").read_text()
        for kind in ("truncate", "flip"):
            missed = [f"{shard:05d}" for shard, (k, _, why) in planted.items() if k == kind
                      and not named(final_log, shard, why)]
            checks[f"{'truncation' if kind == 'truncate' else 'flip'}_named"] = missed or True
        if injector.cuts:
            for check in ("job_refused", "reader_refused", "partial_same_bytes"):
                wrong = {i + 1: cut[check] for i, cut in enumerate(injector.cuts) if cut[check] is not True}
                checks[f"cut_{check}"] = wrong or True

        checks.update(check_outputs(reference, rounds, args.per_class))
        again = job("generate", [*generate, "--output", rounds[-1]], env, work / "again.log")
        checks["then_already_done"] = again.wait() == 0 and "already done" in (work / "again.log").read_text()

        if not args.no_finetune:
            checks.update(finetune_chaos(env, work, faults, rng))
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)
    ok = all(v is True or v == 0 for v in checks.values())
    summary = {"ok": ok, "seed": args.seed, "faults_injected": len(faults),
               "faults_by_kind": dict(Counter(f["kind"] for f in faults)), "faults": faults, "runs": runs,
               "rounds": len(rounds), "checks": checks, "reference_seconds": round(reference_seconds, 1),
               "total_seconds": round(time.monotonic() - started, 1)}
    if ok:
        shutil.rmtree(work, ignore_errors=True)
    else:
        summary["logs"] = str(work)
    print(json.dumps(summary, default=str))
    return 0 if ok else 1


def check_outputs(reference: str, rounds: list[str], per_class: int) -> dict[str, object]:
    """Each round's output against the reference: the same shard bytes and counts, exact counts, every shard
    matching its sha256, nothing but shard and run files (and the dataset card)."""
    from skindual.shard_store import damaged_shards
    from skindual.storage import open_storage

    ref = open_storage(reference)
    a = snapshot(ref)
    reference_totals = json.loads(ref.read_bytes("manifest.json"))["totals"]
    mismatch: dict[str, dict] = {}
    for chaos in rounds:
        out = open_storage(chaos)
        b = snapshot(out)
        if a != b:
            mismatch.setdefault("same_bytes", {})[chaos] = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        totals = json.loads(out.read_bytes("manifest.json"))["totals"]
        if totals != reference_totals:
            mismatch.setdefault("same_counts", {})[chaos] = totals
        if not all(v["ok"] == per_class for v in totals["per_class"].values()):
            mismatch.setdefault("exact_counts", {})[chaos] = totals["per_class"]
        damaged = damaged_shards(out, verify=True)
        if damaged:
            mismatch.setdefault("intact", {})[chaos] = damaged
        leftovers = [n for n in out.list() if not re.fullmatch(
            r"\d{5}(\.tar|\.parquet|_stats\.json)|(sizes|manifest|run)\.json|README\.md|preview\.png", n)]
        if leftovers:
            mismatch.setdefault("nothing_half_written", {})[chaos] = leftovers
    return {check: mismatch.get(check, True)
            for check in ("same_bytes", "same_counts", "exact_counts", "intact", "nothing_half_written")}
def finetune_chaos(env: dict[str, str], work: Path, faults: list[dict], rng: random.Random) -> dict[str, object]:
    """A fine-tune whose training worker is SIGKILLed after its first checkpoint and whose driver is SIGKILLed
    later: run again, it ends with the adapter bytes of an uninterrupted run."""
    from skindual.demo.world import prepare_demo_world

    real = str(prepare_demo_world(work / "world", data_scale=0.02, measure=False).real)
    common = ["--training-data", real, "--steps", "8", "--checkpoint-every", "2", "--batch-size", "4",
              "--validation-per-class", "1", "--validation-steps", "2", "--lora-rank", "4", "--output",
              str(work / "runs")]
    assert job("finetune", [*common, "--name", "reference"], env, work / "ft-reference.log").wait() == 0
    run = work / "runs" / "chaos"

    def checkpointed() -> bool:
        return any(run.glob("checkpoint_*/progress.json"))

    proc = job("finetune", [*common, "--name", "chaos"], env, work / "ft-chaos-1.log")
    started = time.monotonic()
    while not checkpointed() and proc.poll() is None:
        time.sleep(0.3)
    workers = processes_named(proc.pid, "RayTrainWorker")
    if workers:
        os.kill(rng.choice(workers), signal.SIGKILL)
        faults.append({"kind": "training worker", "run": "fine-tune 1", "at_s": round(time.monotonic() - started, 1)})
    time.sleep(rng.uniform(3, 10))
    if proc.poll() is None:
        kill_session(proc.pid)
        faults.append({"kind": "fine-tune driver", "run": "fine-tune 1", "at_s": round(time.monotonic() - started, 1)})
    code = job("finetune", [*common, "--name", "chaos"], env, work / "ft-chaos-2.log").wait()

    def digests(name: str) -> dict:
        meta = json.loads((work / "runs" / name / "adapter" / "skindual_adapter.json").read_text())
        return {k: v for k, v in meta["files"].items() if k.endswith(".safetensors")}

    return {"finetune_rerun_exit": code,
            "finetune_same_adapter": code == 0 and digests("chaos") == digests("reference")}


if __name__ == "__main__":
    sys.exit(main())
