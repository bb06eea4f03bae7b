"""skindual's shard_format, shard_store, run_files and shards: shard files, commit protocol, rerun guard, run
files, and reading back (locally and from a real SeaweedFS S3 server, tests/s3server.py)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds
from fixture_data import BAD_MEMBERS, tamper_shard
from PIL import Image

from skindual import shards
from skindual.errors import DataError, UserError
from skindual.fingerprint import config_fingerprint
from skindual.prompts import CLASSES, sample_key
from skindual.run_files import check_output, write_run_files
from skindual.shard_format import LISTING_FIELDS, Sample, shard_names
from skindual.shard_store import committed_shards, is_committed, write_shard
from skindual.shards import read_shards
from skindual.storage import LocalStorage, Storage, open_storage

CONFIG = {"base_model": "demo", "steps": 25, "guidance": 4.0, "seed": 0}
FP = config_fingerprint(CONFIG)
RUN_INFO = {"base_model": "demo", "adapter_sha256": "ab" * 32, "layout": "channels",
            "scheduler": "ddim", "steps": 25, "guidance": 4.0, "fingerprint": FP}
SIZE = 24


def make_samples(shard: int, n: int = 6, rejected: dict[int, str] | None = None) -> list[Sample]:
    """``n`` samples of ``shard`` with random images and disc masks; ``rejected``: index -> reason."""
    rng = np.random.default_rng(shard)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    samples = []
    for i in range(n):
        cls = CLASSES[(shard + i) % len(CLASSES)]
        mask = ((yy - SIZE / 2) ** 2 + (xx - SIZE / 2) ** 2 < (3 + i) ** 2).astype(np.uint8)
        reason = (rejected or {}).get(i)
        samples.append(Sample(
            key=sample_key(shard, i), row_id=shard * 100 + i, class_code=cls.code,
            class_index=cls.index, prompt=f"a dermoscopy image of {cls.name} #{i}", seed=10**17 + i,
            image=rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8), mask=mask,
            attempts=3 if reason else 1, status="rejected" if reason else "ok", reason=reason))
    return samples


class RecordingStorage(LocalStorage):
    """A local storage that records every call that changes a file."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.calls: list[tuple[str, str]] = []

    def write_bytes(self, relpath: str, data: bytes) -> None:
        self.calls.append(("write_bytes", relpath))
        super().write_bytes(relpath, data)

    def upload_file(self, local_path: Any, relpath: str) -> None:
        self.calls.append(("upload_file", relpath))
        super().upload_file(local_path, relpath)

    def delete(self, relpath: str) -> None:
        self.calls.append(("delete", relpath))
        super().delete(relpath)


def sha(storage: Storage, name: str) -> str:
    return hashlib.sha256(storage.read_bytes(name)).hexdigest()


def test_write_shard_files_order_and_stats(tmp_path: Path) -> None:
    store = RecordingStorage(tmp_path / "out")
    samples = make_samples(3, 7, rejected={1: "empty", 4: "fragmented", 5: "empty"})
    stats = write_shard(store, 3, samples, RUN_INFO)
    assert store.list() == ["00003.parquet", "00003.tar", "00003_stats.json"]
    # the old commit marker goes first, the new one last: a crash never leaves stats beside new data
    assert store.calls == [("delete", "00003_stats.json"), ("upload_file", "00003.tar"),
                           ("upload_file", "00003.parquet"), ("upload_file", "00003_stats.json")]
    on_disk = json.loads(store.read_bytes("00003_stats.json"))
    assert on_disk == json.loads(json.dumps(stats.__dict__))
    assert (stats.count, stats.successes, stats.failed_to_generate) == (7, 4, 3)
    assert stats.draws == 4 + 3 * 3  # a rejected sample drew three times
    assert stats.rejections == {"empty": 2, "fragmented": 1}
    assert sum(c["ok"] for c in stats.per_class.values()) == 4
    assert stats.per_class[samples[1].class_code] == {"ok": 0, "rejected": 1}
    assert stats.tar_sha256 == sha(store, "00003.tar") and stats.parquet_sha256 == sha(store, "00003.parquet")
    assert stats.tar_bytes == len(store.read_bytes("00003.tar")) and stats.fingerprint == FP
    # and what the folder's listing said of the tar and parquet once uploaded: their mtimes
    listing = store.listing()
    assert (stats.tar_stamp, stats.parquet_stamp) == (listing["00003.tar"].stamp, listing["00003.parquet"].stamp)
    assert stats.tar_stamp == f"mtime_ns:{(tmp_path / 'out' / '00003.tar').stat().st_mtime_ns}"


def test_shards_are_byte_reproducible(tmp_path: Path) -> None:
    samples = make_samples(0, 8, rejected={2: "full-frame"})
    shuffled = samples[:]
    random.Random(1).shuffle(shuffled)  # input order does not matter: members are in key order
    a, b = LocalStorage(tmp_path / "a"), LocalStorage(tmp_path / "b")
    write_shard(a, 0, samples, RUN_INFO)
    write_shard(b, 0, shuffled, RUN_INFO)
    for name in ("00000.tar", "00000.parquet"):
        assert sha(a, name) == sha(b, name), name
    # the stats too, but for what each folder's listing said of its files (their mtimes)
    stats = [json.loads(store.read_bytes("00000_stats.json")) for store in (a, b)]
    assert [{k: v for k, v in s.items() if k not in LISTING_FIELDS} for s in stats][0] == \
        [{k: v for k, v in s.items() if k not in LISTING_FIELDS} for s in stats][1]
    assert [s["tar_stamp"] for s in stats] == [store.listing()["00000.tar"].stamp for store in (a, b)]
    with tarfile.open(a.join("00000.tar")) as tar:
        members = tar.getmembers()
    assert [m.name for m in members[:5]] == [f"000000000.{e}" for e in ("cls", "jpg", "json", "seg.png", "txt")]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.mode) for m in members} == {(0, 0, 0, "skindual", 0o444)}


def test_tar_reads_with_stock_webdataset(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    samples = make_samples(1, 6, rejected={0: "empty", 3: "full-frame"})
    write_shard(store, 1, samples, RUN_INFO)
    accepted = [s for s in samples if s.status == "ok"]
    raw = list(wds.WebDataset(store.join("00001.tar"), shardshuffle=False))
    assert [r["__key__"] for r in raw] == [s.key for s in accepted] == ["000010001", "000010002",
                                                                          "000010004", "000010005"]
    for r, s in zip(raw, accepted):
        assert set(r) >= {"jpg", "seg.png", "cls", "txt", "json"}
        image, mask = Image.open(io.BytesIO(r["jpg"])), Image.open(io.BytesIO(r["seg.png"]))
        assert image.format == "JPEG" and image.mode == "RGB" and not image.info.get("exif")
        assert mask.format == "PNG" and mask.mode == "L" and mask.size == image.size == (SIZE, SIZE)
        assert np.array_equal(np.asarray(mask), s.mask * 255)
    decoded = list(wds.WebDataset(store.join("00001.tar"), shardshuffle=False).decode("rgb8"))
    for d, s in zip(decoded, accepted):
        assert d["jpg"].shape == (SIZE, SIZE, 3) and d["jpg"].dtype == np.uint8
        assert np.abs(d["jpg"].astype(int) - s.image).mean() < 12  # JPEG of noise at quality 95
        assert d["cls"] == s.class_index and d["txt"] == s.prompt
        meta = d["json"]
        assert meta["key"] == s.key and meta["class_code"] == s.class_code and meta["seed"] == s.seed
        assert meta["mask_area"] == pytest.approx(s.mask.mean()) and meta["status"] == "ok"
        assert (meta["width"], meta["height"], meta["steps"], meta["layout"]) == (SIZE, SIZE, 25, "channels")
    # rejected samples are only in the parquet, with their reason
    table = pq.read_table(store.join("00001.parquet")).to_pylist()
    assert [row["key"] for row in table] == [s.key for s in samples]
    assert [(row["status"], row["reason"]) for row in table][:4] == [
        ("rejected", "empty"), ("ok", None), ("ok", None), ("rejected", "full-frame")]
    assert table[0]["attempts"] == 3 and table[0]["seed"] == samples[0].seed and table[0]["width"] == SIZE


def test_png_images_and_bad_samples(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    samples = make_samples(2, 3)
    write_shard(store, 2, samples, {**RUN_INFO, "image_format": "png"})
    first = next(iter(wds.WebDataset(store.join("00002.tar"), shardshuffle=False).decode("rgb8")))
    assert "jpg" not in first and np.array_equal(first["png"], samples[0].image)
    with pytest.raises(ValueError, match="does not belong to shard 5"):
        write_shard(store, 5, samples, RUN_INFO)
    bad = make_samples(2, 1)
    bad[0].mask = bad[0].mask[:-1]
    with pytest.raises(ValueError, match="mask"):
        write_shard(store, 2, bad, RUN_INFO)
    with pytest.raises(ValueError, match="lacks fingerprint"):
        write_shard(store, 2, samples, {k: v for k, v in RUN_INFO.items() if k != "fingerprint"})


def test_commit_marker_and_interrupted_shard(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    write_shard(store, 0, make_samples(0), RUN_INFO)
    write_shard(store, 1, make_samples(1), RUN_INFO)
    assert is_committed(store, 0, FP) and not is_committed(store, 0, "other") and not is_committed(store, 7, FP)
    assert committed_shards(store) == [0, 1]

    class Crash(RuntimeError):
        pass

    class CrashingStorage(LocalStorage):
        def upload_file(self, local_path: Any, relpath: str) -> None:
            if relpath.endswith("_stats.json"):
                raise Crash("killed before the commit")
            super().upload_file(local_path, relpath)

    crashing = CrashingStorage(tmp_path)
    with pytest.raises(Crash):  # a redo of committed shard 1 that dies: its old marker is gone
        write_shard(crashing, 1, make_samples(1), RUN_INFO)
    with pytest.raises(Crash):
        write_shard(crashing, 2, make_samples(2), RUN_INFO)
    assert store.exists("00002.tar") and not is_committed(store, 2, FP) and not is_committed(store, 1, FP)
    assert committed_shards(store) == [0]
    write_shard(store, 2, make_samples(2), RUN_INFO)  # the rerun redoes it
    assert is_committed(store, 2, FP)
    store.delete("00000.tar")
    assert not is_committed(store, 0, FP) and committed_shards(store) == [2]


def test_check_output_guards_reruns(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "out")
    assert check_output(store, CONFIG) == FP
    assert json.loads(store.read_bytes("run.json")) == {"fingerprint": FP, "config": CONFIG}
    write_shard(store, 0, make_samples(0), RUN_INFO)
    store.write_bytes("notes.txt", b"the user's own file")
    assert check_output(store, dict(CONFIG)) == FP  # resume: committed shards stay
    assert is_committed(store, 0, FP)

    changed = {**CONFIG, "steps": 30, "per_class": {"df": 5}}
    with pytest.raises(UserError) as err:
        check_output(store, changed)
    message = str(err.value)
    assert store.url in message and "--steps 25, now --steps 30" in message
    assert '--per-class (unset), now --per-class {"df": 5}' in message and "--overwrite" in message
    assert is_committed(store, 0, FP)  # refusing changes nothing

    new_fp = check_output(store, changed, overwrite=True)
    assert new_fp == config_fingerprint(changed) != FP
    assert store.list() == ["notes.txt", "run.json"]
    assert json.loads(store.read_bytes("run.json"))["config"] == changed

    foreign = LocalStorage(tmp_path / "foreign")
    write_shard(foreign, 0, make_samples(0), RUN_INFO)
    with pytest.raises(UserError, match="no run.json"):
        check_output(foreign, CONFIG)
    check_output(foreign, CONFIG, overwrite=True)
    assert foreign.list() == ["run.json"]


def test_run_files(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    check_output(store, CONFIG)
    write_shard(store, 0, make_samples(0, 5, rejected={0: "empty"}), RUN_INFO)
    write_shard(store, 1, make_samples(1, 4, rejected={1: "empty", 2: "fragmented"}), RUN_INFO)
    store.upload_file(store.join("00001.tar"), "00002.tar")  # an unfinished shard: not counted
    manifest = write_run_files(store, {"config": CONFIG, "fingerprint": FP, "versions": {"skindual": "0.1.0"}})
    assert json.loads(store.read_bytes("sizes.json")) == {"00000.tar": 4, "00001.tar": 2}
    assert json.loads(store.read_bytes("manifest.json")) == manifest
    totals = manifest["totals"]
    assert (totals["shards"], totals["count"], totals["successes"], totals["failed_to_generate"]) == (2, 9, 6, 3)
    assert totals["draws"] == 6 + 3 * 3
    assert totals["rejections"] == {"empty": 2, "fragmented": 1}
    assert sum(c["ok"] for c in totals["per_class"].values()) == 6
    assert manifest["versions"] == {"skindual": "0.1.0"} and manifest["config"] == CONFIG
    with pytest.raises(UserError, match=r"shards \[0, 1\]"):
        write_run_files(store, {"fingerprint": "other"})


def _read_all(url: str, **kw: Any) -> list[dict[str, Any]]:
    return list(read_shards(url, **kw))


def test_read_shards_local_and_s3(tmp_path: Path, s3_env: str, capfd: pytest.CaptureFixture[str]) -> None:
    local, remote = LocalStorage(tmp_path), open_storage(s3_env)
    info = {**RUN_INFO, "image_format": "png"}
    written = {0: make_samples(0, 4, rejected={2: "empty"}), 1: make_samples(1, 3)}
    for store in (local, remote):
        for shard, samples in written.items():
            write_shard(store, shard, samples, info)
        store.upload_file(local.join("00000.tar"), "00005.tar")  # no stats: must not be read
    assert remote.list() == local.list() and is_committed(remote, 1, FP) and committed_shards(remote) == [0, 1]
    assert sha(remote, "00000.tar") == sha(local, "00000.tar")

    expected = [s for shard in (0, 1) for s in written[shard] if s.status == "ok"]
    for url in (local.url, remote.url):
        got = _read_all(url)
        assert [g["key"] for g in got] == [s.key for s in expected]
        for g, s in zip(got, expected):
            assert np.array_equal(g["image"], s.image) and np.array_equal(g["mask"], s.mask)
            assert g["mask"].dtype == np.uint8 and g["class_index"] == s.class_index
            assert g["prompt"] == s.prompt and g["meta"]["row_id"] == s.row_id
    urls = shards.shard_urls(remote.url)
    assert len(urls) == 2 and all(u.startswith("pipe:") and "AWS_SECRET" not in u for u in urls)
    first = next(iter(read_shards([remote.join("00001.tar")])))  # a single tar URL; stop early
    assert first["key"] == "000010000"
    assert [s["__key__"] for s in wds.WebDataset(urls, shardshuffle=False)] == [s.key for s in expected]
    assert shards.main(["cat", remote.join("00009.tar")]) == 1
    assert "shard 00009 of s3://" in capfd.readouterr().err
    # a byte flipped over S3 (same size, _stats.json unchanged): refused before a pair of that shard comes out
    altered = bytearray(local.read_bytes("00001.tar"))
    altered[len(altered) // 2] ^= 0xFF
    remote.write_bytes("00001.tar", bytes(altered))
    with pytest.raises(DataError, match=r"shard 00001 of s3://.*does not match the sha256"):
        next(iter(read_shards([remote.join("00001.tar")])))
    with pytest.raises((OSError, tarfile.ReadError)):
        next(iter(wds.WebDataset(shards.shard_urls([remote.join("00001.tar")]), shardshuffle=False)))
    assert "shard 00001 of s3://" in capfd.readouterr().err


def test_read_shards_tensors_and_errors(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path)
    samples = make_samples(0, 2)
    write_shard(store, 0, samples, {**RUN_INFO, "image_format": "png"})
    got = _read_all(store.url, to_tensors=True)
    assert tuple(got[0]["image"].shape) == (3, SIZE, SIZE) and float(got[0]["image"].max()) <= 1.0
    assert tuple(got[0]["mask"].shape) == (1, SIZE, SIZE)
    assert np.array_equal(got[1]["mask"][0].numpy(), samples[1].mask)
    assert np.allclose(got[1]["image"].permute(1, 2, 0).numpy() * 255, samples[1].image)
    with pytest.raises(UserError, match="no committed shards"):
        read_shards(str(tmp_path / "empty"))
    store.upload_file(store.join("00000.tar"), "00003.tar")  # a tar URL given: read only beside its _stats.json
    with pytest.raises(UserError, match=r"00003.tar: no 00003_stats.json beside it, so it is not committed"):
        read_shards([store.join("00003.tar")])
    with pytest.raises(UserError, match=r"pairs.tar: not a shard's tar"):
        shards.shard_urls([str(tmp_path / "pairs.tar")])


def test_import_loads_neither_torch_nor_webdataset() -> None:
    code = "import sys, skindual.shards, skindual.run_files; print(sorted({'torch', 'webdataset'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_committed_means_intact_a_damaged_shard_is_named_and_never_used(tmp_path: Path) -> None:
    """A tar truncated (or altered) behind its _stats.json: the sizes (one listing) or, read byte by byte, the
    sha256 disagree with what the stats record; a reader refuses the dataset naming the shard, a resume
    (`intact_shards`) writes it again."""
    from skindual.pairs import iter_shard, read_index
    from skindual.shard_store import damaged_shards, intact_shards, readable_shards

    store = LocalStorage(tmp_path / "out")
    for shard in (0, 1, 2):
        write_shard(store, shard, make_samples(shard), RUN_INFO)
    write_run_files(store, {"fingerprint": FP})
    assert damaged_shards(store, verify=True) == {} and intact_shards(store) == {0, 1, 2}
    tar = tmp_path / "out" / "00001.tar"
    whole = tar.read_bytes()
    tar.write_bytes(whole[: len(whole) // 2])  # truncated after its commit marker was written
    assert list(damaged_shards(store)) == [1] and "bytes where its _stats.json records" in damaged_shards(store)[1]
    assert intact_shards(store) == {0, 2}
    for read in (lambda: read_index(store.url, what="--synthetic"), lambda: list(read_shards(store.url))):
        with pytest.raises(UserError, match=r"--synthetic .*shard 00001 does not match its _stats.json|"
                                            r"shard 00001 does not match its _stats.json"):
            read()
    # the same size, other bytes: only the sha256 sees it; a reader streaming the shard stops on it
    altered = bytearray(whole)
    altered[len(altered) // 3] ^= 0xFF
    tar.write_bytes(bytes(altered))
    assert damaged_shards(store) == {} and list(damaged_shards(store, verify=True)) == [1]
    with pytest.raises(UserError, match=r"shard 00001 of .* (does not match the sha256|is damaged)"):
        list(iter_shard(store, 1))
    tar.write_bytes(whole)
    assert readable_shards(store) == [0, 1, 2]


@pytest.mark.parametrize("damage", [b"{\"shard\": 1, \"cou", b"[1, 2]", b"{\"shard\": 1, \"colour\": 3}"])
def test_a_damaged_run_record_is_one_line_and_a_resume_writes_its_shard_again(tmp_path: Path, damage: bytes) -> None:
    """A _stats.json cut short, not an object, or with other fields: a reader refuses naming the file (no
    traceback), a resume (`intact_shards`) takes the shard as damaged and writes it again; a damaged run.json or
    manifest.json is one line naming it."""
    from skindual.run_files import guard_output
    from skindual.shard_store import damaged_shards, intact_shards, unfinished

    store = LocalStorage(tmp_path / "out")
    check_output(store, CONFIG)
    for shard in (0, 1):
        write_shard(store, shard, make_samples(shard), RUN_INFO)
    write_run_files(store, {"fingerprint": FP})
    store.write_bytes("00001_stats.json", damage)
    assert damaged_shards(store) == {1: "its _stats.json is damaged"} and intact_shards(store) == {0}
    with pytest.raises(UserError, match=r"out: shard 00001 .*its _stats.json is damaged; run the job that wrote it "
                                        r"again"):
        list(read_shards(store.url))
    store.write_bytes("run.json", b'{"fingerprint": "')
    with pytest.raises(UserError, match=r"out/run\.json is not .*--overwrite"):
        guard_output(store, CONFIG)
    store.write_bytes("manifest.json", b"[]")
    with pytest.raises(UserError, match=r"out/manifest\.json is not"):
        unfinished(store)


def test_a_shard_listed_but_never_committed_is_refused_unless_partial(tmp_path: Path) -> None:
    """sizes.json names every shard of the run; one without its _stats.json (lost, or the run cut short) makes
    readers refuse, naming it, where they once read the rest silently."""
    from skindual.pairs import read_index

    store = LocalStorage(tmp_path / "out")
    for shard in (0, 1, 2):
        write_shard(store, shard, make_samples(shard), RUN_INFO)
    write_run_files(store, {"fingerprint": FP})
    store.delete("00002_stats.json")
    with pytest.raises(UserError, match=r"sizes.json names 3 shards but 1 of them are not committed \(no "
                                        r"_stats.json: 00002\).*read it with partial=True to use its 2 committed"):
        read_index(store.url)
    with pytest.raises(UserError, match=r"^--real .*: its sizes.json names 3 shards.*pass --partial to use its 2"):
        read_index(store.url, what="--real")  # as a job names it: by its flag, and the job's own --partial
    with pytest.raises(UserError, match="00002"):
        list(read_shards(store.url))
    assert sorted(set(read_index(store.url, partial=True).column("shard").to_pylist())) == [0, 1]
    assert len(list(read_shards(store.url, partial=True))) == 12


def test_a_run_records_its_shards_when_it_starts_and_is_not_read_as_whole_until_it_ends(tmp_path: Path) -> None:
    """`start_run` records the planned shards before the first is written (manifest.json "complete": false,
    sizes.json with every planned shard); a reader refuses the output, even once every shard is committed, until
    the run's end rewrites both.  Kept from an earlier version: a run.json without either file is a run cut
    short; shards with none of the three files were not written by a run, and are read as they are."""
    from skindual.pairs import read_index
    from skindual.run_files import start_run
    from skindual.shard_store import readable_shards, unfinished, unfinished_part

    store = LocalStorage(tmp_path / "out")
    check_output(store, CONFIG)
    start_run(store, FP, {0: 6, 1: 6, 2: 5})
    assert json.loads(store.read_bytes("sizes.json")) == {"00000.tar": 6, "00001.tar": 6, "00002.tar": 5}
    assert json.loads(store.read_bytes("manifest.json")) == {"fingerprint": FP, "complete": False,
                                                              "planned": {"shards": 3, "pairs": 17}}
    write_shard(store, 0, make_samples(0), RUN_INFO)
    write_shard(store, 1, make_samples(1), RUN_INFO)
    assert unfinished(store) == ("the run writing it has not finished (its manifest.json says so; 2 of the 3 "
                                 "shards it planned are committed, not 00002)")
    with pytest.raises(UserError, match=r"^--synthetic .*: the run writing it has not finished .*; run the job that "
                                        r"wrote it again to finish it, or pass --partial to use its 2 committed shards$"):
        readable_shards(store, "--synthetic")
    assert readable_shards(store, partial=True) == [0, 1] and unfinished_part(store) == [0, 1]
    write_shard(store, 2, make_samples(2, 5), RUN_INFO)
    assert "3 of the 3 shards it planned are committed)" in unfinished(store)  # all there, the run not ended
    write_run_files(store, {"fingerprint": FP, "complete": True})
    assert unfinished(store) is None and unfinished_part(store) is None and readable_shards(store) == [0, 1, 2]
    assert json.loads(store.read_bytes("sizes.json")) == {"00000.tar": 6, "00001.tar": 6, "00002.tar": 5}

    store.delete("sizes.json")
    store.delete("manifest.json")  # a run of an earlier version cut short: it deleted both when it started
    with pytest.raises(UserError, match="has a run.json but no manifest.json"):
        read_index(store.url)
    store.delete("run.json")  # shards alone: nothing says what the output should hold
    assert unfinished(store) is None and sorted(set(read_index(store.url).column("shard").to_pylist())) == [0, 1, 2]


def test_written_files_get_the_umasks_mode(tmp_path: Path) -> None:
    import os

    old = os.umask(0o022)
    try:
        store = LocalStorage(tmp_path / "out")
        write_shard(store, 0, make_samples(0), RUN_INFO)
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    finally:
        os.umask(old)
    assert set(modes.values()) == {0o644}, modes


def test_the_readmes_stock_webdataset_recipe_gives_masks_and_ignore_maps(tmp_path: Path, monkeypatch) -> None:
    """The README's stock-webdataset recipe ("Loading the pairs", `card.RECIPES`), run as printed on shards where
    some pairs have an ignore map: every pair comes with a mask and an ignore map (all 0 for the pairs without one)."""
    from skindual.card import RECIPES

    store = LocalStorage(tmp_path / "skindual-synthetic")
    samples = make_samples(0, 4)
    for s in samples[1::2]:
        s.ignore = np.zeros((SIZE, SIZE), np.uint8)
        s.ignore[:3] = 1
    write_shard(store, 0, samples, RUN_INFO)
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {}
    exec(RECIPES["webdataset"], scope)
    read = sorted(scope["pairs"], key=lambda pair: pair[4]["key"])  # the recipe shuffles the shards
    assert len(read) == 4
    for (image, mask, ignore, label, meta), s in zip(read, samples):
        assert image.shape == (SIZE, SIZE, 3) and label == s.class_index and meta["key"] == s.key
        assert np.array_equal(mask, s.mask * 255)
        assert np.array_equal(ignore, s.ignore * 255 if s.ignore is not None else np.zeros((SIZE, SIZE)))
    # read_shards gives the same maps as 0/1 (tensors: 1×H×W)
    for sample, s in zip(read_shards(str(store.root), to_tensors=True), samples):
        assert sample["ignore"].shape == (1, SIZE, SIZE)
        assert int(sample["ignore"].sum()) == (0 if s.ignore is None else 3 * SIZE)


def _flip_a_cls_member(store: LocalStorage, shard: int) -> str:
    """Change the class digit of the shard's last pair in place (same size, _stats.json unchanged); its key."""
    path = Path(store.join(shard_names(shard)[0]))
    raw = bytearray(path.read_bytes())
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".cls")][-1]
    raw[member.offset_data] = ord("6") if raw[member.offset_data] != ord("6") else ord("5")
    path.write_bytes(bytes(raw))
    return member.name.split(".")[0]


def test_a_flipped_byte_is_refused_before_any_pair_of_its_shard_comes_out(tmp_path: Path,
                                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """One byte of a .cls member changed behind an unchanged _stats.json (the sizes agree): every reader
    refuses the shard, naming it, before it hands out one pair of it (read_shards, its .tar URLs, iter_shard,
    stream_pairs, and stock webdataset on shard_urls)."""
    from skindual.pairs import iter_shard, read_index, selection_of, stream_pairs

    store = LocalStorage(tmp_path / "out")
    for shard in (0, 1):
        write_shard(store, shard, make_samples(shard), RUN_INFO)
    selection = selection_of(read_index(store.url))
    _flip_a_cls_member(store, 1)
    refused = r"shard 00001 of .*: its 00001.tar does not match the sha256 its _stats.json records; run the job"
    got: list[str] = []
    with pytest.raises(DataError, match=refused):
        for sample in read_shards(store.url):
            got.append(sample["key"])
    assert got == [s.key for s in make_samples(0)]  # shard 0's pairs, none of shard 1's
    for reader in (lambda: iter(read_shards([store.join("00001.tar")])), lambda: iter_shard(store, 1),
                   lambda: stream_pairs([(store.url, {1: selection[1]})], 16, buffer_size=1)):
        with pytest.raises(DataError, match=refused):
            next(reader())
    stock = iter(wds.WebDataset(shards.shard_urls([store.join("00001.tar")]), shardshuffle=False))
    with pytest.raises((OSError, tarfile.ReadError)):  # `cat` wrote nothing and exited 1: its status, or the
        next(stock)                                    # empty stream, whichever webdataset sees first
    assert f"skindual.shards cat: shard 00001 of {store.url}: its 00001.tar does not match" in capfd.readouterr().err
    assert len(list(wds.WebDataset(shards.shard_urls([store.join("00000.tar")]), shardshuffle=False))) == 6


@pytest.mark.parametrize("case", list(BAD_MEMBERS))
def test_a_member_that_is_not_a_regular_file_of_the_shard_is_one_line(tmp_path: Path, case: str) -> None:
    """A sparse member declaring 1 GiB, a symlink, a hard link, a device, ``../x``, a name outside the key
    pattern or of another shard, a member beyond its size bound, behind a _stats.json that matches the tar:
    iter_shard and read_shards refuse the shard in one line naming it and the member, before any pair, and
    without allocating what a header declares."""
    import tracemalloc

    from skindual.pairs import iter_shard

    store = LocalStorage(tmp_path / "out")
    write_shard(store, 0, make_samples(0), RUN_INFO)
    tamper_shard(store.url, 0, case)
    member = BAD_MEMBERS[case][2]
    for reader in (lambda: iter_shard(store, 0), lambda: iter(read_shards(store.url))):
        tracemalloc.start()
        try:
            with pytest.raises(DataError) as err:
                next(reader())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"shard 00000 of {store.url}: ") and repr(member) in message
        assert "run the job that wrote it again" in message
        assert peak < 16 << 20, f"{case}: {peak:,} bytes allocated"
    assert store.list() == ["00000.parquet", "00000.tar", "00000_stats.json"]  # nothing extracted anywhere
