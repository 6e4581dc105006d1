"""The Store interface, on a local folder and on a real S3 endpoint (moto server on 127.0.0.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faceclf.store import objects
from faceclf.store.objects import LocalStore, Store, open_store, safe_key
from faceclf.store.registry import (
    MODEL_FILE,
    PublishRecord,
    begin_publish,
    fetch_model,
    finish_publish,
    read_champion,
    read_latest,
    set_champion,
    sha256_bytes,
    unfinished_publish,
    version_key,
)
from faceclf.store.s3 import S3Store, s3_client


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Store:
    if request.param == "local":
        return LocalStore(tmp_path / "bucket")
    return open_store(f"s3://{request.getfixturevalue('bucket')}")


def test_put_get_list_exists(store: Store, tmp_path: Path) -> None:
    store.put_bytes("incoming/a/1.jpg", b"one")
    store.put_bytes("incoming/b/2.jpg", b"two!")
    (tmp_path / "f.bin").write_bytes(b"file")
    store.put_file("models/face/v1/model.onnx", tmp_path / "f.bin")
    assert store.get_bytes("incoming/a/1.jpg") == b"one"
    listed = list(store.list("incoming/"))
    assert [(o.key, o.size) for o in listed] == [("incoming/a/1.jpg", 3), ("incoming/b/2.jpg", 4)]
    assert all(o.etag for o in listed)
    assert store.exists("models/face/v1/model.onnx") and not store.exists("models/face/v2/model.onnx")
    with pytest.raises(FileNotFoundError):
        store.get_bytes("nope")
    store.download("incoming/b/2.jpg", tmp_path / "out" / "2.jpg")
    assert (tmp_path / "out" / "2.jpg").read_bytes() == b"two!"


def test_etag_changes_with_content(store: Store) -> None:
    store.put_bytes("k", b"v1")
    first = next(iter(store.list("k"))).etag
    store.put_bytes("k", b"v2")
    assert next(iter(store.list("k"))).etag != first


def test_list_stat_lists_what_list_lists(store: Store) -> None:
    for key in ("p/a/b.jpg", "p/a-c.jpg", "p/a0.jpg", "q/other.jpg"):
        store.put_bytes(key, key.encode())
    listed = list(store.list("p/"))
    assert [o.key for o in listed] == ["p/a-c.jpg", "p/a/b.jpg", "p/a0.jpg"]  # string order, as S3 lists
    assert [(o.key, o.size) for o in store.list_stat("p/")] == [(o.key, o.size) for o in listed]
    assert [o.key for o in store.list_stat("p/a", start_after="p/a-c.jpg")] == ["p/a/b.jpg", "p/a0.jpg"]
    if not isinstance(store, LocalStore):
        assert list(store.list_stat("p/")) == listed  # a bucket's listed ETag is already cheap


def test_local_list_stat_reads_no_file_and_notices_a_rewrite(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = LocalStore(tmp_path / "bucket")
    for key in ("p/a/b.jpg", "p/a-c.jpg", "p/a0.jpg", "p/z/.x.jpg.tmp", "pq/c.jpg", "q/d.jpg"):
        store.put_bytes(key, key.encode())
    keys = [o.key for o in store.list("p")]
    monkeypatch.setattr(objects, "sha256_file", lambda path: pytest.fail(f"list_stat read {path}"))
    listed = list(store.list_stat("p"))
    assert [(o.key, o.size) for o in listed] == [(k, len(k)) for k in keys]
    assert keys == sorted(keys) == ["p/a-c.jpg", "p/a/b.jpg", "p/a0.jpg", "pq/c.jpg"]  # no write under way
    path = tmp_path / "bucket" / "p" / "a" / "b.jpg"
    st = path.stat()
    assert listed[1].etag == f"{st.st_size:x}-{st.st_mtime_ns:x}"  # what LocalSource lists for a local file
    path.write_bytes(b"P/A/B.JPG")  # same size: the mtime tells
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert [o.etag != e.etag for o, e in zip(store.list_stat("p"), listed)] == [False, True, False, False]


def test_s3_listing_is_paginated(bucket: str) -> None:
    client = s3_client()
    for i in range(1005):
        client.put_object(Bucket=bucket, Key=f"incoming/x/{i:05d}.jpg", Body=b"x")
    assert len(list(S3Store(bucket).list("incoming/"))) == 1005


@pytest.mark.parametrize("key", ["", "/etc/passwd", "a/../../b", "a\\b", "a/\x00b", "./a", "a//b", "x" * 300])
def test_unsafe_keys_are_refused(key: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        safe_key(key)
    with pytest.raises(ValueError):
        LocalStore(tmp_path).put_bytes(key, b"x")
    assert not any(tmp_path.parent.glob("passwd"))


def test_fetch_model_keeps_a_verified_copy_and_replaces_a_wrong_one(store: Store, tmp_path: Path) -> None:
    data, v1 = b"an onnx model's bytes", "20261101T000000Z-111111"
    store.put_bytes(version_key(v1, MODEL_FILE), data)
    dest = tmp_path / "run" / "champion.onnx"
    assert fetch_model(store, v1, dest, sha256_bytes(data)).read_bytes() == data
    store.delete(version_key(v1, MODEL_FILE))  # a second fetch of the same model must not need the store
    assert fetch_model(store, v1, dest, sha256_bytes(data)).read_bytes() == data
    dest.write_bytes(data[:5])  # a torn or stale copy is not kept: it is fetched again (here: gone, so an error)
    with pytest.raises(FileNotFoundError):
        fetch_model(store, v1, dest, sha256_bytes(data))
    store.put_bytes(version_key(v1, MODEL_FILE), data)
    assert fetch_model(store, v1, dest, sha256_bytes(data)).read_bytes() == data


def record(version: str, promote: bool = True, previous: str | None = None) -> PublishRecord:
    """A publish record as the night writes it (test metrics and data reduced to what the pointers keep)."""
    return PublishRecord(version, promote, "ab" * 32 if promote else None, "promoted: test", previous,
                         {"accuracy": 0.95}, ["a", "b"], "test", 10, "fp-" + version)


def test_finishing_a_publish_is_idempotent_and_never_overrides_a_person(store: Store) -> None:
    """champion.json then latest.json, once; a champion a person moved since the night read it stays."""
    begin_publish(store, record("20261201T000000Z-aaaaaa"))
    assert unfinished_publish(store) == record("20261201T000000Z-aaaaaa")
    finish_publish(store, record("20261201T000000Z-aaaaaa"))
    finish_publish(store, record("20261201T000000Z-aaaaaa"))  # a rerun of a finished publish changes nothing
    champion = read_champion(store)
    assert champion["version"] == "20261201T000000Z-aaaaaa" and len(champion["history"]) == 1
    assert read_latest(store)["version"] == "20261201T000000Z-aaaaaa" and unfinished_publish(store) is None

    # Night 2 was gated against ...aaaaaa, but a person promoted ...bbbbbb before its publish finished.
    set_champion(store, "20261202T000000Z-bbbbbb", "cd" * 32, "manual promote")
    night2 = record("20261203T000000Z-cccccc", previous="20261201T000000Z-aaaaaa")
    begin_publish(store, night2)
    assert finish_publish(store, night2)["version"] == "20261202T000000Z-bbbbbb"
    assert read_champion(store)["version"] == "20261202T000000Z-bbbbbb"
    assert read_latest(store)["version"] == "20261203T000000Z-cccccc" and unfinished_publish(store) is None

    # A rejected candidate's publish moves latest.json only.
    night3 = record("20261204T000000Z-dddddd", promote=False, previous="20261202T000000Z-bbbbbb")
    begin_publish(store, night3)
    finish_publish(store, night3)
    assert read_champion(store)["version"] == "20261202T000000Z-bbbbbb"
    assert read_latest(store) | {"published_at": None} == {
        "version": "20261204T000000Z-dddddd", "promoted": False, "images": 10,
        "data_fingerprint": "fp-20261204T000000Z-dddddd", "published_at": None}
