"""Issue 24, ingest side: the bucket is untrusted. A class folder nobody decided on is quarantined (not written
to the manifest, where it stopped every later night), and no name read back from the bucket (an incoming/
class folder, a manifest row's path or class) becomes a path before it has its one legal form."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from faceclf.cli import build_parser, config_from_args
from faceclf.config import ALLOWED_FORMATS, IngestConfig
from faceclf.dataset.checks import Refused, class_of
from faceclf.dataset.ingest import ingest
from faceclf.dataset.layout import FILE_EXTENSIONS, class_problem, legal_class
from faceclf.dataset.manifest import (
    MANIFEST_KEY,
    QUARANTINE_KEY,
    UNKNOWN_CLASS,
    quarantine_problem,
    read_manifest,
    read_quarantine,
    row_problem,
)
from faceclf.dataset.tree import local_path
from faceclf.store.objects import LocalStore, ObjectInfo
from faceclf.store.registry import set_champion
from faceclf.store.s3 import S3Store
from test_ingest import png, upload

CFG = IngestConfig(workers=4)
SHA = "ab" * 32


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every file below ``root`` (except below ``skip``): relative path -> (size, mtime_ns)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file() and not (skip and p.is_relative_to(skip))}


# ---------------------------------------------------------------------------------------------
# 1. One bad upload never blocks the pipeline: unknown classes are quarantined, or taken when allowed
# ---------------------------------------------------------------------------------------------
def test_unknown_class_is_quarantined_then_taken_when_allowed(bucket: str, tmp_path: Path) -> None:
    store, dest = S3Store(bucket), tmp_path / "face"
    upload(bucket, {f"incoming/{c}/{i}.png": png(40, 40, (i, 7 * k, 9)) for k, c in enumerate(("with_mask", "without_mask"))
                    for i in range(4)})
    first = ingest(store, dest, CFG)  # the very first ingest: every class is taken
    assert (first.new, first.quarantined) == (8, 0)
    assert first.faceset.classes == ("with_mask", "without_mask")
    manifest = store.get_bytes(MANIFEST_KEY)

    upload(bucket, {"incoming/cats/tom.png": png(40, 40, (200, 1, 1))})
    second = ingest(store, dest, CFG)
    assert (second.new, second.quarantined, second.skipped) == (0, 1, 8)
    [q] = second.quarantine
    assert q["key"] == "incoming/cats/tom.png" and q["kind"] == UNKNOWN_CLASS and q["class"] == "cats"
    assert q["reason"] == ("class 'cats' is not one the pipeline knows (known: with_mask, without_mask); rerun "
                           "with allow_new_classes=true to take it")
    assert read_quarantine(store) == [q]
    assert store.get_bytes(MANIFEST_KEY) == manifest  # the manifest is not touched by it
    assert second.faceset.classes == ("with_mask", "without_mask") and not (dest / "train" / "cats").exists()

    third = ingest(store, dest, CFG)  # remembered: not downloaded nor quarantined again
    assert (third.new, third.quarantined, third.skipped) == (0, 0, 9)

    taken = ingest(store, dest, IngestConfig(workers=4, allow_new_classes=True))
    assert (taken.new, taken.quarantined, taken.skipped) == (1, 0, 8)
    assert taken.faceset.classes == ("cats", "with_mask", "without_mask")
    [row] = [r for r in read_manifest(store) if r["key"] == "incoming/cats/tom.png"]
    assert (dest / row["path"]).is_file() and row["class"] == "cats"
    again = ingest(store, dest, CFG)  # now a known class; the object is in the manifest: skipped
    assert (again.new, again.quarantined, again.skipped) == (0, 0, 9)


def test_champion_classes_are_known(tmp_path: Path) -> None:
    """No manifest yet, but a champion: its classes are known (read from champion.json, or as given)."""
    store, dest = LocalStore(tmp_path / "bucket"), tmp_path / "face"
    set_champion(store, "20260101T000000Z-000001", "0" * 64, "test", classes=["with_mask", "without_mask"])
    store.put_bytes("incoming/with_mask/a.png", png(40, 40, (1, 2, 3)))
    store.put_bytes("incoming/happy/b.png", png(40, 40, (3, 2, 1)))
    report = ingest(store, dest, CFG)
    assert report.new == 1 and [q["key"] for q in report.quarantine] == ["incoming/happy/b.png"]
    assert "(known: with_mask, without_mask)" in report.quarantine[0]["reason"]
    # Given by the caller (the flow has read champion.json already): once known, the object is retried.
    retried = ingest(store, dest, CFG, champion_classes=("happy", "with_mask"))
    assert (retried.new, retried.quarantined) == (1, 0)
    assert retried.faceset.classes == ("happy", "with_mask")


def test_first_ingest_takes_every_class(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    for k, cls in enumerate(("a", "b", "c")):
        store.put_bytes(f"incoming/{cls}/x.png", png(40, 40, (k, k, k)))
    report = ingest(store, tmp_path / "face", CFG, champion_classes=())
    assert (report.new, report.quarantined) == (3, 0) and report.faceset.classes == ("a", "b", "c")


def test_cli_ingest_allow_new_classes_option() -> None:
    args = build_parser().parse_args(["ingest", "s3://b", "face", "--allow-new-classes"])
    assert config_from_args(IngestConfig, args).allow_new_classes is True
    assert config_from_args(IngestConfig, build_parser().parse_args(["ingest", "s3://b", "face"])).allow_new_classes is False


# ---------------------------------------------------------------------------------------------
# 2. Class names: one rule for incoming/<class>/ and manifest rows; a folder on every worker OS
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, why", [
    ("", "blank"), ("   ", "blank"), ("x" * 65, "over 64 characters"),
    (".cache", "hidden"), ("..", "hidden"), (".", "hidden"),
    (" cat", "white space"), ("cat ", "white space"), ("cat.", "ends with '.'"),
    ("a:b", "':'"), ("C:", "':'"), ("a/b", "'/'"), ("a\\b", "'\\\\'"), ("a*", "'*'"), ("a?", "'?'"),
    ('a"b', "'\"'"), ("a<b>", "'<'"), ("a|b", "'|'"),
    ("a\x00b", "'\\x00'"), ("a\tb", "'\\t'"), ("a\x7fb", "'\\x7f'"), ("a\u200bb", "'\\u200b'"),  # zero-width space
    ("a\u202eb", "'\\u202e'"), ("a\ud800", "'\\ud800'"), ("a\u2028b", "'\\u2028'"),  # bidi override, surrogate
    ("e\u0301", "NFC"), ("CON", "Windows device"), ("nul", "Windows device"), ("com1.txt", "Windows device"),
    ("LPT9", "Windows device"), ("\U0001f600" * 64, "over 255 bytes"),
])
def test_illegal_class_names(name: str, why: str) -> None:
    problem = class_problem(name)
    assert problem and why in problem and repr(name) in problem, problem
    with pytest.raises(ValueError, match="class name"):
        legal_class(name)
    if "/" not in name and "\x00" not in name and name not in (".", ".."):
        with pytest.raises(Refused):  # the same rule refuses incoming/<class>/ before any download
            class_of(ObjectInfo(f"incoming/{name}/x.png", "e", 10), CFG)


@pytest.mark.parametrize("name", ["with_mask", "without_mask", "train", "val", "test", "a b", "é", "猫", "a.b",
                                  "CONSOLE", "com10", "x" * 64, "-", "a_b-c.d"])
def test_legal_class_names(name: str) -> None:
    """Split names are fine as classes: a class folder sits below its split's (dest/train/train/...)."""
    assert class_problem(name) is None and legal_class(name) == name
    assert class_of(ObjectInfo(f"incoming/{name}/x.png", "e", 10), CFG) == name


def test_every_allowed_format_has_its_file_extension() -> None:
    assert FILE_EXTENSIONS.keys() == set(ALLOWED_FORMATS)
    with pytest.raises(ValueError, match="allowed_formats must be some of"):
        IngestConfig(allowed_formats=("GIF",))


# ---------------------------------------------------------------------------------------------
# 3. Manifest rows: the one legal form, else the run stops naming the line
# ---------------------------------------------------------------------------------------------
def good_row(**change: object) -> dict[str, object]:
    row = {"key": "incoming/with_mask/a.png", "etag": "e", "size": 10, "sha256": SHA, "class": "with_mask",
           "split": "train", "path": f"train/with_mask/{SHA}.png", "format": "PNG", "width": 40, "height": 40,
           "ingested_at": "2026-01-01T00:00:00+00:00", "status": "ok"}
    return {**row, **change}


@pytest.mark.parametrize("change, why", [
    ({"path": "../../x"}, "is not <split>/<class>/"),
    ({"path": f"train/../{SHA}.png"}, "hidden"),
    ({"path": f"/train/with_mask/{SHA}.png"}, "is not <split>/<class>/"),
    ({"path": f"train/with_mask/sub/{SHA}.png"}, "is not <split>/<class>/"),
    ({"path": f"train\\with_mask\\{SHA}.png"}, "is not <split>/<class>/"),
    ({"path": f"train/with_mask/{SHA}.gif"}, "extension 'gif'"),
    ({"path": f"train/with_mask/{SHA}.png/"}, "is not <split>/<class>/"),
    ({"path": f"models/with_mask/{SHA}.png"}, "split 'models'"),
    ({"path": f"val/with_mask/{SHA}.png"}, "the row's own split, class and sha256"),
    ({"path": f"train/without_mask/{SHA}.png"}, "the row's own split, class and sha256"),
    ({"path": f"train/with_mask/{'cd' * 32}.png"}, "the row's own split, class and sha256"),
    ({"path": ["train", "with_mask"]}, "is not <split>/<class>/"),
    ({"sha256": SHA.upper()}, "64 lowercase hex"),
    ({"sha256": SHA[:-1]}, "64 lowercase hex"),
    ({"split": "../train"}, "split '../train'"),
    ({"class": "a:b", "path": f"train/a:b/{SHA}.png"}, "':'"),
    ({"class": "..", "path": f"train/../{SHA}.png"}, "hidden"),
    ({"class": ["with_mask"]}, "not text"),
    ({"status": "deleted"}, "status 'deleted'"),
    ({"size": "10"}, "whole number of bytes"),
    ({"size": -1}, "whole number of bytes"),
    ({"key": 5}, "must be text"),
    ({"width": "40"}, "whole number of pixels"),
])
def test_illegal_manifest_rows(change: dict[str, object], why: str) -> None:
    problem = row_problem(good_row(**change))
    assert problem and why in problem, problem


def test_legal_manifest_rows() -> None:
    assert row_problem(good_row()) is None
    assert row_problem(good_row(status="duplicate", duplicate_of="incoming/with_mask/b.png")) is None
    assert row_problem(good_row(status="conflict", conflict_with="k", conflict_class="x")) is None
    assert row_problem({k: v for k, v in good_row().items() if k not in ("status", "width", "height")}) is None
    assert row_problem(good_row(**{"class": "train", "path": f"test/train/{SHA}.webp", "split": "test"})) is None


def test_quarantine_rows_are_plain() -> None:
    """No quarantine field becomes a path (key, class, reason are compared and logged); they are held to plain
    types, so a crafted row cannot crash a night with a TypeError far from where it was read."""
    assert quarantine_problem({"key": "k", "etag": "e", "size": 1, "reason": "r", "at": "t"}) is None
    assert "whole number" in quarantine_problem({"key": "k", "etag": "e", "size": "x", "reason": "r"})
    assert "class must be text" in quarantine_problem({"key": "k", "etag": "e", "size": 1, "class": ["a"]})


@pytest.mark.parametrize("rel", ["../../x", "../face2/x.png", f"train/with_mask/../../../{SHA}.png", "/etc/passwd",
                                 f"train/a:b/{SHA}.png", f"train/with_mask/{SHA}.exe"])
def test_local_path_refuses_anything_but_an_image_path(rel: str, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="image path"):
        local_path(tmp_path / "face", rel)
    assert local_path(tmp_path / "face", f"val/x/{SHA}.jpg") == tmp_path / "face" / "val" / "x" / f"{SHA}.jpg"


def test_hostile_manifest_in_the_bucket_stops_ingest_before_any_write(bucket: str, tmp_path: Path) -> None:
    """A manifest.jsonl whose rows name '../../x' paths: an "ok" row (restore_missing would write the image there)
    and a "conflict" row (withdraw_conflicts would delete there). Ingest refuses, naming the line; nothing outside
    dest is written or removed, and the bucket is left as it was."""
    store, dest = S3Store(bucket), tmp_path / "work" / "face"
    victim = tmp_path / "victim.png"
    victim.write_bytes(b"precious")
    face = png(40, 40, (5, 6, 7))
    sha = hashlib.sha256(face).hexdigest()
    good = good_row(key="incoming/with_mask/good.png", sha256=SHA, path=f"train/with_mask/{SHA}.png")
    escape = good_row(key="incoming/with_mask/a.png", sha256=sha, path="../../x.png", etag="e2")
    withdraw = good_row(key="incoming/with_mask/b.png", sha256=sha, path="../../victim.png", status="conflict")
    manifest = "".join(json.dumps(r) + "\n" for r in (good, escape, withdraw)).encode()
    upload(bucket, {MANIFEST_KEY: manifest, "incoming/with_mask/a.png": face, "incoming/cats/c.png": face})
    before = snapshot(tmp_path)
    objects = {o.key: o.etag for o in store.list("")}

    with pytest.raises(ValueError) as err:
        ingest(store, dest, CFG)
    message = str(err.value)
    assert f"s3://{bucket}/{MANIFEST_KEY} line 2: image path '../../x.png' is not <split>/<class>/" in message
    assert "Fix or remove that line" in message
    assert snapshot(tmp_path) == before and victim.read_bytes() == b"precious"
    assert not dest.exists()
    assert {o.key: o.etag for o in store.list("")} == objects and not store.exists(QUARANTINE_KEY)


def test_hostile_manifest_in_a_local_bucket(tmp_path: Path) -> None:
    """The same from a local folder, with a row whose class is not a legal folder name."""
    store, dest = LocalStore(tmp_path / "bucket"), tmp_path / "face"
    store.put_bytes("incoming/a/x.png", png())
    row = good_row(**{"class": "x\\..\\y", "path": f"train/x\\..\\y/{SHA}.png"})
    store.put_bytes(MANIFEST_KEY, (json.dumps(good_row()) + "\n\n" + json.dumps(row) + "\n").encode())
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match=r"manifest.jsonl line 3: class name .* holds '\\\\'"):
        ingest(store, dest, CFG)
    assert snapshot(tmp_path) == before and not dest.exists()
    assert os.listdir(tmp_path) == ["bucket"]
