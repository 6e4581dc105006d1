"""Ingest from a real S3 endpoint (moto server on 127.0.0.1) and from a local folder into ImageFolder."""

from __future__ import annotations

import hashlib
import io
import json
import random
import shutil
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image, WebPImagePlugin

from faceclf.config import IngestConfig
from faceclf.dataset.discover import discover
from faceclf.dataset.ingest import IngestReport, ingest
from faceclf.dataset.near import from_hex
from faceclf.dataset.placement import Placement
from faceclf.dataset.layout import SPLITS, list_images, split_of
from faceclf.dataset.manifest import (
    MANIFEST_KEY,
    QUARANTINE_KEY,
    read_manifest,
    read_quarantine,
)
from faceclf.dataset.preprocess import load_image
from faceclf.store.objects import LocalStore, Store, open_store
from faceclf.store.s3 import S3Store, s3_client

CFG = IngestConfig(workers=8)


class CountingS3Store(S3Store):
    """The real S3Store, remembering which incoming/ objects were downloaded."""

    def __init__(self, bucket: str):
        super().__init__(bucket)
        self.downloaded: list[str] = []

    def get_bytes(self, key: str) -> bytes:
        if key.startswith("incoming/"):
            self.downloaded.append(key)
        return super().get_bytes(key)


def png(w: int = 40, h: int = 40, color: tuple[int, int, int] = (10, 20, 30), mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), color if mode == "RGB" else 1).save(buf, "PNG")
    return buf.getvalue()


def noisy_jpeg(size: int = 64, seed: int = 0) -> bytes:
    """A JPEG with enough entropy that cutting it in half really loses scan data."""
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (size, size), bytes(rng.randrange(256) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png_claiming(w: int, h: int) -> bytes:
    """A real small PNG whose IHDR says w x h (CRC fixed up), so only the header is big."""
    data = bytearray(png(32, 32))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def upload(bucket: str, objects: dict[str, bytes]) -> None:
    client = s3_client()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=bucket, Key=kv[0], Body=kv[1]), objects.items()))


def folder_objects(root: Path) -> dict[str, bytes]:
    """incoming/<class>/<name> -> bytes for every file of a folder of class folders."""
    return {f"incoming/{p.relative_to(root).as_posix()}": p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def snapshot(store: Store) -> dict[str, tuple[str, int, str]]:
    """key -> (etag, size, sha256 of the content) of everything under incoming/."""
    return {o.key: (o.etag, o.size, hashlib.sha256(store.get_bytes(o.key)).hexdigest()) for o in store.list("incoming/")}


def dest_files(dest: Path) -> dict[str, str]:
    """dest-relative path -> sha256 of the file, for every file below dest."""
    return {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in dest.rglob("*") if p.is_file()}


def assert_dest_matches_manifest(store: Store, dest: Path, cfg: IngestConfig = CFG) -> list[dict]:
    """Every "ok" row has its file, named by its content hash, in the split placement gives (its nearest earlier
    twin's, else its hash's: replayed in manifest order); nothing else is there."""
    rows = read_manifest(store)
    ok = [r for r in rows if r["status"] == "ok"]
    files = dest_files(dest)
    assert sorted(files) == sorted(r["path"] for r in ok)
    replay = Placement(cfg.split_fractions, cfg.near_distance)
    for r in ok:
        split, cls, name = r["path"].split("/")
        assert files[r["path"]] == r["sha256"] == name.rsplit(".", 1)[0]
        placed = replay.place(r["sha256"], from_hex(r["phash"]) if "phash" in r else None)  # flat: none
        assert split == r["split"] == placed.split and cls == r["class"]
        assert placed.twin is not None or split == split_of(r["sha256"], cfg.split_fractions)
        assert name.endswith({"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp"}[r["format"]])
        assert {"key", "etag", "size", "width", "height", "ingested_at"} <= r.keys()
    shas = [r["sha256"] for r in ok]
    assert len(shas) == len(set(shas)), "a content hash is held twice"
    for r in rows:
        if r["status"] == "duplicate":
            assert r["sha256"] in set(shas) and r["duplicate_of"] != r["key"]
    return rows


def test_s3_nights_first_second_changed_and_rebuild(bucket: str, faces: Path, tmp_path: Path) -> None:
    upload(bucket, folder_objects(faces))
    store = CountingS3Store(bucket)
    dest = tmp_path / "face"

    # Night 1: 120 faces plus 3 byte-identical copies.
    r1 = ingest(store, dest, CFG)
    assert (r1.listed, r1.new, r1.duplicates, r1.skipped, r1.quarantined, r1.failed) == (123, 120, 3, 0, 0, 0)
    assert r1.classes == {"with_mask": 60, "without_mask": 60} and r1.manifest_rows == 123
    json.dumps(r1.to_dict())
    rows = assert_dest_matches_manifest(store, dest)
    assert sorted(r["key"] for r in rows) == sorted(folder_objects(faces))
    dups = [r for r in rows if r["status"] == "duplicate"]
    # The first key in listing order keeps the file: copy_i.jpg sorts before with_mask_0000i.jpg.
    assert sorted((r["key"].rsplit("/", 1)[1], r["duplicate_of"].rsplit("/", 1)[1]) for r in dups) == [
        (f"with_mask_0000{i}.jpg", f"copy_{i}.jpg") for i in range(3)]
    for split in SPLITS:  # 120 hashes spread over the three splits, each in one
        assert list((dest / split).rglob("*.*"))
    before = dest_files(dest)

    # Night 2: nothing new -> nothing downloaded, nothing moved.
    store.downloaded.clear()
    r2 = ingest(store, dest, CFG)
    assert (r2.listed, r2.new, r2.skipped, r2.duplicates, r2.quarantined) == (123, 0, 123, 0, 0)
    assert store.downloaded == [] and dest_files(dest) == before and r2.manifest_rows == 123

    # Night 3: an object replaced under the same key (new etag) is ingested again; the old image stays.
    key = "incoming/without_mask/without_mask_00000.jpg"
    old = next(r for r in rows if r["key"] == key)
    upload(bucket, {key: png(50, 50, (200, 1, 2))})
    r3 = ingest(store, dest, CFG)
    assert (r3.new, r3.skipped, r3.listed) == (1, 122, 123) and store.downloaded == [key]
    rows3 = assert_dest_matches_manifest(store, dest)
    versions = [r for r in rows3 if r["key"] == key]
    assert len(versions) == 2 and versions[0]["sha256"] == old["sha256"] != versions[1]["sha256"]
    assert (dest / old["path"]).is_file() and versions[1]["format"] == "PNG"
    assert r3.classes == {"with_mask": 60, "without_mask": 61}

    # Night 4 on a fresh machine: face/ is gone; it is rebuilt from the manifest. The replaced
    # object's old content is no longer in the bucket, so that one image cannot come back.
    shutil.rmtree(dest)
    store.downloaded.clear()
    r4 = ingest(store, dest, CFG)
    assert (r4.restored, r4.missing, r4.new, r4.skipped) == (120, 1, 0, 123)
    assert len(store.downloaded) == 120
    files = dest_files(dest)
    assert sorted(files) == sorted(r["path"] for r in rows3 if r["status"] == "ok" and r["path"] != old["path"])
    assert sorted(i.path for i in r4.faceset.images) == sorted(files)  # the missing image is not in the FaceSet


def test_more_than_one_page_of_objects(bucket: str, tmp_path: Path) -> None:
    objects = {f"incoming/{'ab'[i % 2]}/{i:05d}.png": png(20, 20, (i % 256, i // 256, 7)) for i in range(1010)}
    upload(bucket, objects)
    cfg = IngestConfig(workers=16, min_side=16)
    report = ingest(open_store(f"s3://{bucket}"), tmp_path / "face", cfg)
    assert (report.listed, report.new, report.duplicates, report.quarantined) == (1010, 1010, 0, 0)
    assert report.classes == {"a": 505, "b": 505}
    rows = assert_dest_matches_manifest(open_store(f"s3://{bucket}"), tmp_path / "face", cfg)
    assert len(rows) == 1010


BAD = {
    "incoming/with_mask/empty.jpg": (b"", "empty object"),
    "incoming/with_mask/random.jpg": (random.Random(3).randbytes(3000), "not an image: cannot identify image file"),
    "incoming/with_mask/page.jpg": (b"<!DOCTYPE html><html><body>Access denied</body></html>\n" * 20,
                                   "not an image: cannot identify image file"),
    "incoming/with_mask/truncated.jpg": (noisy_jpeg()[:3000], "truncated or corrupt image data"),
    "incoming/with_mask/scan.jpg": (None, "format TIFF not allowed (JPEG, PNG, WEBP)"),
    "incoming/with_mask/bomb.png": (png_claiming(20000, 20000), "over the 40000000-pixel limit"),
    "incoming/with_mask/wide.png": (png_claiming(8000, 6000), "image 8000x6000 is over the 40000000-pixel limit"),
    "incoming/with_mask/tiny.png": (png(8, 8), "image 8x8 has a side outside [32, 16384] pixels"),
    "incoming/with_mask/large.jpg": (b"\xff" * 60_000, "object of 60000 bytes is over the 50000-byte limit"),
    "incoming/with_mask/../escape.jpg": (png(), "unsafe key"),
    "incoming/with_mask/back\\slash.jpg": (png(), "unsafe key"),
    "incoming/stray.jpg": (png(), "is not incoming/<class>/<name>"),
    "incoming/a/b/deep.jpg": (png(), "is not incoming/<class>/<name>"),
    "incoming/with_mask/notes.txt": (b"hello", "not an image: cannot identify image file"),
    "incoming/with_mask/.hidden.jpg": (png(), "hidden class or file name"),
    "incoming/.cache/x.jpg": (png(), "hidden class or file name"),
    f"incoming/with_mask/{'n' * 220}.jpg": (png(), "is over 200 bytes"),
}


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (1, 2, 3)).save(buf, "TIFF")
    return buf.getvalue()


def test_bad_objects_are_quarantined_once_and_never_touched(bucket: str, tmp_path: Path) -> None:
    objects = {k: (tiff() if v is None else v) for k, (v, _) in BAD.items()}
    objects["incoming/with_mask/good.png"] = png(40, 40)
    objects["incoming/without_mask/mislabelled_png.jpg"] = png(40, 40, (9, 9, 9))  # content decides the extension
    upload(bucket, objects)
    store = CountingS3Store(bucket)
    assert "incoming/with_mask/../escape.jpg" in {o.key for o in store.list("incoming/")}, "endpoint rewrote the key"
    incoming = snapshot(store)
    assert len(incoming) == len(objects)
    dest = tmp_path / "face"
    cfg = IngestConfig(workers=8, max_bytes=50_000)

    store.downloaded.clear()
    report = ingest(store, dest, cfg)
    assert (report.listed, report.new, report.quarantined) == (len(objects), 2, len(BAD))
    reasons = {q["key"]: q["reason"] for q in report.quarantine}
    assert sorted(reasons) == sorted(BAD)
    for key, (_, expected) in BAD.items():
        assert expected in reasons[key], (key, reasons[key])
    # Keys and sizes refused from the listing were never downloaded.
    listing_refusals = [k for k, (_, why) in BAD.items() if why.startswith(("empty", "object of", "unsafe", "hidden"))
                        or "incoming/<class>" in why or "extension" in why or "200 bytes" in why]
    assert not set(listing_refusals) & set(store.downloaded)
    assert sorted(store.downloaded) == sorted(set(objects) - set(listing_refusals))

    logged = read_quarantine(store)
    assert logged == report.quarantine
    for q in logged:
        assert q.keys() == {"key", "etag", "size", "reason", "at"}
        assert (q["etag"], q["size"]) == incoming[q["key"]][:2]
    rows = assert_dest_matches_manifest(store, dest, cfg)
    assert sorted(r["key"] for r in rows) == ["incoming/with_mask/good.png", "incoming/without_mask/mislabelled_png.jpg"]
    assert all(r["path"].endswith(".png") for r in rows)
    assert snapshot(store) == incoming, "ingest changed something under incoming/"

    # Next night: the refused objects are remembered, not downloaded again.
    store.downloaded.clear()
    again = ingest(store, dest, cfg)
    assert (again.new, again.quarantined, again.skipped) == (0, 0, len(objects)) and store.downloaded == []
    assert len(read_quarantine(store)) == len(BAD)

    # A fixed object under a refused key (new etag) is looked at again.
    upload(bucket, {"incoming/with_mask/truncated.jpg": noisy_jpeg()})
    fixed = ingest(store, dest, cfg)
    assert (fixed.new, fixed.quarantined) == (1, 0) and store.downloaded == ["incoming/with_mask/truncated.jpg"]
    assert snapshot(store) == {**incoming, "incoming/with_mask/truncated.jpg": snapshot(store)["incoming/with_mask/truncated.jpg"]}


def saved(fmt: str, size: tuple[int, int] = (40, 40), mode: str = "RGB", color: object = 7, **save: object) -> bytes:
    """Real image bytes in any format Pillow writes."""
    buf = io.BytesIO()
    Image.new(mode, size, color).save(buf, fmt, **save)
    return buf.getvalue()


def webp(w: int = 40, h: int = 40, color: tuple[int, ...] = (10, 200, 30), **save: object) -> bytes:
    """A real WebP: lossy (first chunk VP8), ``lossless=True`` (VP8L), or RGBA lossy (VP8X, extended)."""
    return saved("WEBP", (w, h), "RGBA" if len(color) == 4 else "RGB", color, **save)


def webp_claiming(w: int, h: int, kind: bytes) -> bytes:
    """A real 40x40 WebP whose first chunk (VP8, VP8L or VP8X) says w x h: only the header is big."""
    data = bytearray({b"VP8 ": webp(quality=80), b"VP8L": webp(lossless=True),
                      b"VP8X": webp(color=(10, 200, 30, 128), quality=80)}[kind])
    assert data[12:16] == kind
    if kind == b"VP8 ":  # after the 3-byte frame tag and the 9d 01 2a start code: 14-bit width, height
        data[26:30] = struct.pack("<HH", w, h)
    elif kind == b"VP8L":  # after the 0x2f signature: 14-bit width-1, height-1, then alpha hint and version
        rest = struct.unpack("<I", data[21:25])[0] & ~0xFFFFFFF
        data[21:25] = struct.pack("<I", rest | (w - 1) | (h - 1) << 14)
    else:  # VP8X: flags, 3 reserved bytes, then 24-bit canvas width-1, height-1
        data[24:30] = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return bytes(data)


def test_formats_are_judged_by_their_bytes_not_their_names(bucket: str, tmp_path: Path) -> None:
    """A real night quarantined two WebPs and a JPEG named black3.jpg_1088Wx1632H for their names alone."""
    rng = random.Random(7)
    photo = Image.frombytes("RGB", (64, 48), rng.randbytes(64 * 48 * 3))
    buf = io.BytesIO()
    photo.save(buf, "WEBP", quality=85)
    good = {  # key -> (bytes, decoded format, extension in dest)
        "incoming/with_mask/face.webp": (buf.getvalue(), "WEBP", "webp"),                       # lossy: VP8
        "incoming/with_mask/IMG_0042": (webp(48, 40, lossless=True), "WEBP", "webp"),           # lossless: VP8L
        "incoming/without_mask/portrait.jpg": (webp(color=(200, 10, 30, 255)), "WEBP", "webp"),  # alpha: VP8X
        "incoming/without_mask/black3.jpg_1088Wx1632H": (noisy_jpeg(seed=9), "JPEG", "jpg"),
        "incoming/without_mask/DSC_0001.JPG": (saved("MPO", save_all=True, append_images=[Image.new("RGB", (40, 40))]),
                                               "JPEG", "jpg"),                                  # a phone's MPO
    }
    bad = {"incoming/with_mask/anim.jpg": (saved("GIF", mode="P"), "GIF"),
           "incoming/with_mask/bitmap.jpg": (saved("BMP"), "BMP"),
           "incoming/with_mask/scan.jpg": (tiff(), "TIFF")}
    assert Image.open(io.BytesIO(good["incoming/without_mask/DSC_0001.JPG"][0])).format == "MPO"
    upload(bucket, {**{k: v[0] for k, v in good.items()}, **{k: v[0] for k, v in bad.items()}})
    store, dest = open_store(f"s3://{bucket}"), tmp_path / "face"

    report = ingest(store, dest, CFG)
    assert (report.listed, report.new, report.quarantined, report.failed) == (len(good) + len(bad), len(good), len(bad), 0)
    assert {q["key"]: q["reason"] for q in report.quarantine} == {
        key: f"format {fmt} not allowed (JPEG, PNG, WEBP)" for key, (_, fmt) in bad.items()}
    rows = {r["key"]: r for r in assert_dest_matches_manifest(store, dest)}
    assert sorted(rows) == sorted(good)
    for key, (data, fmt, ext) in good.items():
        sha, cls = hashlib.sha256(data).hexdigest(), key.split("/")[1]
        assert (rows[key]["format"], rows[key]["status"]) == (fmt, "ok")
        assert rows[key]["path"] == f"{split_of(sha, CFG.split_fractions)}/{cls}/{sha}.{ext}"
        assert (dest / rows[key]["path"]).read_bytes() == data
    assert (rows["incoming/with_mask/IMG_0042"]["width"], rows["incoming/with_mask/IMG_0042"]["height"]) == (48, 40)

    # What training and scoring read finds the .webp files and decodes them.
    found = sorted(p.relative_to(dest).as_posix() for p in list_images(dest))
    assert found == sorted(r["path"] for r in rows.values())
    for key, color in (("incoming/with_mask/IMG_0042", (10, 200, 30)), ("incoming/without_mask/portrait.jpg", None)):
        pixels = load_image(dest / rows[key]["path"], 32)
        assert pixels.shape == (32, 32, 3) and pixels.dtype.name == "uint8"
        if color:  # lossless: every decoded pixel is the colour saved
            assert {tuple(p) for p in pixels.reshape(-1, 3).tolist()} == {color}


def test_webp_header_over_the_limits_is_refused_without_decoding(bucket: str, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """A WebP is judged from its own header: Pillow's WebP plugin builds libwebp's decoder, which
    allocates the whole canvas, as soon as it opens the file. Only the good one may get that far."""
    decoders: list[bytes] = []
    real = WebPImagePlugin._webp.WebPAnimDecoder

    def spy(data: bytes):  # noqa: ANN202 - libwebp's decoder object
        decoders.append(bytes(data[:30]))
        return real(data)

    monkeypatch.setattr(WebPImagePlugin._webp, "WebPAnimDecoder", spy)
    bad = {  # name -> (bytes, expected reason)
        "lossless.webp": (webp_claiming(9000, 9000, b"VP8L"), "image 9000x9000 is over the 40000000-pixel limit"),
        "lossy.webp": (webp_claiming(7000, 6000, b"VP8 "), "image 7000x6000 is over the 40000000-pixel limit"),
        "extended": (webp_claiming(16000, 16000, b"VP8X"), "image 16000x16000 is over the 40000000-pixel limit"),
        "strip.jpg": (webp_claiming(20000, 100, b"VP8X"), "image 20000x100 has a side outside [32, 16384] pixels"),
        "tiny.webp": (webp(20, 20), "image 20x20 has a side outside [32, 16384] pixels"),
    }
    good = webp(40, 40, (1, 2, 3))
    upload(bucket, {**{f"incoming/a/{name}": data for name, (data, _) in bad.items()}, "incoming/a/good.webp": good})

    report = ingest(open_store(f"s3://{bucket}"), tmp_path / "face", CFG)
    assert (report.new, report.quarantined, report.failed) == (1, len(bad), 0)
    reasons = {q["key"]: q["reason"] for q in report.quarantine}
    for name, (_, why) in bad.items():
        assert why in reasons[f"incoming/a/{name}"], (name, reasons[f"incoming/a/{name}"])
    assert decoders == [good[:30]], "a WebP over the limits reached libwebp's decoder"
    assert [p.name for p in (tmp_path / "face").rglob("*.webp")] == [f"{hashlib.sha256(good).hexdigest()}.webp"]


def test_same_bytes_under_two_classes_and_duplicates_across_nights(bucket: str, tmp_path: Path) -> None:
    face, other = noisy_jpeg(seed=5), png(40, 40, (1, 1, 1))
    upload(bucket, {"incoming/with_mask/a.jpg": face, "incoming/without_mask/b.jpg": face,
                    "incoming/without_mask/other.png": other})
    store = open_store(f"s3://{bucket}")
    dest = tmp_path / "face"
    r1 = ingest(store, dest, CFG)
    assert (r1.new, r1.duplicates, r1.quarantined) == (2, 0, 1)
    assert r1.quarantine[0]["key"] == "incoming/without_mask/b.jpg"
    assert r1.quarantine[0]["reason"] == "conflict: same bytes as incoming/with_mask/a.jpg labelled with_mask"
    sha = hashlib.sha256(face).hexdigest()
    # Neither label can be trusted: the first copy leaves the training tree too (its row says "conflict").
    assert not list(dest.rglob(f"{sha}.*"))
    assert [c["sha256"] for c in r1.conflicts] == [sha]
    assert {r["key"]: r["status"] for r in read_manifest(store)}["incoming/with_mask/a.jpg"] == "conflict"

    # Next night: the same bytes again (refused, in either class) and a same-class copy of another image.
    upload(bucket, {"incoming/with_mask/a_again.jpg": face, "incoming/without_mask/c.jpg": face,
                    "incoming/without_mask/other_again.png": other})
    r2 = ingest(store, dest, CFG)
    assert (r2.new, r2.duplicates, r2.quarantined, r2.skipped) == (0, 1, 2, 3)
    assert sorted(q["key"] for q in r2.quarantine) == ["incoming/with_mask/a_again.jpg", "incoming/without_mask/c.jpg"]
    assert all(q["reason"].startswith("conflict: ") for q in r2.quarantine)
    dup = next(r for r in read_manifest(store) if r["key"] == "incoming/without_mask/other_again.png")
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == "incoming/without_mask/other.png"
    assert dup["sha256"] == hashlib.sha256(other).hexdigest()
    assert_dest_matches_manifest(store, dest)
    # One image, yet every split has its class folder, so the tree reads as already split.
    assert sorted(p.relative_to(dest).as_posix() for p in dest.glob("*/*")) == [
        f"{s}/without_mask" for s in sorted(SPLITS)]
    r3 = ingest(store, dest, CFG)
    assert (r3.new, r3.duplicates, r3.quarantined, r3.skipped) == (0, 0, 0, 6)


def test_local_folder_source(faces: Path, tmp_path: Path) -> None:
    for key, data in folder_objects(faces).items():
        (tmp_path / "bucket" / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "bucket" / key).write_bytes(data)
    store = open_store(tmp_path / "bucket")
    assert isinstance(store, LocalStore)
    dest = tmp_path / "face"
    report = ingest(store, dest, CFG)
    assert (report.listed, report.new, report.duplicates, report.quarantined) == (123, 120, 3, 0)
    assert (tmp_path / "bucket" / MANIFEST_KEY).is_file() and not (tmp_path / "bucket" / QUARANTINE_KEY).exists()
    assert_dest_matches_manifest(store, dest)
    splits = discover(dest, CFG.split_fractions, workers=2)  # the tree, hashed: what a plain folder gives
    assert splits.presplit and list(splits.classes) == ["with_mask", "without_mask"] and splits.duplicates == 0
    assert sum(len(splits.split(s)) for s in SPLITS) == 120
    # The FaceSet ingest returns, from the manifest alone, is the same index as hashing the tree
    assert report.faceset.images == splits.images and report.faceset.classes == splits.classes
    assert report.faceset.fingerprint() == splits.fingerprint()
    again = ingest(store, dest, CFG)
    assert (again.new, again.skipped) == (0, 123)
    shutil.rmtree(dest)
    rebuilt = ingest(store, dest, CFG)
    assert (rebuilt.restored, rebuilt.missing) == (120, 0)
    assert_dest_matches_manifest(store, dest)


class VanishingStore(LocalStore):
    """A real folder store where another writer deletes ``victim`` right after it was listed."""

    victim = "incoming/a/gone.png"

    def list(self, prefix: str = "", start_after: str = ""):
        yield from super().list(prefix, start_after)
        (self.root / self.victim).unlink(missing_ok=True)


def test_odd_local_names_and_failed_downloads(tmp_path: Path) -> None:
    root = tmp_path / "bucket"
    for name, data in {"a/ok.png": png(), "a/gone.png": png(40, 40, (5, 5, 5)), "a/back\\slash.png": png(),
                       "a/new\nline.png": png(), "a/tab\tname.jpg": png()}.items():
        (root / "incoming" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "incoming" / name).write_bytes(data)
    store = VanishingStore(root)
    report = ingest(store, tmp_path / "face", CFG)
    assert (report.listed, report.new, report.quarantined, report.failed) == (5, 1, 3, 1)
    assert all(q["reason"].startswith("unsafe key") for q in report.quarantine)
    assert report.failures[0]["key"] == VanishingStore.victim and "FileNotFoundError" in report.failures[0]["error"]
    assert [r["key"] for r in read_manifest(store)] == ["incoming/a/ok.png"]
    # A failed download is not quarantined: once the object is back, the next night takes it.
    (root / VanishingStore.victim).write_bytes(png(40, 40, (5, 5, 5)))
    again = ingest(LocalStore(root), tmp_path / "face", CFG)
    assert (again.new, again.skipped, again.failed) == (1, 4, 0)


def test_empty_source_and_report(tmp_path: Path) -> None:
    (tmp_path / "bucket" / "incoming").mkdir(parents=True)
    report = ingest(LocalStore(tmp_path / "bucket"), tmp_path / "face")
    assert report == IngestReport()
    assert not (tmp_path / "bucket" / MANIFEST_KEY).exists()


def test_corrupt_manifest_stops_the_run_and_is_kept(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    store.put_bytes("incoming/a/x.png", png())
    store.put_bytes(MANIFEST_KEY, b'{"key": "k", "etag": "e", "size": 1}\n{not json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        ingest(store, tmp_path / "face")
    assert store.get_bytes(MANIFEST_KEY).endswith(b"{not json\n")


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 64}, "workers must be in \\[1, 32\\]"),
    ({"workers": 0}, "workers"),
    ({"min_side": 100, "max_side": 50}, "max_side must be >= min_side"),
    ({"split_fractions": (0.5, 0.5, 0.5)}, "split_fractions"),
])
def test_config_errors_name_the_value(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IngestConfig(**kwargs)
