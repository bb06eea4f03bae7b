"""jobs/prepare.py: a HAM10000-layout download (and ISIC 2018) → the real dataset in the shard layout, on
the shared local Ray cluster; bad files, reruns, --max-side.  Off one machine (S3 only): test_cluster."""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from fixture_data import shard_snapshot, write_test_shards
from job_runs import ok, run_job
from skindual.demo import render
from skindual.data import HAM_MASKS, ISIC_IMAGES, ISIC_MASKS
from skindual.pairs import read_index
from skindual.prompts import CLASS_CODES, attribute_distribution, attribute_pools, prompt_table
from skindual.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[1]
COUNTS = {c: 12 if c == "nv" else 6 for c in CLASS_CODES}  # 48 images, some lesions with two


def snapshot(folder: Path) -> dict[str, str]:
    return shard_snapshot(LocalStorage(folder))


@pytest.fixture(scope="module")
def download(tmp_path_factory) -> Path:
    return render.write_demo_dataset(tmp_path_factory.mktemp("raw") / "HAM10000", COUNTS, seed=21)


@pytest.fixture(scope="module")
def prepared(download, ray_cluster, tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared") / "real"
    result = ok(run_job("prepare", ["--ham10000", str(download), "--samples-per-shard", "16", "--output", str(out)],
                                ray_cluster))
    return out, result


def test_the_real_dataset_has_the_shard_layout_with_the_bytes_inside(prepared, download):
    out, result = prepared
    assert "done: 48 pairs in 3 shards" in result.stdout and "shard 00002 written" in result.stderr
    names = sorted(p.name for p in out.iterdir())
    assert [n for n in names if n.endswith(".tar")] == ["00000.tar", "00001.tar", "00002.tar"]
    assert {"sizes.json", "manifest.json", "run.json"} <= set(names)
    metadata = {row.split(",")[1]: row.split(",") for row in (download / render.METADATA_CSV).read_text().splitlines()[1:]}
    lesions, keys = {}, []
    for tar in sorted(out.glob("*.tar")):
        for sample in wds.WebDataset(str(tar), shardshuffle=False):  # stock webdataset
            keys.append(sample["__key__"])
            assert {k for k in sample if not k.startswith("__")} == {"jpg", "seg.png", "cls", "txt", "json"}
            meta = json.loads(sample["json"])
            source = next(download.rglob(f"{meta['image_id']}.jpg"))
            assert sample["jpg"] == source.read_bytes()  # the downloaded JPEG's bytes (it has no metadata to strip)
            mask = np.asarray(Image.open(io.BytesIO(sample["seg.png"])))
            truth = np.asarray(Image.open(download / HAM_MASKS / f"{meta['image_id']}_segmentation.png")) > 0
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255} and np.array_equal(mask > 0, truth)
            row = metadata[meta["image_id"]]
            assert (meta["lesion_id"], meta["class_code"], meta["localization"], meta["sex"]) == (row[0], row[2], row[6], row[5])
            assert int(sample["cls"]) == CLASS_CODES.index(meta["class_code"]) == meta["class_index"]
            assert sample["txt"].decode().startswith("a dermoscopy image of")
            lesions.setdefault(meta["lesion_id"], set()).add(meta["split"])
    assert len(keys) == len(set(keys)) == 48
    assert all(len(splits) == 1 for splits in lesions.values())  # a lesion never in two splits
    manifest = json.loads((out / "manifest.json").read_text())
    per_split = manifest["totals"]["per_split"]
    assert set(per_split) == {"train", "val", "test"}
    assert Counter({c: sum(s.get(c, 0) for s in per_split.values()) for c in CLASS_CODES}) == Counter(COUNTS)
    assert manifest["skipped"] == {} and manifest["prompt_template"]
    index = read_index(str(out))
    assert index.num_rows == 48 and set(index.column("status").to_pylist()) == {"ok"}
    assert all(s.startswith(str(download)) for s in index.column("source_image").to_pylist())


def test_a_rerun_skips_what_is_committed_and_other_settings_are_refused(prepared, download, ray_cluster, tmp_path):
    out, _ = prepared
    before = snapshot(out)
    result = ok(run_job("prepare", ["--ham10000", str(download), "--samples-per-shard", "16", "--output", str(out)],
                                ray_cluster))
    assert result.stdout.startswith("already done: 48 pairs in 3 shards") and snapshot(out) == before
    result = run_job("prepare", ["--ham10000", str(download), "--samples-per-shard", "20", "--output", str(out)])
    assert result.returncode == 2 and "--samples-per-shard 16, now --samples-per-shard 20" in result.stderr
    assert "Traceback" not in result.stderr and snapshot(out) == before


def test_a_bad_file_stops_the_job_naming_it_and_skip_bad_counts_and_lists_it(download, ray_cluster, tmp_path):
    import shutil

    raw = tmp_path / "raw"
    shutil.copytree(download, raw)
    bad = sorted(raw.rglob("ISIC_*.jpg"))[-1]  # in the last shard
    bad.write_bytes(b"not a jpeg")
    out = tmp_path / "real"
    result = run_job("prepare", ["--ham10000", str(raw), "--samples-per-shard", "16", "--output", str(out)], ray_cluster)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr
    assert str(bad) in errors[0] and "cannot be decoded" in errors[0] and "--skip-bad" in errors[0]
    assert not (out / "00002_stats.json").exists()  # its shard is not committed
    result = ok(run_job("prepare", ["--ham10000", str(raw), "--samples-per-shard", "16", "--skip-bad", "--output", str(out)],
                                ray_cluster))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skipped"] == {"unreadable_image": 1} and manifest["skipped_files"] == [[str(bad), "unreadable_image"]]
    assert manifest["totals"]["successes"] == 47 and "1 skipped" in result.stdout
    rows = pq.read_table(out / "00002.parquet").to_pylist()
    (rejected,) = [r for r in rows if r["status"] == "rejected"]
    assert rejected["source_image"] == str(bad) and rejected["reason"] == "unreadable_image"


def test_max_side_stores_resized_pairs_and_isic_joins_unclassed(download, tmp_path):
    from skindual.prepare import PrepareConfig, prepare_here
    from skindual.preview import PreviewConfig, run_preview

    isic = tmp_path / "isic"
    for i in range(3):
        image, mask = render.render_lesion("mel", 70 + i, (120, 90))
        (isic / ISIC_IMAGES).mkdir(parents=True, exist_ok=True)
        (isic / ISIC_MASKS).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(isic / ISIC_IMAGES / f"ISIC_{8000000 + i}.jpg")
        Image.fromarray(mask * 255).save(isic / ISIC_MASKS / f"ISIC_{8000000 + i}_segmentation.png")
    manifest = prepare_here(PrepareConfig(ham10000=str(download), isic2018=str(isic), max_side=48,
                                         output=str(tmp_path / "real")))
    assert manifest["totals"]["per_class"]["unclassed"]["ok"] == 3 and manifest["totals"]["successes"] == 51
    for sample in wds.WebDataset(str(tmp_path / "real" / "00000.tar"), shardshuffle=False).decode("rgb8"):
        meta = sample["json"]
        assert max(meta["width"], meta["height"]) == 48 and sample["jpg"].shape[:2] == (meta["height"], meta["width"])
        assert sample["seg.png"].shape[:2] == sample["jpg"].shape[:2]
        if meta["source"] == "isic2018":
            assert meta["class_index"] == int(sample["cls"]) == -1 and meta["lesion_id"] == meta["image_id"]
    # its preview.png: a row per class, the unclassed ISIC 2018 pairs last
    preview = run_preview(PreviewConfig(data=str(tmp_path / "real"), output=str(tmp_path / "sheet.png")))
    assert (tmp_path / "real" / "preview.png").read_bytes() == (tmp_path / "sheet.png").read_bytes()
    assert [label for label, _ in preview.rows] == [c for c in CLASS_CODES if c in manifest["totals"]["per_class"]] + [
        "unclassed"] and len(preview.rows[-1][1]) == 3


def test_a_cameras_exif_and_gps_never_reach_the_real_dataset(download, tmp_path):
    """Downloaded JPEGs with EXIF (GPS position included), an ICC profile, XMP and a comment: stored as they are
    (--max-side 0) they keep their pixels and lose the metadata; resized, the metadata does not come back."""
    import shutil

    from test_jpeg import decoded, has_no_metadata, jpeg_with_metadata

    from skindual.prepare import PrepareConfig, prepare_here

    raw = tmp_path / "raw"
    shutil.copytree(download, raw)
    tagged = {}
    for path in sorted(raw.rglob("ISIC_*.jpg"))[:5]:
        path.write_bytes(jpeg_with_metadata(decoded(path.read_bytes())))
        tagged[path.stem] = decoded(path.read_bytes())
    for max_side in (0, 48):
        out = tmp_path / f"real-{max_side}"
        prepare_here(PrepareConfig(ham10000=str(raw), max_side=max_side, output=str(out)))
        seen = 0
        for sample in wds.WebDataset(str(out / "00000.tar"), shardshuffle=False):
            image_id = json.loads(sample["json"])["image_id"]
            assert has_no_metadata(sample["jpg"]), image_id
            if image_id in tagged and not max_side:
                assert np.array_equal(decoded(sample["jpg"]), tagged[image_id])  # the same pixels
            seen += image_id in tagged
        assert seen == len(tagged)


def test_no_source_is_one_clear_line(tmp_path):
    result = run_job("prepare", ["--output", str(tmp_path / "x")])
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: no data: give --ham10000 DIR, --isic2018 DIR, or both (a folder or an s3:// prefix)")


def test_prompts_follow_the_training_datas_sites_ages_and_sexes(prepared):
    """The adapter records each class's (site, age, sex) counts of its training data; generation draws each
    row's from them by its seed: at 2,000 rows a class the frequencies match within sampling error."""
    out, _ = prepared
    index = read_index(str(out))
    train = index.filter(np.asarray(index.column("split")) == "train")
    distribution = attribute_distribution(train)
    assert json.loads(json.dumps(distribution)) == distribution  # recordable in the adapter json as is
    table = prompt_table({c: 2000 for c in CLASS_CODES}, seed=4, samples_per_shard=1000,
                         attributes=attribute_pools(distribution))
    for code, entries in distribution.items():
        total = sum(n for *_, n in entries)
        prompts = [p for p, c in zip(table.column("prompt").to_pylist(), table.column("class_code").to_pylist())
                   if c == code]
        def site_of(prompt: str) -> str | None:  # the prompt names a known site as ", on the SITE"
            return prompt.split(", on the ")[1].split(",")[0] if ", on the " in prompt else None

        def sex_of(prompt: str) -> str | None:
            return "female" if prompt.endswith(" female") else "male" if prompt.endswith(" male") else None

        for which, of, position in (("site", site_of, 0), ("sex", sex_of, 2)):
            drawn = Counter(of(q) for q in prompts)
            for value in {e[position] if e[position] not in (None, "unknown") else None for e in entries}:
                p = sum(e[3] for e in entries if (e[position] if e[position] != "unknown" else None) == value) / total
                share = drawn[value] / len(prompts)
                assert abs(share - p) <= 4 * np.sqrt(p * (1 - p) / len(prompts)) + 1e-9, (code, which, value, share, p)
    again = prompt_table({c: 2000 for c in CLASS_CODES}, seed=4, samples_per_shard=1000,
                         attributes=attribute_pools(distribution))
    assert again.equals(table)  # by the row's seed: reproducible


def test_already_done_is_decided_from_the_listing_and_verify_reads_every_shard(download, tmp_path, monkeypatch):
    """A rerun of a finished preparation reads no tar: each shard's size and stamp (here its mtime) in storage's
    listing are those its _stats.json recorded at commit.  A shard whose listing changed is read and hashed (and
    written again when it does not match); `--verify` hashes every shard."""
    import os
    from dataclasses import replace

    from skindual.prepare import PrepareConfig, plan_prepare, prepare_here, run_prepare

    out = tmp_path / "real"
    cfg = PrepareConfig(ham10000=str(download), output=str(out), samples_per_shard=16)
    prepare_here(cfg)
    before = snapshot(out)
    read: list[str] = []
    for method in ("read_bytes", "iter_bytes"):  # every byte the plans read, by file name
        original = getattr(LocalStorage, method)
        monkeypatch.setattr(LocalStorage, method, lambda self, name, *a, _o=original, **k: (read.append(name),
                                                                                           _o(self, name, *a, **k))[1])
    assert plan_prepare(cfg).done is not None
    assert not [n for n in read if n.endswith((".tar", ".parquet"))]
    # the same size and mtime, other bytes: nothing in the listing shows it, so only --verify finds it
    tar = out / "00001.tar"
    whole, stat = tar.read_bytes(), tar.stat()
    altered = bytearray(whole)
    altered[len(altered) // 2] ^= 0xFF
    tar.write_bytes(bytes(altered))
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    read.clear()
    assert plan_prepare(cfg).done is not None and not [n for n in read if n.endswith(".tar")]
    verified = plan_prepare(replace(cfg, verify=True))
    assert verified.done is None and verified.todo == (1,)
    assert sorted(n for n in read if n.endswith(".tar")) == ["00000.tar", "00001.tar", "00002.tar"]
    # written again later (its mtime moves): the listing shows it, that shard alone is read, found and rewritten
    os.utime(tar, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    read.clear()
    plan = plan_prepare(cfg)
    assert plan.done is None and plan.todo == (1,)
    assert [n for n in read if n.endswith((".tar", ".parquet"))] == ["00001.tar"]  # its damage found there
    run_prepare(plan, distributed=False)
    assert snapshot(out) == before and plan_prepare(cfg).done is not None


def test_a_run_cut_short_is_refused_by_every_job_that_reads_it_unless_partial(download, tmp_path):
    """A preparation that stops at a bad file in its last shard leaves two of three shards committed.  It
    recorded its planned shards before the first, so no reader takes those two for the dataset: every job that
    reads a dataset refuses it in one line naming its own flag and its own --partial, and with --partial reads
    the committed part, naming those shards in its fingerprint.  Finished, it reads whole."""
    import shutil
    from dataclasses import replace

    from skindual.errors import UserError
    from skindual.evaluate_plan import EvaluateConfig, plan_evaluate
    from skindual.export import ExportConfig, plan_export
    from skindual.finetune import plan_finetune
    from skindual.finetune_config import FinetuneConfig
    from skindual.generate import plan_generate
    from skindual.generate_config import GenerateConfig
    from skindual.prepare import PrepareConfig, prepare_here
    from skindual.qc_model import QCModelConfig, plan_qc_model
    from skindual.shard_store import committed_shards

    raw = tmp_path / "raw"
    shutil.copytree(download, raw)
    sorted(raw.rglob("ISIC_*.jpg"))[-1].write_bytes(b"not a jpeg")  # in the last shard
    out = tmp_path / "real"
    cfg = PrepareConfig(ham10000=str(raw), output=str(out), samples_per_shard=16)
    with pytest.raises(UserError, match="cannot be decoded"):
        prepare_here(cfg)
    assert committed_shards(LocalStorage(out)) == [0, 1]
    with pytest.raises(UserError, match=r"has not finished \(its manifest.json says so; 2 of the 3 shards it planned "
                                        r"are committed, not 00002\).*partial=True"):
        read_index(str(out))
    part = read_index(str(out), partial=True)
    assert sorted(set(part.column("shard").to_pylist())) == [0, 1]

    splits = {split: set(part.filter(np.asarray(part.column("split")) == split).column("class_code").to_pylist())
              for split in ("train", "val", "test")}
    code = sorted(splits["train"] & splits["test"])[0]  # a class the committed part has
    synthetic = tmp_path / "synthetic"
    write_test_shards(synthetic, [(code, seed) for seed in range(4)])
    jobs = {  # each job's config reading `out`, and the flag that names it there
        "--training-data": [FinetuneConfig(training_data=str(out), output=str(tmp_path / "runs")),
                            QCModelConfig(training_data=str(out), output=str(tmp_path / "qc"))],
        "--mask-source": [GenerateConfig(per_class=f"{code}=1", mask_source=str(out), output=str(tmp_path / "gen"))],
        "--real": [EvaluateConfig(real=str(out), synthetic=str(synthetic), output=str(tmp_path / "eval"),
                                  feature_extractor="lesion-cnn")],
        "--with-real": [ExportConfig(synthetic=str(synthetic), with_real=str(out), output=str(tmp_path / "export"))],
    }
    plans = {FinetuneConfig: plan_finetune, QCModelConfig: plan_qc_model, GenerateConfig: plan_generate,
             EvaluateConfig: plan_evaluate, ExportConfig: plan_export}
    partial_plans = {}
    for flag, configs in jobs.items():
        for job in configs:
            with pytest.raises(UserError) as refused:
                plans[type(job)](job)
            message = str(refused.value)
            assert message.startswith(f"{flag} {out}: the run writing it has not finished"), message
            assert "pass --partial to use its 2 committed shards" in message and "\n" not in message
            assert "--partial" in {f"--{f.replace('_', '-')}" for f in vars(job)}  # a flag the job has
            partial_plans[type(job)] = plans[type(job)](replace(job, partial=True))
    assert partial_plans[FinetuneConfig].settings["training_data_shards"] == "00000,00001"
    assert partial_plans[GenerateConfig].masks is not None

    # finished (the bad file skipped): whole again, and the jobs' fingerprints no longer name a part
    prepare_here(replace(cfg, skip_bad=True))
    assert sorted(set(read_index(str(out)).column("shard").to_pylist())) == [0, 1, 2]
    whole = plan_finetune(replace(jobs["--training-data"][0], partial=True))
    assert "training_data_shards" not in whole.settings
    assert whole.fingerprint == plan_finetune(jobs["--training-data"][0]).fingerprint
    assert whole.fingerprint != partial_plans[FinetuneConfig].fingerprint
    qc = jobs["--training-data"][1]
    assert plan_qc_model(qc).fingerprint == plan_qc_model(replace(qc, partial=True)).fingerprint != \
        partial_plans[QCModelConfig].fingerprint
