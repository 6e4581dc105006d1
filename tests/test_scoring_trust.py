"""Issue 24, the scoring side: writes stay in their place, scoring is bounded like ingest, no secret in Ray."""

from __future__ import annotations

import csv
import json
import logging
import os
import struct
import time
import zlib
from pathlib import Path

import pytest
from test_cli import faceclf

from faceclf.config import ScoreConfig
from faceclf.serving import output as O
from faceclf.serving.ray_score import RAY_AWS_ENV, aws_env
from faceclf.serving.sources import LocalSource, StoreSource
from faceclf.serving.stream import PredictionOutput, score_images
from faceclf.store import registry
from faceclf.store.objects import open_store
from faceclf.store.s3 import s3_client

CPU = ScoreConfig(device="cpu", part_rows=4, batch_size=4)
VERSION = "20260101T000000Z-bbbbbb"


def some_faces(faces: Path, folder: Path, n: int = 6) -> list[Path]:
    """Copies of ``n`` sample faces (both classes, JPEG and PNG) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    chosen = sorted(faces.rglob("*.jpg"))[:n // 2] + sorted(faces.rglob("*.png"))[:n - n // 2]
    for i, p in enumerate(chosen):
        (folder / f"{i:02d}{p.suffix}").write_bytes(p.read_bytes())
    return sorted(folder.iterdir())


def rows_of(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def png_claiming(width: int, height: int) -> bytes:
    """A 60-byte PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def jpeg_claiming(jpeg: bytes, width: int, height: int) -> bytes:
    """``jpeg`` with its frame header (SOF0/SOF2) changed to claim width x height pixels."""
    at = next(i for i in range(2, len(jpeg) - 9) if jpeg[i] == 0xFF and jpeg[i + 1] in (0xC0, 0xC2))
    return jpeg[:at + 5] + struct.pack(">HH", height, width) + jpeg[at + 9:]


def webp_claiming(width: int, height: int) -> bytes:
    """An extended WebP (VP8X) whose canvas header claims width x height: Pillow would allocate it on open."""
    vp8x = b"\x00\x00\x00\x00" + (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    body = b"WEBP" + b"VP8X" + struct.pack("<I", len(vp8x)) + vp8x
    return b"RIFF" + struct.pack("<I", len(body)) + body


# ---------------------------------------------------------------------------------------------
# A. Writes stay in their place
# ---------------------------------------------------------------------------------------------
def test_output_under_the_registry_or_the_data_is_refused_in_a_bucket(onnx_model: Path, faces: Path, bucket: str,
                                                                      tmp_path: Path) -> None:
    store = open_store(f"s3://{bucket}")
    store.put_bytes(registry.CHAMPION_KEY, b'{"version": "x"}')
    images = some_faces(faces, tmp_path / "in", 3)
    for key in (registry.CHAMPION_KEY, "models/", "datasets/face/x.csv", "incoming/with_mask/",
                "predictions/../models/face/champion.json"):
        out = f"s3://{bucket}/{key}"
        with pytest.raises(ValueError, match="output .*(under 'models/'|under 'datasets/'|under 'incoming/'|'\\.\\.')"):
            score_images(onnx_model, images, out, CPU)
    assert store.get_bytes(registry.CHAMPION_KEY) == b'{"version": "x"}'
    assert [o.key for o in store.list()] == [registry.CHAMPION_KEY]  # no parts, no summary anywhere
    proc = faceclf("score", str(onnx_model), str(images[0]), "--out", f"s3://{bucket}/{registry.CHAMPION_KEY}",
                   check=False)
    assert proc.returncode == 2 and "under 'models/'" in proc.stderr and "Traceback" not in proc.stderr
    assert store.get_bytes(registry.CHAMPION_KEY) == b'{"version": "x"}'
    assert score_images(onnx_model, images, f"s3://{bucket}/predictions/ok/", CPU).images == 3  # elsewhere: fine


def test_output_inside_a_local_bucket_folders_registry_is_refused(tmp_path: Path) -> None:
    bucket = tmp_path / "bucket"
    (bucket / registry.MODELS_PREFIX).mkdir(parents=True)
    for out in (bucket / "models" / "face" / "p.csv", bucket / "incoming" / "x", bucket / "datasets" / "p.csv"):
        with pytest.raises(ValueError, match="under '(models|incoming|datasets)/'"):
            O.destination(out)
    assert O.destination(bucket / "predictions" / "p.csv").uri() == str(bucket / "predictions" / "p.csv")
    assert O.destination(tmp_path / "models" / "p.csv").key == "p.csv"  # no bucket folder above: a plain folder


def test_a_file_the_scorer_did_not_write_is_never_overwritten(onnx_model: Path, faces: Path, tmp_path: Path) -> None:
    images = some_faces(faces, tmp_path / "in")
    settings = tmp_path / "x" / "settings.json"
    settings.parent.mkdir()
    settings.write_text('{"keep": "me"}')
    with pytest.raises(ValueError, match=r"refusing to overwrite .*settings\.json: not written by a scoring run"):
        score_images(onnx_model, images, tmp_path / "x" / "settings.csv", CPU)
    assert settings.read_text() == '{"keep": "me"}' and sorted(p.name for p in settings.parent.iterdir()) == [
        "settings.json"]
    report = tmp_path / "y" / "report.csv"  # a CSV without a scoring summary beside it
    report.parent.mkdir()
    report.write_text("someone,else's\n")
    with pytest.raises(ValueError, match=r"refusing to overwrite .*report\.csv"):
        score_images(onnx_model, images, report, CPU)
    assert report.read_text() == "someone,else's\n"

    out = tmp_path / "z" / "pred.csv"  # the scorer's own output: a rerun and --incremental keep working
    first = score_images(onnx_model, images, out, CPU)
    assert json.loads((tmp_path / "z" / "pred.json").read_text())["written_by"] == O.WRITTEN_BY
    assert score_images(onnx_model, images, out, CPU, incremental=True).reused == first.images == 6
    summary = json.loads((tmp_path / "z" / "pred.json").read_text())
    del summary["written_by"]  # a summary written before the marker existed is still the scorer's
    (tmp_path / "z" / "pred.json").write_text(json.dumps(summary))
    assert score_images(onnx_model, images, out, CPU, incremental=True).reused == 6


def test_flow_outputs_and_sources_are_confined_to_the_workers_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     bucket: str) -> None:
    from flows.score import check_source, output_location

    work, outside = tmp_path / "worker", tmp_path / "elsewhere"
    work.mkdir()
    outside.mkdir()
    os.symlink(outside, work / "link")
    monkeypatch.chdir(work)
    monkeypatch.delenv(O.ALLOW_PATHS_ENV, raising=False)
    store = open_store(f"s3://{bucket}")
    assert output_location(store, "./out/p.csv") == "./out/p.csv"
    assert output_location(store, str(work / "p.csv")) == str(work / "p.csv")
    assert output_location(store, "predictions/x.csv") == f"s3://{bucket}/predictions/x.csv"
    for bad in ("../elsewhere/p.csv", str(outside / "p.csv"), "./link/p.csv", "/etc/faceclf.csv"):
        with pytest.raises(ValueError, match=f"output '{bad}' resolves to .*outside the worker's folder .*"
                                             f"{O.ALLOW_PATHS_ENV}"):
            output_location(store, bad)
    for bad, why in (("models/face/champion.json", "under 'models/'"), ("predictions/../../x.csv", "'..'"),
                     ("s3://other-bucket/predictions/", "not in the flow's bucket")):
        with pytest.raises(ValueError, match=why):
            output_location(store, bad)
    with pytest.raises(ValueError, match="source '/etc' resolves to '/etc', outside the worker's folder"):
        check_source("/etc")
    check_source("incoming/")  # a prefix of the bucket, not a local path
    check_source(str(work))
    local_bucket = open_store(outside / "bucket")  # keys of a local bucket folder are local paths too
    with pytest.raises(ValueError, match="outside the worker's folder"):
        output_location(local_bucket, "predictions/p.csv")

    monkeypatch.setenv(O.ALLOW_PATHS_ENV, os.pathsep.join([str(outside), str(tmp_path / "other")]))
    assert output_location(store, "../elsewhere/p.csv") == "../elsewhere/p.csv"
    assert output_location(local_bucket, "predictions/p.csv") == str(outside / "bucket" / "predictions" / "p.csv")
    check_source(str(outside))
    with pytest.raises(ValueError, match="outside the worker's folder"):
        output_location(store, str(tmp_path / "third" / "p.csv"))


def test_the_score_flow_refuses_an_output_outside_its_place(prefect_api, bucket: str, onnx_model: Path, faces: Path,
                                                            trained_run: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.score as score_flow

    store = open_store(f"s3://{bucket}")
    registry.publish_version(store, VERSION, {"model.onnx": onnx_model, "metrics.json": trained_run / "metrics.json"})
    registry.promote(store, VERSION, reason="published by the test")
    champion = store.get_bytes(registry.CHAMPION_KEY)
    for i, p in enumerate(some_faces(faces, tmp_path / "in", 3)):
        s3_client().put_object(Bucket=bucket, Key=f"to-score/c/{i}{p.suffix}", Body=p.read_bytes())
    work = tmp_path / "worker"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.delenv(O.ALLOW_PATHS_ENV, raising=False)
    with pytest.raises(ValueError, match="under 'models/'"):
        score_flow.score(bucket=bucket, source="to-score/", output=registry.CHAMPION_KEY)
    with pytest.raises(ValueError, match=f"outside the worker's folder .*{O.ALLOW_PATHS_ENV}"):
        score_flow.score(bucket=bucket, source="to-score/", output="../escaped/p.csv")
    assert store.get_bytes(registry.CHAMPION_KEY) == champion and not (tmp_path / "escaped").exists()
    assert score_flow.score(bucket=bucket, source="to-score/", output="./mine/p.csv")["images"] == 3
    monkeypatch.setenv(O.ALLOW_PATHS_ENV, str(tmp_path / "escaped"))  # the deployment allows one more folder
    assert score_flow.score(bucket=bucket, source="to-score/", output="../escaped/p.csv")["images"] == 3
    assert (tmp_path / "escaped" / "p.csv").is_file()


# ---------------------------------------------------------------------------------------------
# B. Scoring is bounded like ingest
# ---------------------------------------------------------------------------------------------
def test_oversize_objects_and_decompression_bombs_get_error_rows_and_are_never_decoded(
        onnx_model: Path, faces: Path, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import faceclf.serving.stream as S

    images = some_faces(faces, tmp_path / "in", 4)
    limit = max(p.stat().st_size for p in images) + 1000
    bombs = {"bomb.png": png_claiming(7000, 7000), "giant.png": png_claiming(50_000, 50_000),
             "bomb.jpg": jpeg_claiming(images[0].read_bytes(), 9000, 9000),
             "bomb.webp": webp_claiming(16_000, 16_000), "huge.png": b"\x89PNG" + b"\0" * (limit + 1)}
    client = s3_client()
    for p in images:
        client.put_object(Bucket=bucket, Key=f"to-score/{p.name}", Body=p.read_bytes())
    for name, data in bombs.items():
        client.put_object(Bucket=bucket, Key=f"to-score/{name}", Body=data)
        (tmp_path / "in" / name).write_bytes(data)
    decoded, read = [], []
    real_decode, real_read = S.decode_into, StoreSource.read
    monkeypatch.setattr(S, "decode_into", lambda data, size, out: decoded.append(len(data)) or
                        real_decode(data, size, out))
    monkeypatch.setattr(StoreSource, "read", lambda self, item, max_bytes=None: read.append(item.key) or
                        real_read(self, item, max_bytes))
    cfg = ScoreConfig(device="cpu", part_rows=4, batch_size=4, max_bytes=limit)
    s3 = (f"s3://{bucket}/to-score/", f"s3://{bucket}/predictions/b/")
    for source, out in (s3, (tmp_path / "in", tmp_path / "p.csv")):
        decoded.clear()
        summary = score_images(onnx_model, [source], out, cfg)
        assert (summary.images, summary.errors) == (9, 5)
        assert len(decoded) == 4  # the four real faces; no bomb reached a decoder
        text = (open_store(f"s3://{bucket}").get_bytes("predictions/b/predictions.csv").decode()
                if source == s3[0] else (tmp_path / "p.csv").read_text())
        rows = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(text.splitlines())}
        assert "7000x7000 is over the 40000000-pixel limit (decompression bomb guard)" in rows["bomb.png"]["error"]
        assert "over the 40000000-pixel limit (decompression bomb guard)" in rows["giant.png"]["error"]
        assert "16000x16000 is over the 40000000-pixel limit" in rows["bomb.webp"]["error"]
        assert "9000x9000 is over the 40000000-pixel limit" in rows["bomb.jpg"]["error"]
        assert f"over the {limit}-byte limit" in rows["huge.png"]["error"]
        assert all(rows[p.name]["predicted_class"] and not rows[p.name]["error"] for p in images)
    assert "to-score/huge.png" not in read and len(read) == 8  # the listed size was enough: never downloaded


def build_link_ladder(root: Path, depth: int) -> Path:
    """root/L00..L<depth>: each holds one image and two links, a and b, to the next level."""
    for i in range(depth + 1):
        level = root / f"L{i:02d}"
        level.mkdir(parents=True)
        (level / "img.png").write_bytes(b"x")
        if i:
            for name in ("a", "b"):
                os.symlink(level, root / f"L{i - 1:02d}" / name)
    return root / "L00"


def test_linked_folders_are_followed_but_each_real_folder_is_walked_once(tmp_path: Path) -> None:
    top = build_link_ladder(tmp_path / "ladder", 20)  # walked path by path: 2^21 - 1 listings of img.png
    t0 = time.perf_counter()
    keys = [i.key for i in LocalSource([top]).items()]
    assert time.perf_counter() - t0 < 5
    assert len(keys) == 21 == len(set(keys)) and keys == sorted(keys)
    assert keys[:2] == [f"{top}{'/a' * 20}/img.png", f"{top}{'/a' * 19}/img.png"]  # the first path in order wins
    assert [i.key for i in LocalSource([top]).items(start_after=keys[9])] == keys[10:]  # resume after a key
    os.symlink(top, tmp_path / "ladder" / "L20" / "back")  # a link back to a folder being walked is still a loop
    with pytest.raises(ValueError, match="symbolic link loop: .*back"):
        list(LocalSource([top]).items())


def test_a_file_name_that_is_not_utf8_gets_a_row_and_reruns_work(onnx_model: Path, faces: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "in"
    images = some_faces(faces, folder, 3)  # 00..02, then the escaped name, then zz-broken.jpg
    raw = os.path.join(os.fsencode(folder), b"\xff\xfeface.jpg")
    with open(raw, "wb") as f:
        f.write(images[0].read_bytes())
    (folder / "zz-broken.jpg").write_bytes(b"not an image")
    out = tmp_path / "p.csv"
    monkeypatch.setattr(PredictionOutput, "finish", lambda self, summary: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):  # killed after every part was written: the rerun resumes
        score_images(onnx_model, [folder], out, CPU)
    monkeypatch.undo()
    resumed = score_images(onnx_model, [folder], out, CPU)
    assert (resumed.images, resumed.errors, resumed.resumed) == (5, 1, 4)  # the part ended at the escaped name
    rows = rows_of(out)
    escaped = f"{folder}/\\xff\\xfeface.jpg"
    assert [r["path"] for r in rows] == sorted(r["path"] for r in rows) and escaped in [r["path"] for r in rows]
    by_path = {r["path"]: r for r in rows}
    assert by_path[escaped]["predicted_class"] == by_path[str(images[0])]["predicted_class"]
    assert by_path[escaped]["p_with_mask"] == by_path[str(images[0])]["p_with_mask"]
    again = score_images(onnx_model, [folder], out, CPU, incremental=True)
    assert (again.images, again.reused) == (5, 5) and rows_of(out) == rows
    assert score_images(onnx_model, [folder], out, CPU).images == 5  # and a plain rerun


@pytest.mark.parametrize("damage", ["garbage", "header", "truncated", "unsorted"])
def test_incremental_over_a_malformed_previous_csv_rescores_everything_with_a_warning(
        onnx_model: Path, faces: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: str) -> None:
    images = some_faces(faces, tmp_path / "in")
    out = tmp_path / "p.csv"
    score_images(onnx_model, images, out, CPU)
    text = out.read_text()
    lines = text.splitlines(keepends=True)
    out.write_bytes({"garbage": b"\xff\xfe\x00\x01garbage\n\x00",
                     "header": ("a,b,c\n" + "".join(lines[1:])).encode(),
                     "truncated": text[:len(text) - len(lines[-1]) + 20].encode(),  # in the last row's path
                     "unsorted": "".join([lines[0], lines[2], lines[1], *lines[3:]]).encode()}[damage])
    with caplog.at_level(logging.WARNING, logger="faceclf.serving.output"):
        again = score_images(onnx_model, images, out, CPU, incremental=True)
    assert (again.images, again.reused, again.errors) == (6, 0, 0)
    assert "not reusing the previous predictions" in caplog.text and "scoring every image again" in caplog.text
    assert out.read_text() == text  # whole again, the same rows


# ---------------------------------------------------------------------------------------------
# C. Secrets stay out of Ray
# ---------------------------------------------------------------------------------------------
def test_only_the_endpoint_region_and_retries_travel_to_ray_workers() -> None:
    env = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_SESSION_TOKEN": "token",
           "AWS_PROFILE": "prod", "AWS_SHARED_CREDENTIALS_FILE": "/root/.aws/credentials",
           "AWS_CONTAINER_AUTHORIZATION_TOKEN": "t", "AWS_WEB_IDENTITY_TOKEN_FILE": "/var/run/token",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1", "AWS_MAX_ATTEMPTS": "9",
           "AWS_RETRY_MODE": "standard", "HOME": "/root"}
    got = aws_env(env)
    assert got == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000", "AWS_DEFAULT_REGION": "eu-west-1",
                   "AWS_MAX_ATTEMPTS": "9", "AWS_RETRY_MODE": "standard"}
    assert not {k for k in RAY_AWS_ENV if any(w in k for w in ("KEY", "SECRET", "TOKEN", "PROFILE", "CREDENTIAL"))}
