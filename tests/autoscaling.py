"""A Ray cluster that autoscales from zero GPU nodes, on this machine: the shape of cluster.yaml in small.

`run_autoscaling_cluster` starts ``ray start --head --autoscaling-config=...`` with Ray's fake multi-node
provider (``RAY_FAKE_CLUSTER=1``: the autoscaler "launches" a node by starting a Ray node process here with
the node type's resources), what `ray.cluster_utils.AutoscalingCluster` does, made fit for a shared test
machine: bound to 127.0.0.1 on free ports, its own temp dir and token, no ``ray stop`` (which would stop
every Ray cluster on the machine), its processes killed by a marker in their environment.  The head has
CPUs and no GPU; two GPU node types (fake GPUs, one A10G and one L4 each, at most one node of each)
start with zero nodes, as cluster.yaml's do.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import yaml
from fixture_servers import kill_marked

GPU_NODE_TYPES = {
    "gpu_a10g": {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:A10G": 1}, "node_config": {},
                 "min_workers": 0, "max_workers": 1},
    "gpu_l4": {"resources": {"CPU": 1, "GPU": 1, "accelerator_type:L4": 1}, "node_config": {},
               "min_workers": 0, "max_workers": 1},
}


@dataclass(frozen=True)
class AutoscalingTestCluster:
    address: str  # "127.0.0.1:<gcs port>"
    env: dict[str, str]  # what a driver connecting to it needs (RAY_ADDRESS, the token)
    temp_dir: str


@contextmanager
def run_autoscaling_cluster(free_ports, base_env: dict[str, str], head_cpus: int = 2) -> Iterator[AutoscalingTestCluster]:
    """Start the cluster (see the module docstring); `free_ports(n)` gives n free ports on 127.0.0.1."""
    gcs, dashboard, client = free_ports(3)
    temp_dir = tempfile.mkdtemp(prefix="ray-as-")
    token = Path(temp_dir) / "auth_token"
    token.write_text(secrets.token_hex(32))
    token.chmod(0o600)
    config = {
        "cluster_name": "skindual-test", "max_workers": 2, "upscaling_speed": 1.0, "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{gcs}"},
        "available_node_types": {"ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {},
                                                      "max_workers": 0}, **GPU_NODE_TYPES},
        "head_node_type": "ray.head.default",
        "docker": {}, "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False, "rsync_exclude": [],
        "rsync_filter": [], "auth": {"ssh_user": "skindual"},
    }
    config_path = Path(temp_dir) / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    marker = f"SKINDUAL_TEST_AUTOSCALING_CLUSTER={temp_dir}"
    ray_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    env = {k: v for k, v in base_env.items() if not k.startswith("RAY_")}
    env.update(ray_env, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1",
               SKINDUAL_TEST_AUTOSCALING_CLUSTER=temp_dir,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{base_env.get('PATH', '')}")
    ray = str(Path(sys.executable).parent / "ray")
    command = [ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", f"--num-cpus={head_cpus}",
               "--num-gpus=0", f"--autoscaling-config={config_path}", f"--temp-dir={temp_dir}",
               "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
               "--disable-usage-stats"]
    try:
        started = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield AutoscalingTestCluster(f"127.0.0.1:{gcs}", {**ray_env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}, temp_dir)
    finally:
        kill_marked(marker)
        shutil.rmtree(temp_dir, ignore_errors=True)
