"""skindual.cluster: what a cluster has and can launch, GPU requests resolved from it, outputs that must not
be node-local.  Pure parts first, then on a real Ray cluster that autoscales from zero (fake) GPU nodes
(conftest `autoscaling_cluster`: the shape of cluster.yaml), where the jobs ask for GPUs and the
autoscaler launches them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import job_runs as jobs
from skindual.cluster import (SHARED_FS_ENV, ClusterShape, NodeShape, check_accelerator, check_shared_paths,
                              resolve_gpus)
from skindual.errors import UserError, user_error_in

ROOT = Path(__file__).resolve().parents[1]
HEAD = NodeShape("running:127.0.0.1", {"CPU": 8.0}, 1)
A10G = NodeShape("gpu_a10g", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:A10G": 1.0}, 32)
L4 = NodeShape("gpu_l4", {"CPU": 8.0, "GPU": 1.0, "accelerator_type:L4": 1.0}, 32)
AUTOSCALING = ClusterShape((HEAD,), (NodeShape("head", {}, 0), A10G, L4), "known")  # cluster.yaml, no GPU node yet
FIXED = ClusterShape((HEAD,), (), "none")  # a `ray start` machine or an embedded cluster
BLIND = ClusterShape((HEAD,), (), "unknown")  # an autoscaler whose node types cannot be read


# --------------------------------------------------------------------------- pure parts


def test_auto_gpus_come_from_what_the_autoscaler_can_launch_not_from_what_runs():
    assert resolve_gpus(-1, "--num-gpus-per-actor", AUTOSCALING) == 1.0  # no GPU runs yet: still 1
    assert resolve_gpus(-1, "--num-gpus-per-actor", FIXED) == 0.0
    assert resolve_gpus(0.5, "--num-gpus-per-actor", AUTOSCALING) == 0.5
    with pytest.raises(UserError, match=r"^--num-gpus-per-actor -1 \(auto\): .*give --num-gpus-per-actor 1"):
        resolve_gpus(-1, "--num-gpus-per-actor", BLIND)
    with pytest.raises(UserError, match=r"^--num-gpus-per-task 2: no node of this cluster has or can launch 2"):
        resolve_gpus(2, "--num-gpus-per-task", AUTOSCALING)
    assert AUTOSCALING.can_grow and AUTOSCALING.multi_node and not FIXED.multi_node and BLIND.multi_node


def test_accelerator_type_is_checked_and_required_where_models_differ():
    assert check_accelerator("L4", 1, AUTOSCALING) == "L4"
    with pytest.raises(UserError, match=r"^--accelerator-type V100: this cluster has or can launch A10G, L4 only"):
        check_accelerator("V100", 1, AUTOSCALING)
    with pytest.raises(UserError, match=r"several models \(A10G, L4\).*--accelerator-type"):
        check_accelerator("", 1, AUTOSCALING, require_one=True)
    one_model = ClusterShape((HEAD,), (A10G,), "known")
    assert check_accelerator("", 1, one_model, require_one=True) == "A10G"
    assert check_accelerator("", 0, AUTOSCALING, require_one=True) == ""


def test_local_paths_are_refused_where_they_would_be_node_local(monkeypatch, tmp_path):
    monkeypatch.delenv(SHARED_FS_ENV, raising=False)
    check_shared_paths({"--output": str(tmp_path)}, FIXED)  # one node and no autoscaler: fine
    check_shared_paths({"--output": "s3://bucket/run", "--adapter": ""}, AUTOSCALING)
    with pytest.raises(UserError, match=rf"^--output {tmp_path}: a local path, on a cluster of 1 node and an "
                                        "autoscaler that adds more.*s3://"):
        check_shared_paths({"--output": str(tmp_path)}, AUTOSCALING)
    monkeypatch.setenv(SHARED_FS_ENV, f"/elsewhere:{tmp_path.parent}")
    check_shared_paths({"--output": str(tmp_path / "run")}, AUTOSCALING)  # under a folder declared shared
    # inside Ray's copy of a --working-dir, a relative path would be deleted with the job's copy
    copy = tmp_path / "session_1" / "runtime_resources" / "working_dir_files" / "_ray_pkg_1"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    with pytest.raises(UserError, match=r"^--output skindual-synthetic: a relative path, and this job runs in Ray's "
                                        "copy of the working dir"):
        check_shared_paths({"--output": "skindual-synthetic"}, FIXED)


def test_a_user_error_raised_on_a_ray_worker_is_found_in_what_reaches_the_driver():
    wrapped = RuntimeError("The actor died because of an error raised in its creation task\nTraceback (most recent "
                           "call last):\n  File \"x.py\", line 1\nskindual.errors.UserError: --adapter x: missing\n")
    assert str(user_error_in(wrapped)) == "--adapter x: missing"
    try:
        try:
            raise UserError("inner")
        except UserError as exc:
            raise RuntimeError("outer") from exc
    except RuntimeError as exc:
        assert str(user_error_in(exc)) == "inner"
    assert user_error_in(ValueError("a bug")) is None


# --------------------------------------------------------------------------- a cluster that autoscales from zero GPUs


def run_python(code: str, env: dict[str, str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=timeout)


def printed_json(run: subprocess.CompletedProcess):
    """The JSON line the code printed; the driver's stdout also carries the autoscaler's events
    ("(autoscaler +4s) Resized to 4 CPUs, 2 GPUs."), which can come after it."""
    found = [line for line in run.stdout.splitlines() if line.startswith(("{", "["))]
    assert found, run.stdout[-2000:] + run.stderr[-2000:]
    return json.loads(found[-1])


def run_job(job: str, args: list[str], env: dict[str, str], timeout: int = 400) -> subprocess.CompletedProcess:
    """A job connected to the autoscaling cluster (`env`: its address and token, and any other variables)."""
    return jobs.run_job(job, args, env.get("RAY_ADDRESS"), timeout=timeout, **env)


def test_the_shape_of_a_cluster_that_autoscales_from_zero_gpu_nodes(autoscaling_cluster):
    code = ("import json, dataclasses; from skindual.cluster import init_ray, cluster_shape, resolve_gpus; init_ray(); "
            "s = cluster_shape(); print(json.dumps({'shape': dataclasses.asdict(s), 'most': s.most('GPU'), "
            "'types': s.accelerator_types(), 'grow': s.can_grow, 'auto': resolve_gpus(-1, 'x', s)}))")
    run = run_python(code, autoscaling_cluster.env)
    assert run.returncode == 0, run.stderr[-3000:]
    found = printed_json(run)
    assert found["shape"]["autoscaler"] == "known" and found["grow"]
    assert all(node["resources"].get("GPU", 0) == 0 for node in found["shape"]["running"])  # no GPU node runs
    assert found["most"] == 1 and found["types"] == ["A10G", "L4"] and found["auto"] == 1


def test_generate_asks_for_gpus_and_the_autoscaler_launches_a_node_of_the_model(autoscaling_cluster, skindual_cache):
    env = {**autoscaling_cluster.env, SHARED_FS_ENV: "/", "SKINDUAL_CACHE": skindual_cache}
    args = ["--per-class", "1", "--classes", "df", "--steps", "2", "--output", f"{autoscaling_cluster.temp_dir}/out"]
    refused = run_job("generate", args, env)  # two GPU models and no --accelerator-type: bytes would mix
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1].startswith("error: this cluster has GPUs of several models (A10G, L4)")
    # with --accelerator-type L4 the actor asks for an L4 GPU: the autoscaler launches an L4 node and the actor
    # lands there; its GPU is fake (this machine has no CUDA), which the actor reports as one line
    run = run_job("generate", [*args, "--accelerator-type", "L4"], env)
    assert run.returncode == 2, run.stdout[-2000:] + run.stderr[-3000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: a generator actor was given GPU(s)") and "CUDA is unusable there" in last
    nodes = run_python("import ray, json; ray.init(); print(json.dumps([n['Resources'] for n in ray.nodes()]))",
                       autoscaling_cluster.env)
    resources = printed_json(nodes)
    assert any(r.get("accelerator_type:L4") == 1 and r.get("GPU") == 1 for r in resources), resources


def test_fine_tuning_on_it_refuses_node_local_outputs_and_unknown_gpu_models(autoscaling_cluster, demo_real, tmp_path):
    env = {**autoscaling_cluster.env, SHARED_FS_ENV: ""}
    run = run_job("finetune", ["--training-data", str(demo_real), "--output", str(tmp_path / "runs")], env)
    last = run.stderr.strip().splitlines()[-1]
    assert run.returncode == 2 and last.startswith(f"error: --output {tmp_path / 'runs'}: a local path, on a cluster of ")
    assert last.endswith(f"and an autoscaler that adds more, so it exists on one node only; use s3://BUCKET/... (or, "
                         f"if every node mounts it, list its folder in {SHARED_FS_ENV})"), run.stderr[-3000:]
    run = run_job("finetune", ["--training-data", str(demo_real), "--output", str(tmp_path / "runs"), "--use-gpu",
                               "--accelerator-type", "V100"], {**env, SHARED_FS_ENV: "/"})
    assert run.returncode == 2 and run.stderr.strip().splitlines()[-1] == (
        "error: --accelerator-type V100: this cluster has or can launch A10G, L4 only; choose one of them")


def test_a_task_without_a_reserved_gpu_computes_on_the_cpu_even_on_a_gpu_node(autoscaling_cluster):
    code = """
import json, ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from skindual.cluster import reserved_device
ray.init()

@ray.remote(num_gpus=1, accelerator_type="A10G")
def with_gpu():
    return reserved_device(), ray.get_runtime_context().get_node_id()

@ray.remote(num_gpus=0)
def without_gpu():
    return reserved_device()

device, node = ray.get(with_gpu.remote(), timeout=120)
pinned = without_gpu.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
print(json.dumps([device, ray.get(pinned.remote(), timeout=60)]))
"""
    run = run_python(code, autoscaling_cluster.env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert printed_json(run) == ["cuda", "cpu"]


def test_no_stage_picks_its_device_from_what_cuda_shows():
    """A task's device is what Ray reserved for it (`cluster.reserved_device`, the actors' GPU count), never
    ``"cuda" if torch.cuda.is_available()``, which is true for every process on a GPU node."""
    import re

    pattern = re.compile(r"""["']cuda["'] if [\w.]*cuda\.is_available\(\)""")
    offenders = [f"{path.name}:{n}" for path in sorted((ROOT / "skindual").glob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders, offenders
