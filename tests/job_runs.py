"""Running the real jobs as a user runs them, for the tests: one subprocess per job, its output captured.

`run_job("generate", [...], ray_address)` is ``python jobs/generate.py ...`` from the repository root;
without a `ray_address` the job starts its own embedded local Ray cluster (RAY_ADDRESS removed), with one
it connects to that cluster.  `run_jobs` runs independent jobs side by side.  `start_job` is the same, not
waited for (its output merged into a pipe or a log file), for tests that kill it.  `ok` and `error_line` check
how a job ended.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO

from skindual.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def job_env(ray_address: str | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    # as on the test cluster (tests/fixture_servers.py): a job's own embedded cluster inherits it from the job
    return env | {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"} | extra


def command(job: str, args: list[str]) -> list[str]:
    return [sys.executable, str(ROOT / "jobs" / f"{job}.py"), *args]


def run_job(job: str, args: list[str], ray_address: str | None = None, timeout: int = 600,
            **env: str) -> subprocess.CompletedProcess:
    """Run ``jobs/<job>.py args`` to its end; stdout and stderr apart."""
    return subprocess.run(command(job, args), cwd=ROOT, env=job_env(ray_address, **env), capture_output=True,
                          text=True, timeout=timeout)


def run_jobs(runs: list[tuple[str, list[str]]], ray_address: str | None = None,
             timeout: int = 600) -> list[subprocess.CompletedProcess]:
    """Independent jobs side by side, each ``(job, args)`` to its end (`run_job`); their results in order.  A job
    leaves the 2-core test machine's CPUs idle for much of its time (its actors and workers starting), which the
    others fill."""
    with ThreadPoolExecutor(len(runs)) as pool:
        return list(pool.map(lambda run: run_job(*run, ray_address=ray_address, timeout=timeout), runs))


def start_job(job: str, args: list[str], ray_address: str | None = None, log: IO[str] | None = None,
              **env: str) -> subprocess.Popen:
    """Start ``jobs/<job>.py args`` in its own session (a test can kill it and its children); its stdout and
    stderr together into `log`, or a text pipe."""
    return subprocess.Popen(command(job, args), cwd=ROOT, env=job_env(ray_address, **env),
                            stdout=log if log is not None else subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def ok(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``error:`` line of a job that ended on a user mistake (exit status 2, no traceback)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout[-2000:] + result.stderr[-3000:]
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def registered_steps(run: Path | str) -> list[int]:
    """Steps of the checkpoints Ray Train's checkpoint manager has registered (what it resumes from), in a run
    folder or under an s3:// URL."""
    try:
        if isinstance(run, Path):
            snapshot = json.loads((run / "checkpoint_manager_snapshot.json").read_text())
        else:
            snapshot = json.loads(open_storage(run).read_bytes("checkpoint_manager_snapshot.json"))
    except (OSError, ValueError):
        return []
    return [r["metrics"]["step"] for r in snapshot["checkpoint_results"]]
