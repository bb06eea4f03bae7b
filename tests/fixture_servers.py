"""The session's servers and clusters, all on 127.0.0.1: a real SeaweedFS S3 server, a two-node local Ray
cluster (as `ray start` makes one), a Ray cluster that autoscales fake GPU nodes, and the demo base's cache."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from s3server import S3Server, run_seaweedfs


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real SeaweedFS S3 server on 127.0.0.1 for the whole session (see tests/s3server.py)."""
    with run_seaweedfs() as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point the standard AWS environment at `s3_server` and return a fresh ``s3://bucket/run`` URL.

    Any other AWS setting of the caller's (profile, session token, config files) is hidden, and
    the EC2 metadata lookup is off so that nothing but 127.0.0.1 is ever contacted.
    """
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)
    monkeypatch.setenv("AWS_DEFAULT_REGION", s3_server.region)
    return f"s3://{s3_server.create_bucket()}/run"


@pytest.fixture(scope="session")
def skindual_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SKINDUAL_CACHE (the materialised demo base) in a session temp dir, not ~/.cache."""
    path = str(tmp_path_factory.mktemp("skindual-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINDUAL_CACHE", path)
        yield path


@dataclass(frozen=True)
class RayTestCluster:
    """The session's local Ray cluster: a head node and one worker node, both on 127.0.0.1."""

    address: str  # the GCS address "127.0.0.1:<port>": RAY_ADDRESS of a job's driver
    dashboard: str  # "http://127.0.0.1:<port>": `ray job submit --address`, `ray list --address`
    temp_dirs: tuple[str, str]  # the head's and the worker node's --temp-dir
    caches: tuple[str, str]  # the head's and the worker node's SKINDUAL_CACHE (each node has its own)


def ray_list(cluster: RayTestCluster, resource: str, *filters: str, detail: bool = False) -> list[dict]:
    """`ray list RESOURCE --filter F ...` of the cluster's state API, as dicts (`detail`: with --detail: a task's
    times, say)."""
    command = [str(Path(sys.executable).parent / "ray"), "list", resource, "--format", "json", "--limit", "10000",
               "--address", cluster.dashboard, *(arg for f in filters for arg in ("--filter", f)),
               *(["--detail"] if detail else [])]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def ray_test_cluster(s3_server: S3Server, skindual_cache: str) -> Iterator[RayTestCluster]:
    """A real local Ray cluster of two nodes, as `ray start` makes one: a head (`ray start --head`,
    2 logical CPUs, the dashboard on: `ray job submit` needs it) and a worker node (`ray start
    --address=<head>`, 2 logical CPUs; through tests/ray_join.py), both bound to 127.0.0.1 only.

    Every port is chosen free (no clash with other clusters on the machine), each node's temp dir
    and cache (SKINDUAL_CACHE: the head's is the session's `skindual_cache`) are its own, and the nodes
    get `s3_server`'s credentials in their environment, as nodes of a real cluster would have theirs
    (an instance role, say).
    """
    from s3server import _free_ports

    ray = str(Path(sys.executable).parent / "ray")
    gcs, dashboard, client, *head_ports = _free_ports(9)
    # short: unix socket paths are limited to ~107 bytes
    temp_dirs = (tempfile.mkdtemp(prefix="ray-"), tempfile.mkdtemp(prefix="ray-w-"))
    # Token authentication on (as on a real cluster), with this cluster's own token: drivers
    # connecting to it get RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH below (Ray 2.60 does not look for a
    # token when connecting unless the mode says so; `ray start` turns it on whenever
    # ~/.ray/auth_token exists, which any embedded `ray.init()` on the machine creates).
    token = Path(temp_dirs[0]) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    # SKINDUAL_SHARED_FS=/: both nodes are this machine, so every local path is on a file system they share
    # (jobs refuse local paths on a cluster of several nodes otherwise; tests of that refusal unset it)
    ray_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(token), "SKINDUAL_SHARED_FS": "/"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` of jobs
    env.update(ray_env, SKINDUAL_CACHE=skindual_cache,
               SKINDUAL_TEST_RAY_CLUSTER=temp_dirs[0],  # marks our processes (both nodes') for the teardown
               AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION=s3_server.region,
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    # the nodes start a Python worker when a task or actor needs one, none ahead for a connecting driver:
    # on the 2-core test machine that measured 4-11 % less CPU over the cluster and fine-tuning tests
    env.update(RAY_prestart_worker_first_driver="0", RAY_enable_worker_prestart="0")
    # Ray Train's controller polls its workers every 2 s by default: the end of each training run and a lost worker
    # are seen that much later; the tests' runs are seconds long
    env.update(RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5")

    def node_ports(agent, agent_grpc, metrics, node_manager, object_manager, runtime_env) -> list[str]:
        return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}", f"--node-manager-port={node_manager}",
                f"--object-manager-port={object_manager}", f"--runtime-env-agent-port={runtime_env}"]

    head = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=2",
            "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dirs[0]}", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}", *node_ports(*head_ports)]
    # `ray start --address=127.0.0.1:<gcs>` through tests/ray_join.py (see there: Ray 2.60 refuses it as is)
    worker = [sys.executable, str(Path(__file__).parent / "ray_join.py"), "start", f"--address=127.0.0.1:{gcs}",
              "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dirs[1]}",
              *node_ports(*_free_ports(6))]
    caches = (skindual_cache, tempfile.mkdtemp(prefix="skindual-cache-node2-"))
    cluster = RayTestCluster(f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dirs, caches)
    try:
        for command, cache, temp_dir in ((head, caches[0], temp_dirs[0]), (worker, caches[1], temp_dirs[1])):
            start_node(command, {**env, "SKINDUAL_CACHE": cache, "SKINDUAL_TEST_RAY_NODE": temp_dir})
        # Every job a test starts inherits these: the token, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        # without which a driver turns 127.0.0.1 into the machine's address and cannot connect.
        with pytest.MonkeyPatch.context() as mp:
            for name, value in ray_env.items():
                mp.setenv(name, value)
            deadline = time.monotonic() + 60
            while sum(n["state"] == "ALIVE" for n in ray_list(cluster, "nodes")) < 2:
                assert time.monotonic() < deadline, "the worker node did not join the head"
                time.sleep(1)
            yield cluster
    finally:
        kill_marked(f"SKINDUAL_TEST_RAY_CLUSTER={temp_dirs[0]}")
        for temp_dir in (*temp_dirs, caches[1]):
            shutil.rmtree(temp_dir, ignore_errors=True)


def kill_marked(marker: str) -> None:
    """SIGKILL this machine's processes whose environment holds `marker` (``NAME=value``): `ray stop` would stop
    every Ray cluster on the machine (other sessions' and test workers' too); twice, for late-started workers."""
    for _ in range(2):
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and marker.encode() in (proc / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc.name), signal.SIGKILL)
            except (OSError, ValueError):
                pass
        time.sleep(0.5)


def start_node(command: list[str], env: dict[str, str], tries: int = 3) -> None:
    """`ray start ...` (the head, or a node joining it) to its end.  Ray gives a starting node's raylet 30 s to
    register with the GCS (fixed in ray/_private/node.py); on a 2-core machine busy with other tests (pytest-xdist's
    other worker training, say) it can take longer, and `ray start` fails.  A failed start's processes (marked by
    SKINDUAL_TEST_RAY_NODE in their environment) are killed and the start tried again."""
    for attempt in range(1, tries + 1):
        started = subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], capture_output=True,
                                 text=True, timeout=180)  # cwd: where `ray job submit` entrypoints run
        if started.returncode == 0:
            return
        failure = f"{command[:4]}: {started.stdout[-2000:]}{started.stderr[-3000:]}"
        assert attempt < tries and "timed out during startup" in started.stderr, failure
        kill_marked(f"SKINDUAL_TEST_RAY_NODE={env['SKINDUAL_TEST_RAY_NODE']}")
        for leftover in Path(env["SKINDUAL_TEST_RAY_NODE"]).glob("session_*"):
            shutil.rmtree(leftover, ignore_errors=True)


@pytest.fixture(scope="module")
def autoscaling_cluster(skindual_cache: str):
    """A Ray cluster on 127.0.0.1 whose autoscaler launches (fake) GPU nodes of two models, A10G and L4, from
    zero, as cluster.yaml's does (tests/autoscaling.py); its own token, so drivers use its `env`.  Stopped after
    the module that uses it: idle, its head and autoscaler (polling every second) take 5% of a core, which the
    rest of a session would pay for."""
    from autoscaling import run_autoscaling_cluster
    from s3server import _free_ports

    with run_autoscaling_cluster(_free_ports, dict(os.environ, SKINDUAL_CACHE=skindual_cache)) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def ray_cluster(ray_test_cluster: RayTestCluster) -> str:
    """The GCS address "127.0.0.1:<port>" of the session's two-node local Ray cluster (`ray_test_cluster`)."""
    return ray_test_cluster.address


