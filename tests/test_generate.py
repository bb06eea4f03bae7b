"""skindual's generation modules and jobs/generate.py: quality-control redraws (pure), then the REAL job on a real
local Ray cluster (conftest `ray_cluster`) with the demo base, writing to a folder and to SeaweedFS."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fixture_data import card_table, read_card, shard_snapshot
from job_runs import ok, run_job, start_job
from skindual import generate, generate_actors, generate_model
from skindual.card import RECIPES
from skindual.cli import OUR_LINE
from skindual.cluster import this_machine
from skindual.errors import UserError
from skindual.generate_config import GenerateConfig
from skindual.pairs import read_index
from skindual.preview import draw_preview
from skindual.prompts import build_prompt, prompt_table, row_seed
from skindual.qc_model import Judgement
from skindual.quality import MaskLimits
from skindual.redraw import generate_samples
from skindual.shard_format import Sample, encode_sample
from skindual.shard_store import write_shard
from skindual.shards import read_shards, shard_urls
from skindual.storage import LocalStorage, Storage, open_storage

ROOT = Path(__file__).resolve().parents[1]

# 9 pairs in 5 shards of 2 (the last holds 1): big enough to interrupt, small to run.  Without the
# demo adapter (not shipped yet) the bare demo base's mask channel is untrained and its masks are
# near full-frame, so QC is loosened here; the redraw logic is tested with a fake generator.
ASKED = {"df": 3, "nv": 3, "vasc": 3}
JOB_ARGS = ["--per-class", "3", "--classes", "vasc,df,nv", "--samples-per-shard", "2", "--steps", "10",
            "--batch-size", "2", "--seed", "7", "--max-mask-area", "1.0"]
SHARDS = 5

# --------------------------------------------------------------------------- pure parts


def test_config_errors_name_the_flag():
    for kwargs, flag in [({"per_class": "df=x"}, "--per-class"), ({"per_class": "mel=2", "classes": "df"}, "--classes"),
                         ({"batch_size": 0}, "--batch-size"), ({"max_attempts": 0}, "--max-attempts"),
                         ({"min_mask_area": 0.5, "max_mask_area": 0.4}, "--max-mask-area"),
                         ({"samples_per_shard": -1}, "--samples-per-shard"), ({"mask_smoothing": -1}, "--mask-smoothing")]:
        with pytest.raises(UserError, match=flag):
            GenerateConfig(**kwargs)
    assert GenerateConfig(per_class="df=5,vasc=4").counts() == {"df": 5, "vasc": 4}


def test_a_ctrl_c_that_a_library_swallowed_still_stops_the_job(capsys):
    """A Ctrl-C during generate's setup once vanished and the run went on to its end (most likely swallowed inside
    Ray's core worker, which checks for signals in its blocking calls). `run_job` records every SIGINT; the job
    stops at its next `check_interrupt`, or `run_job` says so when the job returns: one line, status 130."""
    from skindual.cli import check_interrupt
    from skindual.cli import run_job as run_entry

    reached = []

    def main(_config):
        try:  # a library that swallows the KeyboardInterrupt its own signal check raised
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
        except KeyboardInterrupt:
            reached.append("swallowed")
        reached.append("after the library call")
        check_interrupt()
        reached.append("past the check")

    before = signal.getsignal(signal.SIGINT)
    assert run_entry(main, GenerateConfig, "test", []) == 130
    assert reached == ["swallowed", "after the library call"]
    assert capsys.readouterr().err.strip().splitlines()[-1] == "interrupted; run the same command again to resume"
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler is back
    assert run_entry(lambda _config: check_interrupt(), GenerateConfig, "test", []) == 0  # a new run starts clean

    def unchecked(_config):  # swallowed where no stage checks: the job still does not end in status 0
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
        except KeyboardInterrupt:
            reached.append("swallowed again")

    assert run_entry(unchecked, GenerateConfig, "test", []) == 130
    assert reached[-1] == "swallowed again"


def test_the_default_split_keeps_every_actor_busy_to_the_end():
    # the mission's run: 35,000 pairs on 16 actors; 1,000-pair shards would be 3 waves, the last with 3 busy actors
    size = generate.auto_samples_per_shard(35_000, 16)
    sizes = [len(s) for s in np.array_split(np.arange(35_000), -(-35_000 // size))]
    assert size <= generate.SHARD_PAIRS and len(sizes) % 16 == 0 and sum(sizes) == 35_000
    assert generate.busy_share([size] * (35_000 // size) + [35_000 % size], 16) >= 0.95
    assert generate.busy_share([1000] * 35, 16) == pytest.approx(35 / 48)
    assert generate.auto_samples_per_shard(700, 1) == 700 and generate.auto_samples_per_shard(5, 16) == 1
    table = prompt_table({"df": 17_500, "nv": 17_500}, seed=0, samples_per_shard=size)
    assert table.num_rows == 35_000 and max(table.column("shard").to_pylist()) + 1 == len(sizes)


def disc(size: int, radius: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    return (((yy - size / 2) ** 2 + (xx - size / 2) ** 2) < radius**2).astype(np.uint8)


class FakeGenerator:
    """A generator whose masks fail QC as scripted: (row id, attempt) → "empty" / "full-frame"."""

    def __init__(self, rows, run_seed: int, failing: dict[tuple[int, int], str], size: int = 16):
        self.by_seed = {}
        for r in rows:
            for attempt in range(8):
                self.by_seed[row_seed(run_seed, r["row_id"], attempt)] = (r["row_id"], attempt)
        self.failing, self.size, self.calls = failing, size, []

    def __call__(self, rows, seeds):
        self.calls.append([self.by_seed[s] for s in seeds])
        masks, images = [], []
        for s in seeds:
            kind = self.failing.get(self.by_seed[s])
            masks.append({"empty": np.zeros((self.size,) * 2, np.uint8),
                          "full-frame": np.ones((self.size,) * 2, np.uint8)}.get(kind, disc(self.size, 4)))
            images.append(np.random.default_rng(s % 2**32).integers(0, 256, (self.size, self.size, 3), np.uint8))
        return np.stack(images), np.stack(masks)


def test_quality_control_redraws_with_the_next_seeds_and_records_every_rejection(tmp_path):
    rows = prompt_table({"df": 3, "nv": 4}, seed=5, samples_per_shard=7).to_pylist()
    ids = [r["row_id"] for r in rows]
    failing = {(ids[1], 0): "empty", (ids[1], 1): "full-frame", (ids[4], 0): "empty",
               **{(ids[6], a): "empty" for a in range(3)}}
    fake = FakeGenerator(rows, 5, failing)
    samples = generate_samples(rows, fake, 5, batch_size=3, max_attempts=3, limits=MaskLimits(), image_format="png")
    # first draw: fixed mini-batches in row order; redraws: only the failed rows, still in row order
    assert fake.calls == [[(i, 0) for i in ids[0:3]], [(i, 0) for i in ids[3:6]], [(ids[6], 0)],
                          [(ids[1], 1), (ids[4], 1), (ids[6], 1)], [(ids[1], 2), (ids[6], 2)]]
    assert [s.key for s in samples] == [r["key"] for r in rows]
    by_row = {s.row_id: s for s in samples}
    assert (by_row[ids[1]].attempts, by_row[ids[1]].rejections, by_row[ids[1]].status) == (3, ["empty", "full-frame"], "ok")
    assert by_row[ids[1]].seed == row_seed(5, ids[1], 2) and by_row[ids[0]].seed == rows[0]["seed"]
    rejected = by_row[ids[6]]
    assert (rejected.status, rejected.reason, rejected.rejections, rejected.attempts) == (
        "rejected", "empty", ["empty"] * 3, 3)
    assert rejected.image_bytes is None and rejected.mask_area == 0.0 and rejected.size == (16, 16)
    # encoded ahead of the writer, the shard is byte for byte the one written from the arrays
    images, masks = fake(rows, [s.seed for s in samples])
    raw = [Sample(**{**s.__dict__, "image": img, "mask": m, "image_bytes": None, "mask_bytes": None,
                     "encoded_format": None, "height": None, "width": None, "area": None})
           if s.status == "ok" else s for s, img, m in zip(samples, images, masks)]
    run_info = {"base_model": "demo", "adapter_sha256": None, "layout": "channels", "scheduler": "ddim",
                "steps": 2, "guidance": 4.0, "fingerprint": "f", "image_format": "png"}
    a, b = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    write_shard(a, 0, samples, run_info)
    write_shard(b, 0, raw, run_info)
    assert shard_snapshot(a) == shard_snapshot(b) and a.list() == b.list()  # tar, parquet, stats: the same bytes
    parquet = pq.read_table(a.join("00000.parquet")).to_pylist()
    assert [p["rejections"] for p in parquet] == [s.rejections for s in samples]
    with pytest.raises(ValueError, match="encoded as 'png'"):
        write_shard(a, 0, [encode_sample(raw[0], "png")], {**run_info, "image_format": "jpg"})


def test_consistency_qc_redraws_below_the_threshold_and_records_the_score_and_the_ignore_map(tmp_path):
    rows = prompt_table({"nv": 4}, seed=2, samples_per_shard=4).to_pylist()
    ids = [r["row_id"] for r in rows]
    fake = FakeGenerator(rows, 2, {})
    scores = {(ids[1], 0): 0.4, (ids[1], 1): 0.95, **{(ids[3], a): 0.1 for a in range(3)}}

    def judge(images, masks):  # the draw's (row, attempt) is read back from the fake's last call
        drawn = fake.calls[-1]
        ignore = np.zeros(masks.shape, np.uint8)
        ignore[:, :2] = np.asarray([row % 2 for row, _ in drawn])[:, None, None]  # odd rows: top two lines ignored
        return Judgement(np.asarray([scores.get(d, 0.9) for d in drawn]), ignore,
                         ignore.reshape(len(ignore), -1).mean(1))

    samples = generate_samples(rows, fake, 2, batch_size=4, max_attempts=3, limits=MaskLimits(), judge=judge,
                               min_consistency=0.8, image_format="png")
    by_row = {s.row_id: s for s in samples}
    assert (by_row[ids[1]].status, by_row[ids[1]].rejections, by_row[ids[1]].consistency) == ("ok", ["inconsistent"], 0.95)
    assert by_row[ids[0]].consistency == 0.9 and by_row[ids[0]].attempts == 1
    # the kept pairs' ignore maps go into the tar as {key}.ignore.png, their share into the json and the parquet
    run_info = {"base_model": "demo", "adapter_sha256": None, "layout": "channels", "scheduler": "ddim",
                "steps": 2, "guidance": 4.0, "fingerprint": "f", "image_format": "png"}
    write_shard(LocalStorage(tmp_path), 0, samples, run_info)
    read = {s["key"]: s for s in read_shards(str(tmp_path))}
    kept = [s for s in samples if s.status == "ok"]
    assert sorted(read) == [s.key for s in kept]
    for s in kept:
        expected = np.zeros((16, 16), np.uint8)
        expected[:2] = s.row_id % 2
        assert np.array_equal(read[s.key]["ignore"], expected)
        assert read[s.key]["meta"]["disagreement"] == s.disagreement == round(2 / 16 * (s.row_id % 2), 6)
        assert read[s.key]["meta"]["mode"] == "joint" and read[s.key]["meta"]["source_key"] is None
    parquet = pq.read_table(tmp_path / "00000.parquet").to_pylist()
    assert [p["disagreement"] for p in parquet] == [s.disagreement for s in samples]
    assert (by_row[ids[3]].status, by_row[ids[3]].reason, by_row[ids[3]].consistency) == ("rejected", "inconsistent", 0.1)
    assert fake.calls[1:] == [[(ids[1], 1), (ids[3], 1)], [(ids[3], 2)]]
    with pytest.raises(UserError, match="--min-consistency 0.8"):
        GenerateConfig(min_consistency=0.8)  # needs --qc-segmenter


def test_adapter_from_s3_drives_the_shard_generator(skindual_cache, s3_env, tmp_path):
    """The adapter path in one process: an adapter folder on S3 → resolve_model → the stage-1 actor
    class and the stage-2 writer called directly (the Ray job tests below use the bare base)."""
    from skindual import model
    from skindual.base_models import demo_base_path
    from skindual.model import load_pipeline

    base = demo_base_path()
    pipe = load_pipeline(base)
    model.prepare_unet(pipe.unet, "channels", lora_rank=4)
    attributes = {"df": [["back", 40.0, "male", 3], ["face", None, "female", 1]], "vasc": [["scalp", 70.0, "male", 1]]}
    info = model.save_adapter(tmp_path / "adapter", pipe.unet, "channels", base, {"steps": 0},
                              prompt_attributes=attributes)
    remote = open_storage(f"{s3_env}/adapter")
    for name in [*info.files, model.ADAPTER_JSON]:
        remote.upload_file(tmp_path / "adapter" / name, name)
    # a crafted json naming a file outside its prefix: refused in one line, nothing but the json fetched
    crafted = open_storage(f"{s3_env}/crafted")
    meta = json.loads((tmp_path / "adapter" / model.ADAPTER_JSON).read_text())
    meta["files"][f"../adapter/{model.LORA_FILE}"] = meta["files"][model.LORA_FILE]
    crafted.write_bytes(model.ADAPTER_JSON, json.dumps(meta).encode())
    with pytest.raises(UserError, match=rf"names the file '\.\./adapter/{model.LORA_FILE}', which is not a plain file"):
        generate_model.fetch_adapter(crafted.url, None, tmp_path / "fetched")
    assert sorted(p.name for p in (tmp_path / "fetched").iterdir()) == [model.ADAPTER_JSON]
    cfg = GenerateConfig(per_class="df=2,vasc=1", adapter=remote.url, samples_per_shard=2, steps=2, batch_size=2,
                         max_mask_area=1.0)
    spec = generate_model.resolve_model(cfg)
    assert (spec.base_model, spec.adapter_sha256, spec.layout) == ("demo", info.sha256, "channels")
    assert spec.prompt_attributes == attributes
    table = generate.generation_prompts(cfg, spec)  # each row's site, age and sex from the adapter's training data
    prompts = dict(zip(table.column("class_code").to_pylist(), table.column("prompt").to_pylist()))
    assert prompts["vasc"].endswith("on the scalp, 70 year old male")
    assert any(p.endswith(("on the back, 40 year old male", "on the face, female")) for p in table.column("prompt").to_pylist())
    plain = generate.generation_prompts(replace(cfg, prompt_attributes="none"), spec)
    assert plain.column("prompt").to_pylist() == [build_prompt(c) for c in plain.column("class_code").to_pylist()]
    actor = generate_actors.ShardGenerator(generate.resolve_devices(cfg, this_machine()), spec)
    assert actor.pipe.adapter.sha256 == info.sha256 and actor.pipe.unet.config.in_channels == 8
    out = LocalStorage(tmp_path / "out")
    (item,) = generate_actors.shard_items(table, [1])  # shard 1's rows travel with it, not in the actor
    shards = table.column("shard").to_pylist()
    assert [r["row_id"] for r in json.loads(item["rows"])] == [
        r for r, s in zip(table.column("row_id").to_pylist(), shards) if s == 1]
    stats = generate_actors.write_shard_rows(actor(pa.table({"shard": [1], "rows": [item["rows"]]})), out,
                                             generate.shard_run_info(cfg, spec, "fp"))
    assert stats["shard"].tolist() == [1] and stats["successes"].tolist() == [1]
    (sample,) = list(wds.WebDataset(out.join("00001.tar"), shardshuffle=False))
    meta = json.loads(sample["json"])
    assert (meta["key"], meta["adapter_sha256"], meta["base_model"]) == ("000010000", info.sha256, spec.base_id)


def test_mask_mode_samples_images_for_augmented_real_masks(demo_real, tmp_path):
    """--mask-source in one process (plan, prompt table, the stage-1 actor and the stage-2 writer called
    directly): each row is given a real train mask of its class, augmented by its recorded seed; the shard's
    mask is that mask exactly, the prompt names that mask's site, and the same shard comes out byte for byte."""
    from skindual.mask_source import given_mask, load_masks
    from skindual.pairs import iter_shard

    cfg = GenerateConfig(per_class="df=3,nv=3", mask_source=str(demo_real), samples_per_shard=6, steps=2,
                         batch_size=4, output=str(tmp_path / "out"))
    plan = generate.plan_generate(cfg)
    assert plan.settings["mask_source"] == f"sha256:{plan.masks.digest}"
    table = generate.generation_prompts(plan.config, plan.model, plan.masks)
    index = {f"{r['shard']:05d}/{r['key']}": r for r in read_index(str(demo_real)).to_pylist()}
    rows = table.to_pylist()
    for row in rows:
        real = index[row["source_key"]]
        assert real["split"] == "train" and real["class_code"] == row["class_code"]
        assert row["prompt"] == build_prompt(row["class_code"], real["localization"], real["age"], real["sex"])
    assert len({r["source_key"] for r in rows}) == 6  # 3 of each class: all different (a class has more)
    masks = load_masks(plan.masks, table.column("source_key").to_pylist(), None)
    (item,) = generate_actors.shard_items(table, [0], masks)
    actor = generate_actors.ShardGenerator(generate.resolve_devices(plan.config, this_machine()), plan.model)
    batch = pa.table({"shard": [0], "rows": [item["rows"]], "masks": [item["masks"]]})
    outputs = [LocalStorage(tmp_path / name) for name in ("a", "b")]
    for storage in outputs:
        generate_actors.write_shard_rows(actor(batch), storage, generate.shard_run_info(plan.config, plan.model, "fp"))
    assert outputs[0].read_bytes("00000.tar") == outputs[1].read_bytes("00000.tar")
    real_masks = {}
    for shard in {int(k.split("/")[0]) for k in masks}:
        real_masks |= {f"{shard:05d}/{x['__key__']}": x["seg.png"] for x in iter_shard(LocalStorage(demo_real), shard)}
    for pair in read_shards(outputs[0].url):
        meta = pair["meta"]
        assert meta["mode"] == "mask" and meta["source_key"] in masks and meta["augmentation_seed"] >= 0
        expected, seed = given_mask(real_masks[meta["source_key"]], 64, meta["augmentation_seed"], cfg.limits())
        assert seed == meta["augmentation_seed"] and np.array_equal(pair["mask"], expected)
        assert pair["class_index"] == index[meta["source_key"]]["class_index"]


def test_mask_mode_errors_name_the_flag(tmp_path):
    from fixture_data import prepare_folder
    from skindual.demo import render

    with pytest.raises(UserError, match="--mask-fraction 0.5: .* needs --mask-source"):
        GenerateConfig(mask_fraction=0.5)
    with pytest.raises(UserError, match="--mask-source .*no such folder"):
        generate.plan_generate(GenerateConfig(per_class="1", mask_source=str(tmp_path / "nothing")))
    render.write_demo_dataset(tmp_path / "data", {"nv": 6, "df": 6}, seed=1)
    real = prepare_folder(tmp_path / "data", tmp_path / "real")
    with pytest.raises(UserError, match=r"--mask-source .*: its train split has no usable masks of vasc; leave"):
        generate.plan_generate(GenerateConfig(per_class="df=1,vasc=1", mask_source=str(real),
                                              output=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- the real job


def start_generate(ray_address: str, log: Path, args: list[str]):
    with log.open("w") as out:
        return start_job("generate", args, ray_address, log=out)


def snapshot(storage: Storage) -> dict[str, str]:
    """sha256 of every shard file (tar, parquet, stats without what the listing said at commit)."""
    return shard_snapshot(storage)


@pytest.fixture(scope="module")
def local_run(ray_cluster, tmp_path_factory):
    """One uninterrupted run into a folder: (storage, the job's result)."""
    out = tmp_path_factory.mktemp("gen") / "synthetic"
    return LocalStorage(out), ok(run_job("generate", [*JOB_ARGS, "--output", str(out)], ray_cluster))


def test_job_writes_the_asked_pairs_as_standard_webdataset(local_run, ray_cluster, tmp_path, monkeypatch):
    storage, result = local_run
    assert "5 shards to do" in result.stderr and "generate: 9/9 pairs (100%)" in result.stderr
    # only skindual's lines on the terminal: the plan, progress, a line per shard, the summary (Ray's stay in its logs)
    others = [line for line in result.stderr.splitlines() if not re.match(OUR_LINE, line)]
    assert others == [] and result.stdout.count("\n") == 1 and result.stdout.startswith("done: 9 pairs")
    assert all(f"shard {i:05d} written" in result.stderr for i in range(SHARDS))
    assert sorted(n for n in storage.list() if n.endswith(".tar")) == [f"{i:05d}.tar" for i in range(SHARDS)]
    counts, keys = {}, []
    for name in sorted(n for n in storage.list() if n.endswith(".tar")):
        for sample in wds.WebDataset(storage.join(name), shardshuffle=False):  # stock webdataset
            keys.append(sample["__key__"])
            assert set(sample) >= {"jpg", "seg.png", "cls", "txt", "json"}
            image, mask = Image.open(io.BytesIO(sample["jpg"])), Image.open(io.BytesIO(sample["seg.png"]))
            assert image.mode == "RGB" and mask.mode == "L" and mask.size == image.size == (64, 64)
            assert set(np.unique(np.asarray(mask))) <= {0, 255}
            meta = json.loads(sample["json"])
            assert meta["status"] == "ok" and meta["class_index"] == int(sample["cls"]) and meta["steps"] == 10
            counts[meta["class_code"]] = counts.get(meta["class_code"], 0) + 1
    assert counts == ASKED and len(keys) == len(set(keys)) == 9
    manifest = json.loads(storage.read_bytes("manifest.json"))
    assert {c: n["ok"] for c, n in manifest["totals"]["per_class"].items()} == ASKED
    assert manifest["asked_per_class"] == ASKED and manifest["resolved"]["device"] == "cpu"
    assert json.loads(storage.read_bytes("sizes.json")) == {f"{i:05d}.tar": 2 for i in range(4)} | {"00004.tar": 1}
    rows = [r for i in range(SHARDS) for r in pq.read_table(storage.join(f"{i:05d}.parquet")).to_pylist()]
    assert sum(len(r["rejections"]) for r in rows) == sum(r["attempts"] - 1 for r in rows)
    # the skindual reader yields the same pairs
    pairs = list(read_shards(storage.url))
    assert sorted(p["key"] for p in pairs) == sorted(keys)
    # preview.png: drawn from the first shard written (a pair or two), then, as that lacks pairs, from every shard
    drawn = re.findall(r"preview\.png written \(([^)]*)\)", result.stderr)
    assert len(drawn) == 2 and 1 <= sum(map(int, re.findall(r"\d+", drawn[0]))) <= 2, result.stderr[-3000:]
    assert drawn[1] == "df 3, nv 3, vasc 3"
    assert storage.read_bytes("preview.png") == draw_preview(storage, read_index(storage.url)).png()

    # the dataset card, from the manifest's numbers; the licence is the demo world's (no --adapter: the demo's)
    header, body = read_card(Path(storage.url))
    assert header["license"] == "apache-2.0" and header["size_categories"] == ["n<1K"]
    counts = card_table(body, "Pairs per class")
    assert {c: int(row[1]) for c, row in counts.items() if c != "all"} == ASKED and counts["all"][1] == "9"
    kept = card_table(body, "How they were made")["kept"][0]
    assert kept.startswith(f"9 of {manifest['totals']['draws']} draws passed") and "Partial" not in body
    # its recipes on the job's own output: Hugging Face datasets by the card's features, Ray Data on the cluster
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (tmp_path / "skindual-synthetic").symlink_to(storage.url)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(RECIPES["datasets-card"], scope)
    assert sorted(scope["pairs"]["__key__"]) == sorted(keys) and scope["pairs"][0]["seg.png"].mode == "L"
    assert all(isinstance(p["json"], dict) and p["json"]["key"] == p["__key__"] for p in scope["pairs"])
    check = RECIPES["ray-data"] + ("row = pairs.take(1)[0]\n"
                                   "assert row['jpg'].shape == (64, 64, 3) and row['seg.png'].shape == (64, 64)\n"
                                   "assert isinstance(row['cls'], int) and row['json']['class_index'] == row['cls']\n"
                                   "print(pairs.count())\n")
    run = subprocess.run([sys.executable, "-c", check], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert run.returncode == 0 and run.stdout.strip().splitlines()[-1] == "9", run.stderr[-3000:]


def test_rerun_is_a_no_op(local_run, ray_cluster):
    """A rerun of a finished output decides from storage's listing and reads no tar: a tar altered behind its
    _stats.json with its size and mtime kept goes unseen; --verify hashes every shard, finds it and writes it
    again, to the same bytes."""
    storage, _ = local_run
    before = snapshot(storage)
    tar = Path(storage.join("00001.tar"))
    whole, stat = tar.read_bytes(), tar.stat()
    tar.write_bytes(whole[:-1000] + bytes(b ^ 0xFF for b in whole[-1000:]))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = ok(run_job("generate", [*JOB_ARGS, "--output", storage.url], ray_cluster))
    assert result.stdout.startswith("already done: 9 pairs") and "shards to do" not in result.stderr
    result = ok(run_job("generate", [*JOB_ARGS, "--output", storage.url, "--verify"], ray_cluster))
    assert "shard 00001 at" in result.stderr and "does not match the sha256 its _stats.json records" in result.stderr
    assert "1 shards to do" in result.stderr and snapshot(storage) == before


def test_killed_run_resumes_to_the_same_bytes_on_s3(local_run, ray_cluster, s3_env, tmp_path):
    storage = open_storage(s3_env)
    proc = start_generate(ray_cluster, tmp_path / "killed.log", [*JOB_ARGS, "--output", s3_env])
    deadline = time.monotonic() + 240
    try:
        while not any(n.endswith("_stats.json") for n in storage.list()):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-5000:]
            assert time.monotonic() < deadline, "no shard was committed in time"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    committed = sorted(n for n in storage.list() if n.endswith("_stats.json"))
    print(f"killed with {len(committed)} of {SHARDS} shards committed")
    # the run recorded its shards when it started: what it committed is not taken for the whole output
    with pytest.raises(UserError, match=r"^--synthetic s3://.*: the run writing it has not finished .*pass --partial"):
        read_index(s3_env, what="--synthetic")
    assert {int(n[:5]) for n in committed} <= set(read_index(s3_env, partial=True).column("shard").to_pylist())
    # and a crash inside a shard: its data uploaded again, its commit marker not yet written
    first = committed[0].removesuffix("_stats.json")
    storage.delete(f"{first}_stats.json")
    storage.write_bytes(f"{first}.tar", b"half a tar")
    # and a shard whose tar was truncated behind its commit marker
    whole = sorted(n for n in snapshot(local_run[0]) if n.endswith(".tar") and n != f"{first}.tar")[0]
    if storage.exists(whole.replace(".tar", "_stats.json")):
        storage.write_bytes(whole, storage.read_bytes(whole)[:100])
    result = ok(run_job("generate", [*JOB_ARGS, "--output", s3_env], ray_cluster))
    todo = int(re.search(r"(\d+) shards to do", result.stderr).group(1))
    assert 1 <= todo <= SHARDS - len(committed) + 2
    if storage.exists(whole.replace(".tar", "_stats.json")) and f"shard {whole[:5]} at" in result.stderr:
        assert "does not match its _stats.json" in result.stderr
    assert snapshot(storage) == snapshot(local_run[0])
    keys = [s["__key__"] for s in wds.WebDataset(shard_urls(s3_env), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == 9
    # its preview.png is the uninterrupted run's, and jobs/preview.py draws the same from S3 to S3
    assert storage.read_bytes("preview.png") == local_run[0].read_bytes("preview.png")
    ok(run_job("preview", ["--data", s3_env, "--output", f"{s3_env}/sheets/sheet.png"]))
    assert storage.read_bytes("sheets/sheet.png") == storage.read_bytes("preview.png")


def test_other_settings_are_refused_and_overwrite_replaces(local_run, ray_cluster, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(local_run[0].url, out)
    result = run_job("generate", [*JOB_ARGS, "--steps", "3", "--output", str(out)], ray_cluster)
    assert result.returncode == 2 and "--steps 10, now --steps 3" in result.stderr
    assert "Traceback" not in result.stderr
    # as the issue runs it: through `ray job submit` (the entrypoint runs on the cluster)
    submit = subprocess.run([str(Path(sys.executable).parent / "ray"), "job", "submit", "--", "python",
                             "jobs/generate.py", "--per-class", "df=1", "--steps", "2", "--image-format", "png",
                             "--max-mask-area", "1.0", "--output", str(out), "--overwrite"],
                            env={**os.environ, "RAY_ADDRESS": ray_cluster}, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert submit.returncode == 0 and "succeeded" in submit.stdout + submit.stderr, submit.stdout[-4000:]
    storage = LocalStorage(out)
    assert sorted(snapshot(storage)) == ["00000.parquet", "00000.tar", "00000_stats.json"]
    (sample,) = list(wds.WebDataset(storage.join("00000.tar"), shardshuffle=False))
    assert "png" in sample and json.loads(sample["json"])["class_code"] == "df"


def test_ctrl_c_is_one_line_and_the_rerun_resumes(local_run, ray_cluster, tmp_path):
    """Ctrl-C (SIGINT to the job's process group, as a terminal sends it): one line, exit status 130; the same
    command again resumes to the bytes of a run nothing interrupted."""
    out = tmp_path / "interrupted"
    log = tmp_path / "interrupted.log"
    proc = start_generate(ray_cluster, log, [*JOB_ARGS, "--output", str(out)])
    deadline = time.monotonic() + 240
    while "shards to do" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert lines[-1] == "interrupted; run the same command again to resume" and "Traceback" not in log.read_text()
    ok(run_job("generate", [*JOB_ARGS, "--output", str(out)], ray_cluster))
    assert snapshot(LocalStorage(out)) == snapshot(local_run[0])


def test_a_redraw_in_mask_mode_draws_a_new_augmentation_of_the_same_real_mask(demo_real):
    """A mask-mode row the QC turns down is drawn again for another augmentation of its real mask (the next block
    of seeds), not for the same mask: the kept sample records the seed of the mask it was drawn for."""
    from skindual.mask_source import AUGMENTATION_TRIES, GivenMasks, given_mask
    from skindual.pairs import iter_shard
    from skindual.qc_model import Judgement
    from skindual.quality import MaskLimits
    from skindual.redraw import generate_samples

    pngs = [x["seg.png"] for x in iter_shard(LocalStorage(demo_real), 0)][:3]
    rows = [{"row_id": i, "key": f"{i:09d}", "class_code": "nv", "class_index": 5, "prompt": "p", "seed": i,
             "source_key": f"00000/{i}", "augmentation_seed": 1000 * i} for i in range(3)]
    limits, seen = MaskLimits(), []
    given = GivenMasks(rows, pngs, 64, limits)

    def draw(chunk, seeds):
        masks = given(chunk)
        seen.append([(r["row_id"], r["augmentation_seed"], m) for r, m in zip(chunk, masks)])
        return np.zeros((len(chunk), 64, 64, 3), np.uint8), masks

    def judge(images, masks):  # row 1's first draw disagrees; every other draw agrees
        bad = len(seen) == 1
        score = np.array([0.0 if bad and rid == 1 else 1.0 for rid, _, _ in seen[-1]])
        return Judgement(score, np.zeros_like(masks), np.zeros(len(masks)))

    samples = generate_samples(rows, draw, 0, 4, 3, limits, "png", judge=judge, min_consistency=0.5)
    assert [s.attempts for s in samples] == [1, 2, 1] and samples[1].rejections == ["inconsistent"]
    (first_try,) = [m for rid, _, m in seen[0] if rid == 1]
    (redraw,) = seen[1]
    assert redraw[0] == 1 and 1000 + AUGMENTATION_TRIES <= redraw[1] < 1000 + 2 * AUGMENTATION_TRIES
    assert samples[1].augmentation_seed == redraw[1] and not np.array_equal(redraw[2], first_try)
    for (rid, seed, mask), sample in [(seen[0][0], samples[0]), (redraw, samples[1]), (seen[0][2], samples[2])]:
        assert sample.augmentation_seed == seed and np.array_equal(mask, given_mask(pngs[rid], 64, seed, limits)[0])
    assert samples[0].augmentation_seed < AUGMENTATION_TRIES  # a first draw keeps its row's own seeds


def test_a_real_mask_turned_down_draw_after_draw_gives_way_to_another_of_its_class(demo_real):
    """A mask-mode row whose real mask the QC turns down `MASK_SWITCH_DRAWS` times running moves on to the next real
    mask of its class in the shard, not to another class's; its sample records the mask it was kept for (source key
    and augmentation seed), so the pair's provenance stays true."""
    from skindual.mask_source import MASK_SWITCH_DRAWS, GivenMasks, given_mask
    from skindual.pairs import iter_shard
    from skindual.qc_model import Judgement
    from skindual.quality import MaskLimits
    from skindual.redraw import generate_samples

    pngs = [x["seg.png"] for x in iter_shard(LocalStorage(demo_real), 0)][:4]
    codes = ["nv", "nv", "mel", "nv"]
    rows = [{"row_id": i, "key": f"{i:09d}", "class_code": c, "class_index": 0, "prompt": "p", "seed": i,
             "source_key": f"00000/{i}", "augmentation_seed": 1000 * i} for i, c in enumerate(codes)]
    limits = MaskLimits()
    given, drawn = GivenMasks(rows, pngs, 64, limits), []

    def draw(chunk, seeds):
        masks = given(chunk)
        drawn.append([r["source_key"] for r in chunk])
        return np.zeros((len(chunk), 64, 64, 3), np.uint8), masks

    def judge(images, masks):  # whatever is drawn for row 1's own real mask disagrees
        return Judgement(np.array([0.0 if key == "00000/1" else 1.0 for key in drawn[-1]]), np.zeros_like(masks),
                         np.zeros(len(masks)))

    samples = generate_samples(rows, draw, 0, 4, 16, limits, "png", judge=judge, min_consistency=0.5)
    assert [s.status for s in samples] == ["ok"] * 4
    assert samples[1].attempts == MASK_SWITCH_DRAWS + 1 and samples[1].rejections == ["inconsistent"] * MASK_SWITCH_DRAWS
    assert samples[1].source_key == "00000/3"  # the next nv mask of the shard (row 2's is mel's)
    kept = (np.asarray(Image.open(io.BytesIO(samples[1].mask_bytes))) >= 128).astype(np.uint8)
    assert np.array_equal(kept, given_mask(pngs[3], 64, samples[1].augmentation_seed, limits)[0])
    assert [s.source_key for s in (samples[0], samples[2], samples[3])] == ["00000/0", "00000/2", "00000/3"]
