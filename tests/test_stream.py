"""Streaming bulk scoring: S3 prefix to S3 parts, incremental reruns, bounded memory, links, Ray Data."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from test_cli import faceclf

from faceclf.config import ScoreConfig
from faceclf.serving.onnx_model import load_onnx_model
from faceclf.serving.output import WRITTEN_BY, Destination, PredictionOutput, columns
from faceclf.serving.sources import Item, LocalSource, NoImages
from faceclf.serving.stream import score_images, score_items
from faceclf.store.objects import LocalStore
from faceclf.store.s3 import s3_client

CPU = ScoreConfig(device="cpu", part_rows=8, batch_size=4)


def images_of(faces: Path, n: int) -> list[Path]:
    """``n`` face files, both classes."""
    return sorted(faces.rglob("*.jpg"))[:n // 2] + sorted(faces.rglob("*.png"))[:n - n // 2]


def upload(bucket: str, files: list[Path], prefix: str = "to-score/") -> list[str]:
    """Put each file at prefix/<class>/<name>; returns the keys in sorted order."""
    client = s3_client()
    keys = []
    for p in files:
        key = f"{prefix}{p.parent.name}/{p.name}"
        client.put_object(Bucket=bucket, Key=key, Body=p.read_bytes())
        keys.append(key)
    return sorted(keys)


def s3_rows(bucket: str, key: str) -> list[dict[str, str]]:
    body = s3_client().get_object(Bucket=bucket, Key=key)["Body"].read().decode("utf-8")
    return list(csv.DictReader(io.StringIO(body)))


def by_name(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    """Rows keyed by class folder + file name (an S3 key and a local path of the same image agree)."""
    return {"/".join(r["path"].split("/")[-2:]): r for r in rows}


def local_reference(onnx_model: Path, files: list[Path], tmp_path: Path) -> dict[str, dict[str, str]]:
    """The same images scored from a local folder: what streaming from S3 must agree with."""
    folder = tmp_path / "reference"
    for p in files:
        (folder / p.parent.name).mkdir(parents=True, exist_ok=True)
        (folder / p.parent.name / p.name).write_bytes(p.read_bytes())
    score_images(onnx_model, [folder], tmp_path / "reference.csv", CPU)
    with open(tmp_path / "reference.csv", newline="") as f:
        return by_name(list(csv.DictReader(f)))


def test_an_s3_prefix_streams_into_s3_and_an_incremental_rerun_scores_only_what_changed(
        onnx_model: Path, faces: Path, bucket: str, tmp_path: Path) -> None:
    files = images_of(faces, 30)
    keys = upload(bucket, files)
    s3_client().put_object(Bucket=bucket, Key="to-score/with_mask/broken.jpg", Body=b"\xff\xd8\xff not a jpeg")
    out = f"s3://{bucket}/predictions/run-1/"
    first = score_images(onnx_model, [f"s3://{bucket}/to-score/"], out, CPU)
    rows = s3_rows(bucket, "predictions/run-1/predictions.csv")
    assert (first.images, first.errors, first.reused) == (31, 1, 0)
    assert [r["path"] for r in rows] == sorted([*keys, "to-score/with_mask/broken.jpg"])
    listed = [o["Key"] for o in s3_client().list_objects_v2(Bucket=bucket, Prefix="predictions/").get("Contents", [])]
    assert listed == ["predictions/run-1/predictions.csv", "predictions/run-1/predictions.json"]  # parts gone
    summary = json.loads(s3_client().get_object(Bucket=bucket, Key="predictions/run-1/predictions.json")["Body"].read())
    assert (summary["images"], summary["errors"], summary["source"]) == (31, 1, f"s3://{bucket}/to-score/")
    assert summary["model_sha256"] == hashlib.sha256(onnx_model.read_bytes()).hexdigest()
    assert summary["config"]["part_rows"] == CPU.part_rows
    reference = local_reference(onnx_model, files, tmp_path)
    for name, r in by_name(rows).items():
        if name == "with_mask/broken.jpg":
            assert r["error"].startswith("cannot decode image") and "0x" not in r["error"] and r["predicted_class"] == ""
            continue
        assert r["predicted_class"] == reference[name]["predicted_class"]
        assert [r[k] for k in r if k.startswith("p_")] == [reference[name][k] for k in r if k.startswith("p_")]

    client = s3_client()  # tonight: one image replaced by another, one new, one gone
    client.put_object(Bucket=bucket, Key=keys[0], Body=files[-1].read_bytes())
    client.put_object(Bucket=bucket, Key="to-score/without_mask/new.png", Body=files[1].read_bytes())
    client.delete_object(Bucket=bucket, Key=keys[2])
    again = score_images(onnx_model, [f"s3://{bucket}/to-score/"], out, CPU, incremental=True)
    rows2 = by_name(s3_rows(bucket, "predictions/run-1/predictions.csv"))
    assert (again.images, again.reused) == (31, 29)  # 31 - 1 gone + 1 new; all but the replaced and the new kept
    assert "/".join(keys[2].split("/")[-2:]) not in rows2
    assert rows2["without_mask/new.png"]["p_with_mask"] == reference["/".join(keys[1].split("/")[-2:])]["p_with_mask"]
    assert rows2["/".join(keys[0].split("/")[-2:])]["p_with_mask"] == reference[
        f"{files[-1].parent.name}/{files[-1].name}"]["p_with_mask"]


def test_a_local_bucket_prefix_is_listed_by_size_and_mtime_and_an_incremental_rerun_works(
        onnx_model: Path, faces: Path, tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    files = images_of(faces, 10)
    for p in files:
        (root / "to-score" / p.parent.name).mkdir(parents=True, exist_ok=True)
        (root / "to-score" / p.parent.name / p.name).write_bytes(p.read_bytes())
    store, out = LocalStore(root), tmp_path / "pred.csv"
    first = score_images(onnx_model, ["to-score/"], out, CPU, store=store)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    keys = sorted(f"to-score/{p.parent.name}/{p.name}" for p in files)
    assert first.images == 10 and [r["path"] for r in rows] == keys
    st = (root / rows[0]["path"]).stat()
    assert rows[0]["etag"] == f"{st.st_size:x}-{st.st_mtime_ns:x}"  # no content hash: the images are read once
    assert score_images(onnx_model, ["to-score/"], out, CPU, incremental=True, store=store).reused == 10
    changed = root / rows[3]["path"]
    changed.write_bytes(files[-1].read_bytes())
    os.utime(changed, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    again = score_images(onnx_model, ["to-score/"], out, CPU, incremental=True, store=store)
    assert (again.images, again.reused) == (10, 9)


def prediction_rows(n: int) -> list[dict[str, str]]:
    """``n`` rows in key order: a path with a comma and a quote, error rows, a newline in an error."""
    rows = []
    for i in range(n):
        error = "" if i % 4 else f'cannot decode image: "{i}",\nbad'
        rows.append({"path": f'in/{i:03d}, "odd" name.jpg', "predicted_class": "" if error else "with_mask",
                     "p_with_mask": "" if error else f"0.{i:06d}", "p_without_mask": "" if error else "0.500000",
                     "error": error, "model_version": "v1", "etag": f"{i:x}-{i * 7:x}"})
    return rows


def test_joined_parts_are_the_csv_of_the_rows_byte_for_byte(tmp_path: Path) -> None:
    fields = columns(["with_mask", "without_mask"])
    rows = prediction_rows(23)
    dest = Destination(LocalStore(tmp_path), "pred.csv")

    def output() -> PredictionOutput:
        return PredictionOutput(dest, fields, {"model_version": "v1", "written_by": WRITTEN_BY}, part_rows=4)

    killed = output()
    assert killed.begin() == ""
    for r in rows[:10]:  # two whole parts, then killed: the buffered rows are lost
        killed.write(r)
    resumed = output()
    after = resumed.begin()
    assert after == rows[7]["path"]
    for r in rows[8:]:
        resumed.write(r)
    assert resumed.finish(lambda n, e: {"written_by": WRITTEN_BY}) == (23, 6)
    expected = io.StringIO()
    writer = csv.DictWriter(expected, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    assert (tmp_path / "pred.csv").read_bytes() == expected.getvalue().encode("utf-8")
    assert not (tmp_path / "pred.csv.parts").exists()


def test_a_bare_carriage_return_in_a_value_is_quoted_and_reads_back(tmp_path: Path) -> None:
    fields = columns(["with_mask", "without_mask"])
    rows = prediction_rows(5)
    rows[1]["path"], rows[2]["error"] = "in/001 \r name.jpg", "odd\rmessage"
    out = PredictionOutput(Destination(LocalStore(tmp_path), "pred.csv"), fields, {"written_by": WRITTEN_BY}, 2)
    out.begin()
    for r in rows:
        out.write(r)
    assert out.finish(lambda n, e: {"written_by": WRITTEN_BY}) == (5, 3)
    with open(tmp_path / "pred.csv", newline="") as f:
        assert list(csv.DictReader(f)) == rows  # csv writes a bare "\r" unquoted: read back, it split the row


def test_listing_is_lazy_and_images_in_flight_are_bounded(onnx_model: Path, faces: Path) -> None:
    source = LocalSource([faces])
    pulled = 0

    def listing():
        nonlocal pulled
        for item in source.items():
            pulled += 1
            yield item

    cfg = ScoreConfig(device="cpu", batch_size=4, prefetch_batches=2)
    rows = score_items(load_onnx_model(onnx_model, "cpu"), source, listing(), cfg)
    next(rows)
    window = cfg.decode_workers + cfg.prefetch_batches + 1  # one per worker, those queued, the one being written
    assert pulled <= window * cfg.batch_size  # not the whole folder: a bounded window
    assert 1 + sum(1 for _ in rows) == pulled == len(list(source.items()))


def test_folders_given_by_symbolic_link_are_followed_and_loops_named(onnx_model: Path, faces: Path,
                                                                      tmp_path: Path) -> None:
    linked = tmp_path / "linked"
    linked.mkdir()
    for c in ("with_mask", "without_mask"):
        os.symlink(faces / c, linked / c)
    out = tmp_path / "pred.csv"
    proc = faceclf("score", str(onnx_model), str(linked), "--out", str(out), "--device", "cpu")
    n = len(list(LocalSource([faces]).items()))
    assert f"of {n} images" in proc.stdout and n > 100
    os.symlink(linked, linked / "with_mask-again")  # a link back to a folder being walked
    with pytest.raises(ValueError, match="symbolic link loop: .*with_mask-again"):
        list(LocalSource([linked]).items())


def test_an_input_without_images_is_a_one_line_error(onnx_model: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    proc = faceclf("score", str(onnx_model), str(empty), "--out", str(tmp_path / "p.csv"), check=False)
    assert proc.returncode == 2 and f"no image files in {empty}" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "p.csv").exists()
    assert [line for line in proc.stderr.splitlines() if "no image files" in line][0].startswith("faceclf score: error: no image files")
    with pytest.raises(NoImages):
        score_images(onnx_model, [empty], tmp_path / "p.csv", CPU)
    assert not list(tmp_path.glob("p.csv*"))  # no parts folder either


def test_sorted_walk_is_full_path_string_order(tmp_path: Path) -> None:
    for rel in ("a/b.png", "a-c.png", "a/z/y.png", "b.png", "a0.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    keys = [i.key for i in LocalSource([tmp_path]).items()]
    assert keys == sorted(keys) and len(keys) == 5
    assert [i.key for i in LocalSource([tmp_path]).items(start_after=keys[1])] == keys[2:]
    assert isinstance(next(LocalSource([tmp_path]).items()), Item)


def test_ray_data_scoring_gives_the_single_machine_predictions(onnx_model: Path, faces: Path, bucket: str,
                                                               tmp_path: Path) -> None:
    ray = pytest.importorskip("ray")
    files = images_of(faces, 24)
    upload(bucket, files)
    s3_client().put_object(Bucket=bucket, Key="to-score/without_mask/zz-broken.png", Body=b"not a png")
    here = score_images(onnx_model, [f"s3://{bucket}/to-score/"], f"s3://{bucket}/predictions/here/", CPU)
    model_folders = set(Path(tempfile.gettempdir()).glob("faceclf-ray-model-*"))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        cfg = ScoreConfig(device="cpu", part_rows=8, batch_size=4, ray_address="local", ray_chunk=10)
        on_ray = score_images(onnx_model, [f"s3://{bucket}/to-score/"], f"s3://{bucket}/predictions/ray/", cfg)
    finally:
        ray.shutdown()
    assert (on_ray.images, on_ray.errors) == (here.images, here.errors) == (25, 1)
    assert set(Path(tempfile.gettempdir()).glob("faceclf-ray-model-*")) == model_folders  # actors leave no model copy
    a, b = s3_rows(bucket, "predictions/here/predictions.csv"), s3_rows(bucket, "predictions/ray/predictions.csv")
    assert [r["path"] for r in a] == [r["path"] for r in b]
    assert [(r["predicted_class"], r["error"]) for r in a] == [(r["predicted_class"], r["error"]) for r in b]
    pa = np.array([[float(r[k] or "nan") for k in r if k.startswith("p_")] for r in a])
    pb = np.array([[float(r[k] or "nan") for k in r if k.startswith("p_")] for r in b])
    np.testing.assert_allclose(pa, pb, atol=1e-6)
