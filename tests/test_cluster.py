"""cluster.yaml passes Ray's own autoscaler validation and keeps the settings the project relies on."""

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

CONFIG = Path(__file__).resolve().parents[1] / "cluster.yaml"


def test_cluster_yaml_validates_with_rays_schema():
    config = prepare_config(yaml.safe_load(CONFIG.read_text()))
    validate_config(config)
    types = config["available_node_types"]
    gpu_types = [name for name in types if name.startswith("gpu_")]
    assert config["head_node_type"] == "head" and len(gpu_types) >= 2
    assert all(types[name]["min_workers"] == 0 and types[name]["max_workers"] > 0 for name in gpu_types)
    assert any(types[n]["node_config"].get("InstanceMarketOptions", {}).get("MarketType") == "spot" for n in gpu_types)
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 by instance profile


def test_cluster_starts_ray_with_token_auth_from_the_project_venv():
    config = yaml.safe_load(CONFIG.read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = [c for c in config[key] if "ray start" in c]
        assert start and all("RAY_AUTH_MODE=token" in c and "skindual-venv/bin:$PATH" in c for c in start)
    assert "~/.ray/auth_token" in config["file_mounts"]
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])
