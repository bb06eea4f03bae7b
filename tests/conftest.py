"""Shared pytest fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

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


# --------------------------------------------------------------------------- appended: generation tests


@pytest.fixture(scope="session")
def skindual_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """SKINDUAL_CACHE (the materialised demo base) in a session temp dir, not ~/.cache."""
    path = str(tmp_path_factory.mktemp("skindual-cache"))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SKINDUAL_CACHE", path)
        yield path


@pytest.fixture(scope="session")
def ray_cluster(s3_server: S3Server, skindual_cache: str) -> Iterator[str]:
    """A real local Ray cluster (`ray start --head`), bound to 127.0.0.1, with 4 logical CPUs and
    the dashboard on (`ray job submit` needs it); yields its GCS address "127.0.0.1:<port>".

    Every port is chosen free (no clash with other clusters on the machine), its temp dir is its
    own, and its workers get the demo-base cache and `s3_server`'s credentials in their
    environment, as nodes of a real cluster would have theirs (an instance role, say).
    """
    import secrets
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    from pathlib import Path

    from s3server import _free_ports

    ray = str(Path(sys.executable).parent / "ray")
    gcs, dashboard, client, agent, agent_grpc, metrics, node_manager, object_manager, runtime_env = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="ray-")  # short: unix socket paths are limited to ~107 bytes
    # Token authentication on (as on a real cluster), with this cluster's own token: drivers
    # connecting to it get RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH below (Ray 2.60 does not look for a
    # token when connecting unless the mode says so; `ray start` turns it on whenever
    # ~/.ray/auth_token exists, which any embedded `ray.init()` on the machine creates).
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    ray_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
               "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "RAY_"))}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # `python` of jobs
    env.update(ray_env, SKINDUAL_CACHE=skindual_cache,
               SKINDUAL_TEST_RAY_CLUSTER=temp_dir,  # marks our processes for the teardown
               AWS_ACCESS_KEY_ID=s3_server.access_key, AWS_SECRET_ACCESS_KEY=s3_server.secret_key,
               AWS_ENDPOINT_URL=s3_server.endpoint, AWS_DEFAULT_REGION=s3_server.region,
               AWS_EC2_METADATA_DISABLED="true", AWS_CONFIG_FILE=os.devnull,
               AWS_SHARED_CREDENTIALS_FILE=os.devnull)
    command = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=4",
               "--num-gpus=0", "--disable-usage-stats", f"--temp-dir={temp_dir}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
               f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
               f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
               f"--runtime-env-agent-port={runtime_env}"]
    try:
        subprocess.run(command, env=env, cwd=Path(__file__).resolve().parents[1], check=True,
                       capture_output=True, timeout=180)  # cwd: where `ray job submit` entrypoints run
        # Every job a test starts inherits these: the token, and RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0,
        # without which a driver turns 127.0.0.1 into the machine's address and cannot connect.
        with pytest.MonkeyPatch.context() as mp:
            for name, value in ray_env.items():
                mp.setenv(name, value)
            yield f"127.0.0.1:{gcs}"
    finally:
        # `ray stop` would stop every Ray cluster on the machine (other sessions' too): kill only
        # ours, by pid, found by the marker in their environment; twice, for late-started workers.
        marker = f"SKINDUAL_TEST_RAY_CLUSTER={temp_dir}".encode()
        for _ in range(2):
            for proc in Path("/proc").iterdir():
                try:
                    if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                        os.kill(int(proc.name), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            time.sleep(0.5)
        shutil.rmtree(temp_dir, ignore_errors=True)


# --------------------------------------------------------------------------- appended: evaluation and export tests

EVAL_SYNTHETIC_SIZE = 32  # the synthetic pairs' side (the demo generator's would be 64)


def write_test_shards(root, pairs, per_shard: int = 16, size: int = EVAL_SYNTHETIC_SIZE, first_shard: int = 0) -> None:
    """Commit `pairs` [(class code, seed)] as WebDataset shards under `root` (local or s3://), each a
    procedural demo lesion rendered at size × size: stand-ins for a generation run's output."""
    from skindual.demo_data import render_lesion
    from skindual.prompts import CLASS_BY_CODE, build_prompt, sample_key
    from skindual.shards import Sample, write_shard
    from skindual.storage import open_storage

    storage = open_storage(root)
    run_info = {"base_model": "test", "adapter_sha256": "", "layout": "channels", "scheduler": "ddim",
                "steps": 1, "guidance": 1.0, "fingerprint": "test", "image_format": "jpg"}
    for start in range(0, len(pairs), per_shard):
        shard, samples = first_shard + start // per_shard, []
        for index, (code, seed) in enumerate(pairs[start:start + per_shard]):
            image, mask = render_lesion(code, seed, (size, size))
            samples.append(Sample(key=sample_key(shard, index), row_id=start + index, class_code=code,
                                  class_index=CLASS_BY_CODE[code].index, prompt=build_prompt(code), seed=seed,
                                  image=image, mask=mask))
        write_shard(storage, shard, samples, run_info)


@pytest.fixture(scope="session")
def eval_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small demo world for the evaluation and export jobs: a HAM10000-layout folder (8 images per
    class, 16 nv), its training table, and 4 synthetic pairs per class in 2 committed shards."""
    from skindual import data, demo_data
    from skindual.prompts import CLASS_CODES

    root = tmp_path_factory.mktemp("eval-world")
    demo_data.write_demo_dataset(root / "data", {c: 16 if c == "nv" else 8 for c in CLASS_CODES}, seed=3)
    table = root / "training_table.parquet"
    data.write_training_table(data.training_table(str(root / "data"), seed=0), str(table))
    pairs = [(code, 10_000 + 100 * i + k) for i, code in enumerate(CLASS_CODES) for k in range(4)]
    write_test_shards(root / "synthetic", pairs)
    return {"root": root, "table": str(table), "synthetic": str(root / "synthetic"), "pairs": pairs}
