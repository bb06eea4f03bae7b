"""cluster.yaml passes Ray's own autoscaler validation and keeps the settings the project relies on; the
jobs run as a user runs them on a cluster: `ray job submit --working-dir .` to a real two-node local
cluster (conftest `ray_test_cluster`), S3 credentials from the nodes' environment, outputs on SeaweedFS."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import yaml
from fixture_servers import RayTestCluster, ray_list
from ray.autoscaler._private.util import prepare_config, validate_config

from skindual.pairs import read_index
from skindual.prompts import CLASS_CODES
from skindual.shards import read_shards
from skindual.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "cluster.yaml"
RAY = str(Path(sys.executable).parent / "ray")
CLUSTER_TOKEN = "~/.skindual/ray-cluster-token"


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
        assert config[key][0] == "chmod 700 ~/.ray && chmod 600 ~/.ray/auth_token"  # before Ray reads it
    # the cluster's own token file (made 0600 by the README's command), not the launching machine's local one
    assert config["file_mounts"]["~/.ray/auth_token"] == CLUSTER_TOKEN
    assert "--dashboard-host=127.0.0.1" in " ".join(config["head_start_ray_commands"])


def test_cluster_yaml_is_closed_by_default():
    """As Ray's AWS bootstrap reads cluster.yaml: every node type has the one security group and an instance
    profile, so Ray creates neither (its group opens SSH to 0.0.0.0/0, its profile would be the head's for
    all), without a call to AWS; workers without public IPs, the worker role limited to the bucket prefix and
    the head's to this cluster's instances and the worker role; IMDSv2; every volume encrypted."""
    import copy

    from ray.autoscaler._private.aws.config import (_configure_from_network_interfaces, _configure_iam_role,
                                                     _configure_security_group)

    config = prepare_config(yaml.safe_load(CONFIG.read_text()))
    validate_config(config)
    config = _configure_from_network_interfaces(config)
    assert _configure_security_group(copy.deepcopy(config)) == config  # the groups are ours: none made
    assert _configure_iam_role(copy.deepcopy(config)) == config  # the head's profile is ours: none made
    types = {name: t["node_config"] for name, t in config["available_node_types"].items()}
    assert len({group for t in types.values() for group in t["SecurityGroupIds"]}) == 1
    assert config["provider"]["use_internal_ips"] and config["provider"]["use_external_head_ip"]
    public = {name: [i["AssociatePublicIpAddress"] for i in t["NetworkInterfaces"]] for name, t in types.items()}
    assert public == {name: [name == "head"] for name in types}
    profiles = {name: t["IamInstanceProfile"]["Arn"].rsplit("/", 1)[1] for name, t in types.items()}
    assert profiles == {name: "skindual-ray-head" if name == "head" else "skindual-ray-worker" for name in types}
    for name, t in types.items():
        assert t["MetadataOptions"]["HttpTokens"] == "required" and t["MetadataOptions"]["HttpPutResponseHopLimit"] == 1
        volumes = t["BlockDeviceMappings"]
        assert volumes and all(v["Ebs"]["Encrypted"] is True for v in volumes), name

    data = json.loads((ROOT / "deploy" / "s3-data-policy.json").read_text())["Statement"]
    assert {(a, s["Resource"]) for s in data for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])} == {
        *((a, "arn:aws:s3:::BUCKET/PREFIX/*") for a in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                                                        "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts")),
        ("s3:ListBucket", "arn:aws:s3:::BUCKET")}
    head = json.loads((ROOT / "deploy" / "head-autoscaler-policy.json").read_text())["Statement"]
    actions = {a for s in head for a in ([s["Action"]] if isinstance(s["Action"], str) else s["Action"])}
    assert not {a for a in actions if a.startswith("s3:") or a.endswith("*")}  # S3 through the data policy only
    (passing,) = [s for s in head if s["Action"] == "iam:PassRole"]
    assert passing["Resource"] == "arn:aws:iam::ACCOUNT:role/skindual-ray-worker"
    (ending,) = [s for s in head if "ec2:TerminateInstances" in s["Action"]]
    assert ending["Condition"] == {"StringEquals": {"ec2:ResourceTag/ray-cluster-name": config["cluster_name"]}}
    trust = json.loads((ROOT / "deploy" / "ec2-trust-policy.json").read_text())["Statement"]
    assert trust == [{"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]


def test_the_readme_sets_the_cluster_up_closed_and_submits_through_the_dashboard():
    """The README's one-time commands use every policy in deploy/, open SSH to the user's CIDR only, make the
    token 0600; jobs go through `ray dashboard` with the cluster's token; its lifecycle rule is deploy's."""
    readme = (ROOT / "README.md").read_text()
    for path in (ROOT / "deploy").glob("*.json"):
        assert f"file://deploy/{path.name}" in readme, path.name
    assert "--port 22 --cidr YOUR_CIDR" in readme and "UserIdGroupPairs=[{GroupId=$SG}]" in readme
    assert "(umask 077 && mkdir -p ~/.skindual && " in readme and f"> {CLUSTER_TOKEN})" in readme
    assert "ray dashboard cluster.yaml" in readme
    assert f"export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={CLUSTER_TOKEN}" in readme
    lifecycle = json.loads((ROOT / "deploy" / "s3-lifecycle.json").read_text())
    assert json.dumps(lifecycle) in readme
    (rule,) = lifecycle["Rules"]
    assert rule["Status"] == "Enabled" and rule["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] >= 1
    for text in (readme, CONFIG.read_text(), *(p.read_text() for p in (ROOT / "deploy").glob("*.json"))):
        assert "--cidr 0.0.0.0" not in text and "CidrIp" not in text  # no rule open to the internet


# --------------------------------------------------------------------------- jobs on a real two-node cluster

# a 4-step fine-tune of the demo base on the prepared real data (its mask channel barely trained)
FINETUNE = ["--steps", "4", "--checkpoint-every", "4", "--batch-size", "4", "--validation-per-class", "1",
            "--validation-steps", "2", "--lora-rank", "4", "--cpus-per-worker", "1"]
# 14 pairs in 3 shards from that adapter, 10 sampling steps; two actors of 1.5 CPUs cannot both fit on the
# head's 2 CPUs, so one runs on the worker node.  QC loosened: the barely trained masks are not the point.
GENERATE = ["--per-class", "2", "--samples-per-shard", "5", "--steps", "10", "--batch-size", "5", "--actors", "2",
            "--cpus-per-actor", "1.5", "--max-mask-area", "1.0", "--min-mask-area", "0", "--min-main-share", "0"]
# tiny evaluation (as test_evaluate's, 1 seed): 4 downstream tasks of 1 CPU, more than the head holds
EVALUATE = ["--feature-extractor", "lesion-cnn", "--extractor-steps", "10", "--size", "32", "--classifier", "small",
            "--steps", "6", "--batch-size", "8", "--seeds", "1", "--kid-subsets", "10", "--grid-per-class", "2"]
# what must never travel with --working-dir: the virtual environment, git history, the jobs' default outputs
NOT_UPLOADED = (".venv", ".git", "skindual-demo", "skindual-demo-run", "skindual-runs", "skindual-synthetic",
                "skindual-eval", "skindual-export", "skindual-real", "skindual-qc", "skindual-demo-hard")


def submit(cluster: RayTestCluster, submission_id: str, args: list[str], succeeds: bool = True) -> str:
    """`ray job submit --working-dir .` as a user runs it: no S3 credentials on the submitting side
    (the nodes have theirs), the cluster's token from RAY_AUTH_MODE/RAY_AUTH_TOKEN_PATH; the job's logs, once it
    ended as `succeeds` says.

    With --no-wait, then the job's status from Ray's job SDK every 0.2 s: the CLI's own wait tails the logs at a
    second a poll and ends about 5 s after the job (test_generate's overwrite through `ray job submit` waits as users
    do)."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    command = [RAY, "job", "submit", "--address", cluster.dashboard, "--submission-id", submission_id, "--no-wait",
               "--working-dir", ".", "--", "python", *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and f"Job '{submission_id}' submitted successfully" in result.stdout, (
        result.stdout[-4000:] + result.stderr[-3000:])
    # the token passed as the CLI sends it: this process's Ray read RAY_AUTH_MODE when it was first imported
    token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    client = JobSubmissionClient(cluster.dashboard, headers={"Authorization": f"Bearer {token}"})
    deadline = time.monotonic() + 500
    while not (status := client.get_job_status(submission_id)).is_terminal():
        assert time.monotonic() < deadline, f"{submission_id} still {status} after 500 s"
        time.sleep(0.2)
    logs = client.get_job_logs(submission_id)
    assert status == (JobStatus.SUCCEEDED if succeeds else JobStatus.FAILED), f"{submission_id} {status}: {logs[-6000:]}"
    return logs


def nodes_of_job(cluster: RayTestCluster, submission_id: str) -> set[str]:
    """The nodes on which the job's tasks and actor tasks ran (Ray's state API)."""
    (job,) = [j for j in ray_list(cluster, "jobs") if j["submission_id"] == submission_id]
    return {t["node_id"] for t in ray_list(cluster, "tasks", f"job_id={job['job_id']}") if t.get("node_id")}


def test_the_chain_runs_off_one_machine_with_the_real_data_only_on_s3(ray_test_cluster, s3_env, tmp_path):
    """prepare → finetune → generate → evaluate → export, each through `ray job submit --working-dir .` on
    the two-node cluster, the raw download and every output on S3 only (the local copy deleted first).  The base
    is SD-2's architecture (1/16 width) staged once on S3: the fine-tune and the two generator actors (one per
    node) fetch it once per node into the node's cache, whatever runs there."""
    from skindual.base_models import FETCH_RECORD, STAGED_CACHE, stage_base
    from skindual.demo import render
    from skindual.prompts import CLASSES
    from skindual.sd2 import save_sd2_pipeline

    cluster, run = ray_test_cluster, secrets.token_hex(4)
    alive = {n["node_id"]: n for n in ray_list(cluster, "nodes") if n["state"] == "ALIVE"}
    (worker,) = [node for node, n in alive.items() if not n["is_head_node"]]
    assert len(alive) == 2
    raw, real, runs = f"{s3_env}/raw/HAM10000", f"{s3_env}/real", f"{s3_env}/runs"
    synthetic, report, export = f"{s3_env}/synthetic", f"{s3_env}/eval", f"{s3_env}/export"
    folder = render.write_demo_dataset(tmp_path / "HAM10000", {c.code: 16 if c.code == "nv" else 8 for c in CLASSES},
                                          seed=11)
    storage = open_storage(raw)
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        storage.upload_file(path, path.relative_to(folder).as_posix())
    shutil.rmtree(folder)

    submit(cluster, f"prepare-{run}", ["jobs/prepare.py", "--ham10000", raw, "--samples-per-shard", "32",
                                       "--output", real])
    manifest = json.loads(open_storage(real).read_bytes("manifest.json"))
    assert manifest["totals"]["successes"] == 64 and set(manifest["totals"]["per_split"]) == {"train", "val", "test"}
    sources = read_index(real).column("source_image").to_pylist()
    assert len(sources) == 64 and all(s.startswith(raw + "/") for s in sources)  # read from S3, nowhere else

    base = f"{s3_env}/models/sd2-base"
    stage_base(str(save_sd2_pipeline(tmp_path / "sd2", "base", width=16)), base, dtype="fp16")
    shutil.rmtree(tmp_path / "sd2")
    submit(cluster, f"finetune-{run}", ["jobs/finetune.py", "--training-data", real, "--base-model", base,
                                        "--resolution", "64", "--output", runs, "--name", "v1", *FINETUNE])
    adapter = json.loads(open_storage(f"{runs}/v1/adapter").read_bytes("skindual_adapter.json"))
    assert set(adapter["prompt_attributes"]) == {c.code for c in CLASSES}  # the real train split's sites, ages, sexes
    assert adapter["base_model"] == base and adapter["resolution"] == 64

    generate_started = time.time()
    submit(cluster, f"generate-{run}", ["jobs/generate.py", *GENERATE, "--adapter", f"{runs}/v1/adapter",
                                        "--output", synthetic])
    assert nodes_of_job(cluster, f"generate-{run}") == set(alive)  # both nodes sampled from the staged base
    assert json.loads(open_storage(synthetic).read_bytes("manifest.json"))["resolved"]["base_model"].startswith(
        base + "@")  # named by its content
    copies = [p for cache in cluster.caches for p in Path(cache, STAGED_CACHE).glob("*") if p.is_dir()]
    assert len(copies) == 2 and len({p.name for p in copies}) == 1  # one copy per node, the same content
    records = [json.loads((p / FETCH_RECORD).read_text()) for p in copies]
    assert all(r["url"] == base for r in records)
    # the fine-tune worker's node fetched it during the fine-tune, and that node's generator actor used its copy;
    # the other node fetched it once, for its actor
    assert sorted(r["time"] < generate_started for r in records) == [False, True]
    storage = open_storage(synthetic)
    assert sorted(n for n in storage.list() if n.endswith(".tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    assert json.loads(storage.read_bytes("sizes.json")) == {"00000.tar": 5, "00001.tar": 5, "00002.tar": 4}
    counts: dict[str, int] = {}
    for sample in read_shards(synthetic):
        counts[sample["meta"]["class_code"]] = counts.get(sample["meta"]["class_code"], 0) + 1
    assert counts == {code: 2 for code in CLASS_CODES}

    submit(cluster, f"evaluate-{run}", ["jobs/evaluate.py", "--real", real, "--synthetic", synthetic,
                                        "--output", report, *EVALUATE])
    assert worker in nodes_of_job(cluster, f"evaluate-{run}")
    storage = open_storage(report)
    assert {"report.md", "metrics.json", "downstream.png"} <= set(storage.list())
    assert storage.read_bytes("report.md").decode().startswith("# SkinDualGen evaluation")
    metrics = json.loads(storage.read_bytes("metrics.json"))
    assert metrics["counts"]["synthetic"] == {code: 2 for code in CLASS_CODES}
    assert metrics["config"]["synthetic"] == synthetic and metrics["fidelity"]["fd_name"] == "FD_lesioncnn"
    assert len(metrics["downstream"]["results"]) == 4  # (arm, model) × 1 seed

    submit(cluster, f"export-{run}", ["jobs/export.py", "--synthetic", synthetic, "--with-real", real,
                                      "--output", export])
    summary = json.loads(open_storage(export).read_bytes("export.json"))
    splits = manifest["totals"]["per_split"]
    assert summary["counts"] == {"synthetic_train": 14, "real_train": sum(splits["train"].values()),
                                 "real_test": sum(splits["test"].values())}

    # the working dir each node unpacked: the project's sources, nothing ignored by .gitignore / .rayignore
    for temp_dir in cluster.temp_dirs:
        unpacked = Path(temp_dir).glob("session_*/runtime_resources/working_dir_files/_ray_pkg_*")
        packages = {p.resolve() for p in unpacked if p.is_dir()}  # not the .zip (or its lock) beside it
        assert packages, f"no working dir unpacked under {temp_dir}"
        for package in packages:
            files = [p.relative_to(package) for p in package.rglob("*") if p.is_file()]
            needed = ("jobs/generate.py", "skindual/evaluate.py", "skindual/assets/demo_base.safetensors")
            assert {Path(name) for name in needed} <= set(files)
            # (Ray keeps an ignored folder's empty directory entry: `.venv/` matches what is in it, not it)
            assert not [f for f in files if f.parts[0] in NOT_UPLOADED]
            assert sum((package / f).stat().st_size for f in files) < 30e6


def test_gitignore_covers_every_jobs_default_output():
    from skindual.demo.chain import DemoConfig
    from skindual.evaluate_plan import EvaluateConfig
    from skindual.export import ExportConfig
    from skindual.finetune_config import FinetuneConfig
    from skindual.generate_config import GenerateConfig
    from skindual.prepare import PrepareConfig
    from skindual.qc_model import QCModelConfig

    ignored = set((ROOT / ".gitignore").read_text().split())
    defaults = {c().output for c in (DemoConfig, EvaluateConfig, ExportConfig, FinetuneConfig, GenerateConfig,
                                     QCModelConfig)} | {PrepareConfig(ham10000="x").output}
    assert defaults | {"skindual-demo", "skindual-demo-hard"} <= set(NOT_UPLOADED)  # jobs/build_demo.py's outputs too
    assert {f"/{name}/" for name in NOT_UPLOADED if name not in (".venv", ".git")} <= ignored
    assert ".venv/" in ignored and ".git/" in (ROOT / ".rayignore").read_text().split()


def listening_addresses(cluster: RayTestCluster) -> set[str]:
    """The addresses the cluster's processes (both nodes', found by their marker) listen on."""
    import ipaddress

    marker, inodes = f"SKINDUAL_TEST_RAY_CLUSTER={cluster.temp_dirs[0]}".encode(), set()
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and marker in (proc / "environ").read_bytes().split(b"\0"):
                inodes |= {link[8:-1] for link in (os.readlink(fd) for fd in (proc / "fd").iterdir())
                           if link.startswith("socket:[")}
        except OSError:
            pass
    addresses = set()
    for table in ("tcp", "tcp6"):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            local, state, inode = line.split()[1], line.split()[3], line.split()[9]
            if state == "0A" and inode in inodes:  # LISTEN
                raw = bytes.fromhex(local.split(":")[0])
                raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))  # per 32-bit word, host order
                ip = ipaddress.ip_address(raw)
                addresses.add(str(getattr(ip, "ipv4_mapped", None) or ip))
    return addresses


def test_the_test_cluster_has_two_nodes_listening_on_127_0_0_1_only(ray_test_cluster):
    nodes = [n for n in ray_list(ray_test_cluster, "nodes") if n["state"] == "ALIVE"]
    assert sorted(n["is_head_node"] for n in nodes) == [False, True]
    assert {n["node_ip"] for n in nodes} == {"127.0.0.1"}
    assert listening_addresses(ray_test_cluster) == {"127.0.0.1"}


def test_node_local_outputs_are_refused_on_the_two_node_cluster(ray_test_cluster, demo_real, eval_world, tmp_path):
    """Without a shared file system (SKINDUAL_SHARED_FS unset), every job refuses a local --output in one line
    before any work: on a real cluster of several nodes it would exist on one of them only."""
    env = {k: v for k, v in os.environ.items() if k != "SKINDUAL_SHARED_FS"} | {"RAY_ADDRESS": ray_test_cluster.address}
    out = str(tmp_path / "out")
    jobs = {"finetune": ["--training-data", str(demo_real)], "qc_model": ["--training-data", str(demo_real)],
            "generate": ["--per-class", "1"], "prepare": ["--ham10000", str(eval_world["root"] / "data")],
            "evaluate": ["--real", eval_world["real"], "--synthetic", eval_world["synthetic"],
                         "--feature-extractor", "lesion-cnn"]}

    def refuse(job: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, f"jobs/{job}.py", *jobs[job], "--output", out], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)

    with ThreadPoolExecutor(len(jobs)) as pool:  # side by side: each leaves CPU idle while Ray answers
        runs = dict(zip(jobs, pool.map(refuse, jobs)))
    for job, run in runs.items():
        assert run.returncode == 2, (job, run.stderr[-3000:])
        assert run.stderr.strip().splitlines()[-1] == (
            f"error: --output {out}: a local path, on a cluster of 2 nodes, so it exists on one node only; use "
            "s3://BUCKET/... (or, if every node mounts it, list its folder in SKINDUAL_SHARED_FS)"), (job, run.stderr[-3000:])
        assert not Path(out).exists(), job  # refused before anything was written


def test_a_relative_output_in_rays_copy_of_the_working_dir_is_refused(ray_test_cluster):
    logs = submit(ray_test_cluster, f"relative-{secrets.token_hex(4)}",
                  ["jobs/generate.py", "--per-class", "1", "--output", "relative-out"], succeeds=False)
    assert "error: --output relative-out: a relative path, and this job runs in Ray's copy of the working dir" in logs, (
        logs[-3000:])


def pinned_versions() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, pinned = line.partition("==")
            assert pinned, f"constraints.txt: {line!r} is not pinned with =="
            pins[canonicalize_name(name)] = pinned.strip()
    return pins


def test_the_readme_ci_and_cluster_yaml_install_the_one_pinned_set_that_is_tested():
    from importlib.metadata import PackageNotFoundError, version

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    pins = pinned_versions()
    assert {"torch", "torchvision", "ray", "diffusers", "transformers", "peft", "webdataset"} <= set(pins)
    # this very environment is the pinned set (the README's test command installed it)
    wrong = {}
    for name, pinned in pins.items():
        try:
            if version(name) != pinned:
                wrong[name] = (version(name), pinned)
        except PackageNotFoundError:
            wrong[name] = (None, pinned)
    assert not wrong, wrong
    # the README's two commands and CI install with it
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if line.startswith("python3 -m venv .venv")]
    assert len(commands) == 2 and all("pip install -c constraints.txt" in c for c in commands)
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
    # cluster.yaml: the file travels to every node, and every package install is constrained by it
    config = yaml.safe_load(CONFIG.read_text())
    assert config["file_mounts"]["~/skindual-constraints.txt"] == "./constraints.txt"
    installs = [c for c in config["setup_commands"] if "pip install" in c and "-U" not in c.split("pip install")[1][:4]]
    assert installs and all("-c ~/skindual-constraints.txt" in c for c in installs)
    installed = set()
    for command in installs:
        for word in command.split("pip install", 1)[1].split():
            if not word.startswith("-") and word != "~/skindual-constraints.txt":
                name = canonicalize_name(Requirement(word.strip('"')).name)
                assert name in pins, f"cluster.yaml installs {name}, which constraints.txt does not pin"
                installed.add(name)
    import tomllib

    needed = {canonicalize_name(Requirement(d).name)
              for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    assert needed <= installed, f"cluster.yaml does not install {needed - installed}"
    assert any("python3.11-venv" in c for c in config["setup_commands"])  # Ubuntu's image lacks venv


def test_the_readme_recipe_fits_cluster_yaml_before_any_gpu_node_runs():
    """cluster.yaml as the autoscaler reads it, with only its CPU head running: "auto" asks for a GPU, generation
    needs --accelerator-type (three GPU models), and the README's fine-tune fits the smallest of them."""
    from skindual.cluster import NodeShape, check_accelerator, node_types, resolve_gpus, shape_of
    from skindual.finetune import check_memory, step_memory_gb
    from skindual.finetune_config import FinetuneConfig

    shape = shape_of((NodeShape("running:head", {"CPU": 8.0}, 1),), node_types(yaml.safe_load(CONFIG.read_text())))
    assert shape.autoscaler == "known" and shape.multi_node and shape.accelerator_types() == ["A10G", "H100", "L4"]
    assert resolve_gpus(-1, "--num-gpus-per-actor", shape) == 1.0
    assert check_accelerator("A10G", 1, shape, require_one=True) == "A10G"
    readme = FinetuneConfig(use_gpu=True, batch_size=4, num_workers=8, accelerator_type="A10G")
    check_memory(readme, [320, 640, 1280, 1280], 512, "A10G")
    assert step_memory_gb(FinetuneConfig(use_gpu=True), [320, 640, 1280, 1280], 512) < 24  # the defaults too


# --------------------------------------------------------------------------- the quick start's embedded cluster


def test_a_quiet_job_forwards_skindual_lines_and_worker_errors_of_a_batch():
    """One batch of a worker's output each (as Ray forwards them): skindual's lines and errors with their
    indented lines are shown; chatter, Ray's known noise and a user error's traceback are not."""
    from skindual.cli import OUR_LINE
    from skindual.cluster import forwarded_lines

    ours = re.compile(OUR_LINE)
    batch = ["2026-01-02 03:04:05,006 INFO skindual.generate: shard 00000 written", "Loading weights 100%",
             "WARNING a_library: deprecated", "[2026-01-02 03:04:05,006 E 12 34] core_worker.cc:2465: Actor with class "
             "name: 'X' has constructor arguments in the object store and max_restarts > 0.",
             "ERROR a_library: the collective failed", "Traceback (most recent call last):",
             '  File "x.py", line 3, in f', "    g()", "torch.distributed.DistBackendError: NCCL error in: x.cpp:1",
             "", "after the traceback", "misc/socket.cc:50 NCCL WARN socketProgress: Connection closed by remote peer",
             "[rank0]:[E102 03:04:05.006 ProcessGroupNCCL.cpp:616] Watchdog caught collective operation timeout"]
    assert forwarded_lines(batch, ours) == [batch[0], *batch[4:9], *batch[11:]]
    crash = ["*** SIGSEGV received at time=1 on cpu 0 ***", "Fatal Python error: Segmentation fault", "",
             "Stack (most recent call first):", '  File "x.py", line 3 in crash', "", "Extension modules: numpy"]
    assert forwarded_lines(crash, ours) == crash[:5]
    refused = ["Exception raised in creation task: The actor died because of an error raised in its creation task",
               '  File "skindual/generate.py", line 3, in __init__', "skindual.errors.UserError: --adapter x: missing",
               "2026-01-02 03:04:05,006 INFO skindual.generate: actor ready"]
    assert forwarded_lines(refused, ours) == refused[3:]


def test_a_quiet_job_shows_the_raylets_notes_but_not_its_count_of_started_workers():
    from skindual.cluster import raylet_notes

    notes = ["WARNING: 8 PYTHON worker processes have been started on node: e133 with address: 127.0.0.1, which is 4x "
             "the maximum expected startup concurrency (2). This could be a result of using a large number of actors, "
             "or due to tasks blocked in ray.get() calls (see https://github.com/ray-project/ray/issues/3644 for some "
             "discussion of workarounds).",
             "Task was killed due to the node running low on memory.", "Memory on the node (IP: 127.0.0.1) was 23 GB"]
    assert raylet_notes(notes) == notes[1:]


def test_init_ray_keeps_a_local_ray_on_127_0_0_1_also_when_ray_was_imported_first():
    """Ray reads RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when first imported; a caller that imported it before
    `init_ray` (without the variable) still gets a local cluster on 127.0.0.1, and a remote one is Ray's."""
    probe = ("import ray, sys; from ray._private.services import get_node_ip_address as ip; "
             "from skindual.cluster import _loopback_ray\nprint(ip())\n"
             "for address in sys.argv[1:]: _loopback_ray(address); print(ip())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    for addresses in (["10.0.0.5:6379", "127.0.0.1:6379"], [""]):  # a remote one first: it changes nothing
        run = subprocess.run([sys.executable, "-c", probe, *addresses], env=env, capture_output=True, text=True,
                             timeout=120)
        before, *after = run.stdout.split()
        assert before != "127.0.0.1", run.stdout + run.stderr[-2000:]
        assert after == [before] * (len(addresses) - 1) + ["127.0.0.1"], (addresses, run.stdout, run.stderr[-2000:])




@pytest.fixture(scope="module")
def quick_start_driver(tmp_path_factory, ray_test_cluster) -> tuple[Path, subprocess.CompletedProcess]:
    """tests/local_ray_driver.py run as the quick start runs a job: its own embedded Ray cluster, in an
    environment without RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER (nor any other RAY_ variable), a fresh HOME (where
    Ray finds or writes its token), beside another Ray instance on the machine (the shared test cluster); its
    workers fail at the end."""
    home = tmp_path_factory.mktemp("home")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")} | {"HOME": str(home),
                                                                                "PYTHONUNBUFFERED": "1"}
    run = subprocess.run([sys.executable, str(ROOT / "tests" / "local_ray_driver.py")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    return home, run


@pytest.mark.slow
def test_the_quick_starts_ray_listens_on_127_0_0_1_only_and_its_token_is_private(quick_start_driver):
    home, run = quick_start_driver
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("listeners: ")]
    assert json.loads(line.removeprefix("listeners: ")) == ["127.0.0.1"], run.stdout[-3000:] + run.stderr[-3000:]
    token = home / ".ray" / "auth_token"
    assert len(token.read_text().strip()) == 64 and token.stat().st_mode & 0o777 == 0o600


@pytest.mark.slow
def test_the_quick_starts_workers_find_their_own_cluster_beside_another(quick_start_driver):
    """A worker that looks its cluster up without an address (Ray Train's placement-group cleaner does, through
    the state API) finds the job's embedded cluster, though another Ray instance runs on the machine: unrecorded,
    the embedded one used to make that lookup fail, and the cleaner's traceback reached the job's output."""
    _, run = quick_start_driver
    (line,) = [line for line in run.stdout.splitlines() if line.startswith("clusters: ")]
    own, seen = json.loads(line.removeprefix("clusters: "))
    assert own.startswith("127.0.0.1:") and seen == own, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Found multiple active Ray instances" not in run.stdout + run.stderr


@pytest.mark.slow
def test_a_quiet_job_shows_its_workers_errors_but_not_their_chatter(quick_start_driver):
    """Without --verbose a job shows skindual's lines of its workers and their errors (a library's error with
    its traceback, an NCCL error, a crash's report and stack), not the rest, and not the traceback of a
    user error raised in a worker (the job says that in one line)."""
    from local_ray_driver import CHATTER

    _, run = quick_start_driver
    output = run.stdout + run.stderr
    assert run.returncode == 1 and "ActorDiedError" in run.stderr, output[-3000:]  # the job failed on the crash
    worker = {re.sub(r"^.*?pid=\d+\)(?:\x1b\[0m)?", "", line).strip() for line in output.splitlines() if "pid=" in line}
    assert any(line.endswith("INFO skindual.driver: a worker's own progress line") for line in worker)
    assert "NCCL WARN socketProgress: Connection closed by remote peer" in worker
    assert {"ERROR a_library: the worker's collective failed", "Traceback (most recent call last):",
            "RuntimeError: collective timed out in the worker"} <= worker
    assert any(line.startswith('File "') and line.endswith("in failing_task") for line in worker)
    assert "Fatal Python error: Segmentation fault" in worker and any(line.endswith(" in crash") for line in worker)
    assert CHATTER not in output and "refused inside an actor" not in output
    assert "Autoscaler status" not in output


def test_a_cluster_the_driver_cannot_join_is_one_line(ray_test_cluster, demo_real, tmp_path):
    """RAY_ADDRESS where no cluster answers, or a cluster with token authentication joined without
    RAY_AUTH_MODE=token: one line naming RAY_ADDRESS and what to do, not the traceback of Ray's retries, and nothing
    written.  Ray's own settings cut its wait (by default up to 20 tries of the GCS client, each up to 30 s): where
    nothing listens, one try of 2 s; at the cluster, which refuses a driver without a token at once, 3 tries, each
    given 10 s, so that a busy machine's slow answer is not taken for no answer."""
    from job_runs import error_line, run_job
    from s3server import _free_ports

    (port,) = _free_ports(1)
    out = tmp_path / "qc"
    nothing = {"RAY_gcs_server_port_wait_time_s": "1", "RAY_py_gcs_connect_timeout_s": "2",
               "RAY_gcs_rpc_server_connect_timeout_s": "1"}
    refusing = {"RAY_gcs_server_port_wait_time_s": "3", "RAY_py_gcs_connect_timeout_s": "10",
                "RAY_AUTH_MODE": "disabled"}
    cases = {f"127.0.0.1:{port}": (nothing, "no Ray cluster answered there; start it (`ray start --head`)"),
             ray_test_cluster.address: (refusing, "that cluster runs with token authentication and refused this "
                                                  "driver; set RAY_AUTH_MODE=token")}

    def join(address: str) -> subprocess.CompletedProcess:
        return run_job("qc_model", ["--training-data", str(demo_real), "--steps", "1", "--output", str(out)], address,
                       timeout=180, **cases[address][0])

    with ThreadPoolExecutor(len(cases)) as pool:
        results = dict(zip(cases, pool.map(join, cases)))
    for address, (_, said) in cases.items():
        assert error_line(results[address]).startswith(f"error: RAY_ADDRESS {address}: {said}"), address
    assert not out.exists()
