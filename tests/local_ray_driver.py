"""A job's driver on its embedded local Ray cluster (`init_ray`, no RAY_ADDRESS), for tests/test_cluster.py.

It runs as a job does (`cli.run_job`), in the environment the test gives it (the quick start's: no
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER), and prints one line ``listeners: [...]``, the addresses that it and the
Ray processes it started listen on, and ``clusters: [its own, the one a worker finds]``.  Then its workers fail as workers do: an actor whose ``__init__`` raises a
`UserError` (the job shows one line for that, never the worker's traceback), a task that logs an error with
its traceback and an NCCL error line and raises, and an actor that crashes (SIGSEGV) and fails the job.
Beside those, the workers write chatter that a quiet job must not show.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass

import psutil

from skindual.cli import run_job, worker_setup
from skindual.cluster import init_ray
from skindual.errors import UserError

CHATTER = "chatter of a library that a quiet job does not show"


@dataclass(frozen=True)
class DriverConfig:
    """No flags: the driver's environment is the test's setting."""


def listening_addresses() -> list[str]:
    """The addresses this process and its descendants (the Ray processes it started) listen on (TCP)."""
    me = psutil.Process()
    found = set()
    for proc in [me, *me.children(recursive=True)]:
        try:
            connections = proc.net_connections(kind="inet")
        except psutil.Error:
            continue
        found |= {c.laddr.ip.removeprefix("::ffff:") for c in connections if c.status == psutil.CONN_LISTEN}
    return sorted(found)


class RefusingActor:
    def __init__(self) -> None:
        raise UserError("--adapter somewhere: refused inside an actor")

    def ping(self) -> None:
        return None


def failing_task() -> None:
    worker_setup()
    print(CHATTER)
    logging.getLogger("skindual.driver").info("a worker's own progress line")
    print("NCCL WARN socketProgress: Connection closed by remote peer", file=sys.stderr, flush=True)
    library = logging.getLogger("a_library")  # a library's logger, as a library formats it
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    library.addHandler(handler)
    library.propagate = False
    library.warning(CHATTER)
    try:
        raise RuntimeError("collective timed out in the worker")
    except RuntimeError:
        library.exception("the worker's collective failed")
    raise RuntimeError("the task fails")


class CrashingActor:
    def ping(self) -> int:
        print(CHATTER, flush=True)
        return os.getpid()

    def crash(self) -> None:
        import ctypes

        ctypes.string_at(0)  # SIGSEGV: the worker's own stderr says why, the driver only that it died


def cluster_seen() -> str:
    """The cluster a worker finds when it looks its own up without an address, as Ray Train's placement-group
    cleaner does (through the state API) every few seconds."""
    from ray._private.services import canonicalize_bootstrap_address_or_die

    return canonicalize_bootstrap_address_or_die(None)


def main(cfg: DriverConfig) -> None:
    import ray

    init_ray(min_cpus=2)
    crashing = ray.remote(max_restarts=0)(CrashingActor).remote()
    ray.get(crashing.ping.remote())  # a worker process up before the listeners are read
    print("listeners: " + json.dumps(listening_addresses()), flush=True)
    try:
        seen = ray.get(ray.remote(cluster_seen).options(max_retries=0).remote())
    except Exception as exc:  # noqa: BLE001 - the test reads what it found
        seen = repr(exc)
    print("clusters: " + json.dumps([ray.get_runtime_context().gcs_address, seen]), flush=True)
    refusing = ray.remote(RefusingActor).remote()
    try:
        ray.get(refusing.ping.remote())
    except Exception:  # noqa: BLE001 - its line must not reach the output
        pass
    try:
        ray.get(ray.remote(failing_task).options(max_retries=0).remote())
    except Exception:  # noqa: BLE001 - its worker's error lines must reach the output
        pass
    ray.get(crashing.crash.remote())  # fails the job


if __name__ == "__main__":
    os.umask(0o022)  # a usual user's: files others can read unless created otherwise
    sys.exit(run_job(main, DriverConfig, __doc__))
