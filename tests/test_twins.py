"""Near-duplicates never straddle train / val / test: augmented copies (noise, a resize, a small rotation, a
re-encode) land in their original's split, through `faceclf train DATA` and through nights of ingest on the S3
endpoint; placement is stable across nights; `faceclf resplit` moves the twins an older bucket holds across
splits, re-scores the champion and records it in champion.json's history."""

from __future__ import annotations

import csv
from pathlib import Path

from conftest import TWIN_KINDS, twin_images

from faceclf.cli import main
from faceclf.config import IngestConfig
from faceclf.dataset.ingest import ingest
from faceclf.dataset.layout import split_of
from faceclf.dataset.manifest import read_manifest, write_manifest
from faceclf.dataset.placement import twin_counts
from faceclf.dataset.resplit import resplit
from faceclf.devtools.sample import generate_sample_faces
from faceclf.store import registry
from faceclf.store.objects import open_store
from faceclf.store.s3 import s3_client

FRACTIONS = (0.8, 0.1, 0.1)


def with_twins(root: Path, per_class: int, seed: int, originals: int) -> dict[str, list[str]]:
    """Generated faces in root/<class>/, and the four twins of the first ``originals`` of each class beside them;
    {original file name: [its twins' file names]}."""
    generate_sample_faces(root, per_class=per_class, size=64, seed=seed)
    family: dict[str, list[str]] = {}
    for cls_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for src in sorted(cls_dir.glob("*.*"))[:originals]:
            names = []
            for kind, data in twin_images(src, seed).items():
                name = f"twin-{kind}-{src.stem}.{'png' if kind == 'noise' else 'jpg'}"
                (cls_dir / name).write_bytes(data)
                names.append(name)
            family[src.name] = names
    return family


def test_twins_share_a_split_in_faceclf_train_data(tmp_path: Path) -> None:
    family = with_twins(tmp_path / "data", per_class=30, seed=5, originals=8)
    code = main(["-q", "train", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--image-size", "32", "--channels", "8", "16", "--workers", "2", "--min-accuracy", "0",
                 "--min-class-accuracy", "0"])
    assert code in (0, 1)  # trained (the gate's verdict on one epoch does not matter here)
    with open(tmp_path / "run" / "splits.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    split = {Path(r["path"]).name: r["split"] for r in rows}
    sha = {Path(r["path"]).name: r["sha256"] for r in rows}
    moved = 0
    for original, twins in family.items():
        assert {split[t] for t in twins} == {split[original]}, (original, {t: split[t] for t in twins})
        moved += sum(split_of(sha[t], FRACTIONS) != split[t] for t in twins)
    assert moved, "no twin's own hash pointed elsewhere: the test would pass without near-duplicate placement"


def upload(bucket: str, root: Path, prefix: str) -> dict[str, str]:
    """Put root/<class>/<name> under incoming/<class>/<prefix>-<name>; {file name: key}."""
    client, keys = s3_client(), {}
    for p in sorted(root.rglob("*.*")):
        keys[p.name] = f"incoming/{p.parent.name}/{prefix}-{p.name}"
        client.put_object(Bucket=bucket, Key=keys[p.name], Body=p.read_bytes())
    return keys


def test_twins_arriving_on_a_later_night_join_their_originals_split(bucket: str, tmp_path: Path) -> None:
    store, face = open_store(f"s3://{bucket}"), tmp_path / "face"
    generate_sample_faces(tmp_path / "n1", per_class=30, size=64, seed=6)
    keys = upload(bucket, tmp_path / "n1", "n1")
    first = ingest(store, face)
    assert first.new == 60 and first.joined_twins == 0
    placed = {r["key"]: r["split"] for r in read_manifest(store)}

    # Night 2: the four twins of 10 originals per class, as separate uploads.
    twins: dict[str, str] = {}
    for name, key in keys.items():
        if len(twins) >= 80:
            break
        cls = key.split("/")[1]
        for kind, data in twin_images(tmp_path / "n1" / cls / name).items():
            twins[f"incoming/{cls}/n2-{kind}-{name}"] = key
            s3_client().put_object(Bucket=bucket, Key=f"incoming/{cls}/n2-{kind}-{name}", Body=data)
    second = ingest(store, face)
    rows = {r["key"]: r for r in read_manifest(store)}
    assert second.new == len(twins) and second.joined_twins == len(twins)
    assert {k: rows[k]["split"] for k in placed} == placed  # nothing placed moved
    assert all(rows[twin]["split"] == placed[original] for twin, original in twins.items())
    assert any(split_of(rows[t]["sha256"], FRACTIONS) != rows[t]["split"] for t in twins), "no twin tested placement"
    assert second.twins == {"val": 0, "test": 0}
    assert all((face / rows[t]["path"]).is_file() for t in twins)

    # Night 3: nothing new; every image keeps its split and file.
    third = ingest(store, face)
    assert third.new == 0 and {r["key"]: r["split"] for r in read_manifest(store)} == {k: r["split"] for k, r in rows.items()}


def legacy_bucket(bucket: str, tmp_path: Path) -> Path:
    """A bucket ingested before near-duplicates decided the split: twins placed by their own hash, and manifest rows
    without a stored signature."""
    with_twins(tmp_path / "data", per_class=40, seed=7, originals=12)
    upload(bucket, tmp_path / "data", "old")
    store, face = open_store(f"s3://{bucket}"), tmp_path / "face"
    report = ingest(store, face, IngestConfig(near_distance=0))  # 0 bits: only identical hashes join
    rows = read_manifest(store)
    for r in rows:
        r.pop("phash", None)
        if r["status"] == "ok":  # the split its hash alone gives, as ingest placed images before
            old = split_of(r["sha256"], FRACTIONS)
            if old != r["split"]:
                target = face / old / r["class"] / Path(r["path"]).name
                target.parent.mkdir(parents=True, exist_ok=True)
                (face / r["path"]).rename(target)
                r.update(split=old, path=f"{old}/{r['class']}/{Path(r['path']).name}")
    write_manifest(store, rows)
    assert report.new == len(rows)
    return face


def test_resplit_moves_test_twins_to_train_records_it_and_rescores_the_champion(bucket: str, tmp_path: Path,
                                                                                onnx_model: Path) -> None:
    face = legacy_bucket(bucket, tmp_path)
    store = open_store(f"s3://{bucket}")
    version = "20261201T021500Z-abc123"
    registry.publish_version(store, version, {"model.onnx": onnx_model})
    sha = registry.sha256_bytes(onnx_model.read_bytes())
    registry.set_champion(store, version, sha, "first night", {"accuracy": 1.0}, ["with_mask", "without_mask"])
    before = read_manifest(store)

    # A dry run says what would move and moves nothing.
    assert main(["-q", "resplit", f"s3://{bucket}", str(face), "--dry-run"]) == 0
    assert read_manifest(store) == before

    report = resplit(store, face, work_dir=tmp_path / "work")
    after = read_manifest(store)
    assert report.signed == sum(r["status"] == "ok" for r in before) and all("phash" in r for r in after
                                                                          if r["status"] == "ok")
    assert report.twins_before["test"] + report.twins_before["val"] > 0, "the legacy bucket had no straddling twins"
    assert report.twins_after == {"val": 0, "test": 0}
    assert sum(report.moved.values()) > 0 and all(k in ("val->train", "test->train", "test->val") for k in report.moved)
    assert report.test_after == report.test_before - report.moved.get("test->train", 0) - report.moved.get("test->val", 0)
    moved = [r for r in after if "resplit_from" in r]
    assert len(moved) == sum(report.moved.values())
    for r in moved:
        assert (face / r["path"]).is_file() and not (face / r["resplit_from"] / r["class"] / Path(r["path"]).name).exists()
    # The night's count, from the stored hashes, agrees that no test image has a train twin left.
    assert twin_counts(((r["split"], int(r["phash"], 16)) for r in after if r["status"] == "ok"), 4)["test"] == 0

    champion = registry.read_champion(store)
    entry = champion["history"][-1]
    assert entry["version"] == version and entry["moved"] == report.moved and "resplit_at" in entry
    assert entry["test_images"] == {"before": report.test_before, "after": report.test_after}
    assert champion["test_accuracy"] == entry["test_accuracy"]["after"] == report.champion["accuracy_after"]
    assert 0.0 <= entry["test_accuracy"]["before"] <= 1.0

    # Nothing straddles any more: a second resplit moves nothing and records nothing.
    again = resplit(store, face, work_dir=tmp_path / "work")
    assert again.moved == {} and registry.read_champion(store)["history"] == champion["history"]
