"""skindual.storage against a local temp dir and a real SeaweedFS S3 server (tests/s3server.py)."""

from __future__ import annotations

import hashlib
import os
import pickle
import socket
import time
from pathlib import Path

import pytest
from s3server import S3Server

from skindual import storage as storage_mod
from skindual.errors import StorageError
from skindual.storage import LocalStorage, S3Storage, is_remote, open_storage

PART = 5 * 1024 * 1024  # S3's smallest multipart part


@pytest.fixture(params=["local", "s3"])
def root_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh storage root: a local directory, or a fresh bucket prefix on SeaweedFS."""
    if request.param == "local":
        return str(tmp_path / "root")
    return str(request.getfixturevalue("s3_env"))


def test_bytes_round_trip(root_url: str) -> None:
    store = open_storage(root_url)
    store.write_bytes("a/b/one.json", b'{"x": 1}')
    assert store.read_bytes("a/b/one.json") == b'{"x": 1}'
    store.write_bytes("a/b/one.json", b"replaced")
    assert store.read_bytes("a/b/one.json") == b"replaced"
    store.write_bytes("empty", b"")
    assert store.read_bytes("empty") == b""
    assert store.exists("a/b/one.json") and not store.exists("a/b/two.json")
    assert not store.exists("a/b")  # a "directory" is not a file
    assert store.join("a/b/one.json") == root_url.rstrip("/") + "/a/b/one.json"


def test_list_and_delete(root_url: str) -> None:
    store = open_storage(root_url)
    assert store.list() == []
    for name in ["shards/00001.tar", "shards/00000.tar", "shards/stats/00000.parquet",
                 "manifest.json", "shards_old/x"]:
        store.write_bytes(name, name.encode())
    assert store.list() == ["manifest.json", "shards/00000.tar", "shards/00001.tar",
                            "shards/stats/00000.parquet", "shards_old/x"]
    assert store.list("shards/") == ["shards/00000.tar", "shards/00001.tar",
                                     "shards/stats/00000.parquet"]
    assert store.list("shards") == store.list("shards/") + ["shards_old/x"]
    assert store.list("shards/0000") == ["shards/00000.tar", "shards/00001.tar"]
    assert store.list("nothing/") == []
    store.delete("shards/00000.tar")
    store.delete("shards/00000.tar")  # deleting a missing file is fine
    assert not store.exists("shards/00000.tar")
    assert store.list("shards/") == ["shards/00001.tar", "shards/stats/00000.parquet"]


def test_listing_gives_each_files_size_and_a_stamp_that_a_rewrite_changes(root_url: str) -> None:
    """A listing's stamp (S3's ETag, a folder's mtime) is what lets a rerun trust a file without reading it."""
    store = open_storage(root_url)
    store.write_bytes("a/x.bin", b"12345")
    store.write_bytes("y", b"")
    listed = store.listing()
    assert {n: f.size for n, f in listed.items()} == {"a/x.bin": 5, "y": 0} == store.sizes()
    assert store.listing("a/") == {"a/x.bin": listed["a/x.bin"]}  # unchanged: the same stamp
    assert listed["a/x.bin"].stamp.startswith("etag:" if is_remote(root_url) else "mtime_ns:")
    time.sleep(0.05)  # past a coarse file-system clock's tick
    store.write_bytes("a/x.bin", b"54321")  # the same size, written again
    again = store.listing()["a/x.bin"]
    assert again.size == 5 and again.stamp != listed["a/x.bin"].stamp


def test_missing_file_is_file_not_found(root_url: str, tmp_path: Path) -> None:
    store = open_storage(root_url)
    store.write_bytes("present", b"x")  # the location itself exists
    with pytest.raises(FileNotFoundError):
        store.read_bytes("absent.bin")
    with pytest.raises(FileNotFoundError):
        store.download_file("absent.bin", tmp_path / "out.bin")


def test_upload_and_download_big_file_multipart(root_url: str, tmp_path: Path) -> None:
    data = os.urandom(2 * PART + 12345)  # three parts
    src = tmp_path / "shard.tar"
    src.write_bytes(data)
    store = open_storage(root_url, part_size=PART)
    store.upload_file(src, "shards/00000.tar")
    assert store.list("shards/") == ["shards/00000.tar"]
    if isinstance(store, S3Storage):  # a multipart upload's ETag is "<md5 of part md5s>-<parts>"
        head = store._s3().head_object(Bucket=store.bucket, Key=store._key("shards/00000.tar"))
        assert head["ETag"].strip('"').endswith("-3") and head["ContentLength"] == len(data)
    dst = tmp_path / "down" / "deeper" / "shard.tar"
    store.download_file("shards/00000.tar", dst)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert store.read_bytes("shards/00000.tar") == data


def test_pickled_storage_works(root_url: str) -> None:
    store = open_storage(root_url)
    store.write_bytes("before", b"1")  # the original now holds a live client
    copy = pickle.loads(pickle.dumps(store))
    assert type(copy) is type(store) and copy.url == store.url
    copy.write_bytes("after", b"2")
    assert store.read_bytes("after") == b"2" and copy.read_bytes("before") == b"1"


@pytest.mark.parametrize("name", ["", "/abs", "../up", "a/../b", "a//b", "./a", "a\\b", "a/"])
def test_bad_names_are_rejected(root_url: str, name: str) -> None:
    with pytest.raises(ValueError):
        open_storage(root_url).write_bytes(name, b"x")


def test_open_storage_parses_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert isinstance(open_storage("rel/dir"), LocalStorage)
    assert open_storage("rel/dir").url == str(tmp_path / "rel" / "dir")  # absolute for Ray workers
    assert open_storage(f"file://{tmp_path}/x").url == str(tmp_path / "x")
    assert open_storage(tmp_path).url == str(tmp_path)
    s3 = open_storage("s3://bucket/a/b/")
    assert isinstance(s3, S3Storage) and (s3.bucket, s3.prefix) == ("bucket", "a/b/")
    assert open_storage("s3://bucket").join("k") == "s3://bucket/k"
    assert is_remote("s3://bucket/x") and not is_remote(tmp_path) and not is_remote("file:///x")
    with pytest.raises(StorageError, match="needs a bucket"):
        open_storage("s3:///prefix")
    with pytest.raises(StorageError, match="unsupported"):
        open_storage("gs://bucket/x")


def test_explicit_endpoint_beats_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    from_env = open_storage("s3://b/p")
    explicit = open_storage("s3://b/p", s3_endpoint="http://127.0.0.1:2")
    assert from_env._s3().meta.endpoint_url == "http://127.0.0.1:1"
    assert explicit._s3().meta.endpoint_url == "http://127.0.0.1:2"
    assert explicit._s3().meta.config.s3["addressing_style"] == "path"
    monkeypatch.setenv("SKINDUAL_S3_ADDRESSING_STYLE", "virtual")
    assert open_storage("s3://b/p")._s3().meta.config.s3["addressing_style"] == "virtual"


# --- local atomicity ------------------------------------------------------------------------


def _all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_local_final_name_appears_only_complete(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_storage(tmp_path)
    data = os.urandom(1 << 20)
    seen = []
    real_replace = os.replace

    def checking_replace(src: str, dst: str | os.PathLike[str]) -> None:
        seen.append((Path(dst).exists(), Path(src).read_bytes() == data, Path(src).parent))
        real_replace(src, dst)

    monkeypatch.setattr(storage_mod.os, "replace", checking_replace)
    store.write_bytes("d/file.bin", data)
    src = tmp_path / "src.bin"
    src.write_bytes(data)
    store.upload_file(src, "d/up.bin")
    assert seen == [(False, True, tmp_path / "d")] * 2  # complete temp file in the same dir
    assert _all_files(tmp_path) == ["d/file.bin", "d/up.bin", "src.bin"]  # no temp file left


def test_local_failed_write_leaves_old_file_and_no_temp(tmp_path: Path) -> None:
    store = open_storage(tmp_path)
    store.write_bytes("f.bin", b"old")
    with pytest.raises(TypeError):
        store.write_bytes("f.bin", "not bytes")  # type: ignore[arg-type]
    with pytest.raises(FileNotFoundError):
        store.upload_file(tmp_path / "missing-source", "g.bin")
    assert _all_files(tmp_path) == ["f.bin"] and store.read_bytes("f.bin") == b"old"


def test_local_list_skips_leftover_temp_files(tmp_path: Path) -> None:
    store = open_storage(tmp_path)
    store.write_bytes("a/x", b"1")
    (tmp_path / "a" / ".tmp-skindual-crashed").write_bytes(b"partial")
    assert store.list() == ["a/x"]


def test_local_check(tmp_path: Path) -> None:
    open_storage(tmp_path / "new" / "dir").check()  # writable, and nothing made: a job refused later leaves no trace
    assert not (tmp_path / "new").exists() and _all_files(tmp_path) == []
    (tmp_path / "file").write_bytes(b"")
    with pytest.raises(StorageError, match=str(tmp_path / "file")):
        open_storage(tmp_path / "file" / "sub").check()


# --- S3 failures ------------------------------------------------------------------------------


def test_s3_check_passes_on_a_usable_bucket(s3_env: str) -> None:
    open_storage(s3_env).check()


@pytest.mark.parametrize("wrong", ["secret", "key"])
def test_s3_wrong_credentials(s3_env: str, s3_server: S3Server, wrong: str,
                              monkeypatch: pytest.MonkeyPatch) -> None:
    bad_secret = "wrong-secret-" + "x" * 20
    if wrong == "secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", bad_secret)
    else:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKNOSUCHKEY")
    store = open_storage(s3_env)
    for call in (store.check, lambda: store.write_bytes("k", b"x"), lambda: store.read_bytes("k"),
                 store.list):
        with pytest.raises(StorageError) as info:
            call()
        message = str(info.value)
        assert "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY" in message and s3_env in message
        assert bad_secret not in message and s3_server.secret_key not in message


def test_s3_missing_bucket(s3_env: str, s3_server: S3Server, tmp_path: Path) -> None:
    store = open_storage("s3://no-such-bucket-here/run")
    src = tmp_path / "f"
    src.write_bytes(b"x")
    for call in (store.check, lambda: store.write_bytes("k", b"x"), lambda: store.read_bytes("k"),
                 store.list, lambda: store.upload_file(src, "k")):
        with pytest.raises(StorageError, match="bucket no-such-bucket-here does not exist") as info:
            call()
        assert s3_server.endpoint in str(info.value)


def test_s3_unreachable_endpoint_fails_fast(s3_env: str) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nobody listens on it
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
    store = open_storage(s3_env, s3_endpoint=endpoint)
    start = time.monotonic()
    with pytest.raises(StorageError, match=f"cannot reach S3 at endpoint {endpoint} .*; check --s3-endpoint"):
        store.check()
    assert time.monotonic() - start < 10


def test_s3_no_credentials(s3_env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(StorageError, match="no usable AWS credentials.*AWS_ACCESS_KEY_ID"):
        open_storage(s3_env).check()
