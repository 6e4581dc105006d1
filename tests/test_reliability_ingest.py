"""Ingest under hostile input and a failing S3: escapes, bad bytes and bombs, label conflicts, store
errors through the CLI, generated keys and bytes, throttling and dropped connections.

Everything runs the real path: the moto S3 server on 127.0.0.1 (conftest ``s3_endpoint``/``bucket``),
a second moto server with IAM authentication for credential errors, real files, the ``faceclf``
CLI as a subprocess, and ``tests/faults.py`` (an HTTP proxy in front of moto) for injected faults.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import urllib.request
import uuid
import zlib
from pathlib import Path, PurePosixPath

import boto3
import pytest
from faults import FaultProxy
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from faceclf.config import IngestConfig
from faceclf.dataset.checks import Checked, Refused, check_image, class_of
from faceclf.dataset.ingest import ingest
from faceclf.dataset.layout import SPLITS, split_of
from faceclf.dataset.manifest import (
    MANIFEST_KEY,
    QUARANTINE_KEY,
    read_manifest,
    read_quarantine,
)
from faceclf.dataset.tree import image_path
from faceclf.devtools.services import free_port, moto_s3_server
from faceclf.store.objects import LocalStore, ObjectInfo, Store
from faceclf.store.s3 import (
    S3Store,
    StoreError,
    StoreUnavailable,
    s3_client,
    store_error,
)

CFG = IngestConfig(workers=4)
NEW_CLASSES = IngestConfig(workers=4, allow_new_classes=True)  # takes a class neither manifest nor champion has
pytestmark = [  # what Pillow says about the generated garbage; check_image refuses it with a reason
    pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin"),
    pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning"),
]
SECRET = "very-secret-value"          # set as AWS_SECRET_ACCESS_KEY: must never be printed
KEY_ID = "AKIAFACECLFTESTKEY01"       # set as AWS_ACCESS_KEY_ID: must never be printed either


# ---------------------------------------------------------------------------------------------
# Image bytes: good, bad, and bombs (built without ever holding the decoded pixels)
# ---------------------------------------------------------------------------------------------
def png(w: int = 40, h: int = 40, color: tuple[int, int, int] = (10, 20, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "PNG")
    return buf.getvalue()


def noisy_jpeg(size: int = 64, seed: int = 0) -> bytes:
    """A JPEG with enough entropy that cutting it short really loses scan data."""
    rng = random.Random(seed)
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), rng.randbytes(size * size * 3)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def saved(fmt: str, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (40, 40), 7).save(buf, fmt)
    return buf.getvalue()


def psd(w: int = 40, h: int = 40) -> bytes:
    """A minimal Photoshop file (header, empty sections, raw RGB): Pillow opens it as PSD."""
    header = b"8BPS" + struct.pack(">H6sHIIHH", 1, b"", 3, h, w, 8, 3)
    return header + struct.pack(">IIIH", 0, 0, 0, 0) + bytes(w * h * 3)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def blank_png(w: int, h: int) -> bytes:
    """A complete, valid w x h black RGB PNG, built in a blink and a few MB of memory.

    Deflate blocks ended by a full flush do not refer to earlier data, so one compressed block of
    ``rows`` zero rows is repeated; the Adler-32 of n zero bytes is (n mod 65521) << 16 | 1.
    Decoding it really needs w*h*3 bytes (1.2 GB for 20000 x 20000).
    """
    row = 1 + 3 * w  # filter byte + pixels
    rows = 100
    assert h % rows == 0
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = deflate.compress(bytes(row * rows)) + deflate.flush(zlib.Z_FULL_FLUSH)
    n = row * h
    idat = b"\x78\xda" + block * (h // rows) + b"\x03\x00" + struct.pack(">I", ((n % 65521) << 16) | 1)
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_claiming(w: int, h: int) -> bytes:
    """A real 32x32 PNG whose IHDR says w x h (CRC fixed up): only the header is big."""
    data = bytearray(png(32, 32))
    data[16:24] = struct.pack(">II", w, h)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def jpeg_claiming(w: int, h: int) -> bytes:
    """A real 40x40 JPEG whose SOF0 header says w x h."""
    data = bytearray(saved("JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", h, w)
    return bytes(data)


def webp_claiming(w: int, h: int) -> bytes:
    """A real 40x40 extended (VP8X) WebP whose canvas header says w x h."""
    data = bytearray(saved("WEBP", "RGBA"))
    assert data[12:16] == b"VP8X"
    data[24:30] = (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    return bytes(data)


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def upload(bucket: str, objects: dict[str, bytes], endpoint: str | None = None) -> None:
    client = boto3.client("s3", endpoint_url=endpoint) if endpoint else s3_client()
    for key, data in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)


def incoming(store: Store) -> dict[str, str]:
    """key -> sha256 of everything under incoming/ (to show ingest never changes it)."""
    return {o.key: hashlib.sha256(store.get_bytes(o.key)).hexdigest() for o in store.list("incoming/")}


def fs_snapshot(root: Path, skip: Path) -> dict[str, tuple[str, int]]:
    """Every path below ``root`` except ``skip`` and what is below it: relpath -> (kind, size)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if here / d != skip]
        for name in dirnames + filenames:
            p = here / name
            st_ = p.lstat()
            out[p.relative_to(root).as_posix()] = ("dir" if p.is_dir() else "file", st_.st_size if p.is_file() else 0)
    return out


def dest_files(dest: Path) -> dict[str, str]:
    """dest-relative path -> sha256 of every file below dest."""
    return {p.relative_to(dest).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in dest.rglob("*") if p.is_file()}


def check_report_and_tree(store: Store, dest: Path, report) -> None:  # noqa: ANN001 - IngestReport
    """Invariants of every run: the counts add up, the report is JSON, dest holds exactly the "ok"
    rows' files (named by content, inside dest) and every quarantine row has a reason."""
    assert report.listed == report.new + report.skipped + report.duplicates + report.quarantined + report.failed
    assert report.quarantined == len(report.quarantine) and report.failed == len(report.failures)
    json.loads(json.dumps(report.to_dict()))
    ok = [r for r in read_manifest(store) if r["status"] == "ok"]
    files = dest_files(dest) if dest.exists() else {}
    assert sorted(files) == sorted(r["path"] for r in ok)
    for r in ok:
        assert files[r["path"]] == r["sha256"] and PurePosixPath(r["path"]).stem == r["sha256"]
        assert (dest / r["path"]).resolve().is_relative_to(dest.resolve())
    assert all(isinstance(q["reason"], str) and q["reason"] for q in report.quarantine)


# ---------------------------------------------------------------------------------------------
# 1. Hostile keys never write outside dest; they are quarantined and the night goes on
# ---------------------------------------------------------------------------------------------
def evil_keys(tag: str) -> dict[str, str]:
    """Key -> expected reason fragment. ``tag`` makes any escaped file findable by name."""
    return {
        f"incoming/../../../../../../../../tmp/escape-{tag}.jpg": "unsafe key",        # climbs to /tmp
        f"incoming/with_mask/../../../escape-{tag}.jpg": "unsafe key",                 # lands beside dest
        f"incoming/../escape-{tag}/x.jpg": "unsafe key",
        f"incoming/./with_mask/escape-{tag}.jpg": "unsafe key",
        f"incoming//tmp/escape-{tag}.jpg": "unsafe key",                               # empty class: absolute
        f"incoming/with_mask//escape-{tag}.jpg": "unsafe key",
        f"incoming/with_mask/..\\..\\..\\escape-{tag}.jpg": "unsafe key",               # backslashes
        f"incoming/C:\\escape-{tag}\\x.jpg": "unsafe key",
        f"incoming/with_mask/nul\x00escape-{tag}.jpg": "unsafe key",                   # NUL
        f"incoming/with_mask/del\x7fescape-{tag}.jpg": "unsafe key",                   # control character
        "incoming/with_mask/..": "unsafe key",
        "incoming/with_mask/.": "unsafe key",
        f"incoming/with_mask/{'n' * 300}-{tag}.jpg": "over 255 bytes",                 # part over NAME_MAX
        f"incoming/with_mask/{'é' * 110}-{tag}.jpg": "is over 200 bytes",              # 220+ bytes of UTF-8
        f"incoming/with_mask/{'x' * 900}/{tag}.jpg": "over 255 bytes",                 # ~1 KB key
        f"incoming/{'c' * 65}/{tag}.jpg": "over 64 characters",                        # class too long
        f"incoming/with_mask/{tag}.jpg/": None,                                        # folder marker: not listed
    }


def test_hostile_keys_never_write_outside_dest(bucket: str, tmp_path: Path) -> None:
    tag = uuid.uuid4().hex[:10]
    keys = evil_keys(tag)
    good = {"incoming/with_mask/good.png": png(), "incoming/without_mask/good.jpg": noisy_jpeg(seed=1)}
    upload(bucket, {**{k: png(40, 40, (i, 1, 2)) for i, k in enumerate(keys)}, **good})
    store = S3Store(bucket)
    listed = {o.key for o in store.list("incoming/")}
    assert listed == set(keys) | set(good), "the endpoint changed a key: the test would prove nothing"
    before_incoming = incoming(store)

    dest = tmp_path / "a" / "b" / "face"  # '../' from dest lands inside tmp_path, where the snapshot sees it
    dest.parent.mkdir(parents=True)  # dest itself is ingest's to create
    (tmp_path / "a" / "decoy.txt").write_text("must stay")
    before = fs_snapshot(tmp_path, skip=dest)

    report = ingest(store, dest, CFG)

    expected = {k: why for k, why in keys.items() if why}
    assert (report.listed, report.new, report.quarantined, report.failed) == (len(expected) + 2, 2, len(expected), 0)
    reasons = {q["key"]: q["reason"] for q in report.quarantine}
    assert sorted(reasons) == sorted(expected)
    for key, why in expected.items():
        assert why in reasons[key], (key, reasons[key])
    assert read_quarantine(store) == report.quarantine  # the same rows, reasons and all, in quarantine.jsonl
    check_report_and_tree(store, dest, report)
    assert sorted(r["key"] for r in read_manifest(store)) == sorted(good)  # the night went on

    assert fs_snapshot(tmp_path, skip=dest) == before, "ingest wrote outside dest"
    assert (tmp_path / "a" / "decoy.txt").read_text() == "must stay"
    for d in [dest, *dest.parents]:  # nothing named after the tag anywhere up to /
        if d.is_dir():
            assert not [n for n in os.listdir(d) if tag in n], d
    for key in expected:  # where a naive join of the key onto dest (or a split folder) would have written
        rel = key[len("incoming/"):].replace("\\", "/").replace("\x00", "")
        for base in [dest, *(dest / split for split in SPLITS)]:
            target = os.path.normpath(os.path.join(base, rel))
            if not target.startswith(f"{dest}{os.sep}") and Path(target) not in {dest, *dest.parents}:
                assert not os.path.lexists(target), target
    assert incoming(store) == before_incoming


def test_hostile_local_file_names(tmp_path: Path) -> None:
    """The folder source: names a file system allows but a key must not have."""
    root, dest = tmp_path / "bucket", tmp_path / "face"
    names = {"a/new\nline.png": "unsafe key", "a/tab\tname.png": "unsafe key", "a/back\\slash.png": "unsafe key",
             "a/esc\x1b[31m.png": "unsafe key", f"a/{'n' * 250}.png": "is over 200 bytes",
             "a/ok.png": None}
    for i, name in enumerate(names):
        (root / "incoming" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "incoming" / name).write_bytes(png(40, 40, (i, 9, 9)))
    before = fs_snapshot(tmp_path, skip=dest)
    report = ingest(LocalStore(root), dest, CFG)
    assert (report.new, report.quarantined) == (1, len(names) - 1)
    for q in report.quarantine:
        assert names[q["key"][len("incoming/"):]] in q["reason"]
    check_report_and_tree(LocalStore(root), dest, report)
    after = fs_snapshot(tmp_path, skip=dest)
    assert {k for k in after if k not in before} == {"bucket/datasets", "bucket/datasets/face",
                                                    "bucket/" + MANIFEST_KEY, "bucket/" + QUARANTINE_KEY}


# ---------------------------------------------------------------------------------------------
# 2. Bad bytes and bombs: quarantined with a reason, nothing enters dest, the bomb is never decoded
# ---------------------------------------------------------------------------------------------
BAD_BYTES = {  # name -> (bytes, expected reason fragment)
    "empty.jpg": (lambda: b"", "empty object (0 bytes)"),
    "random.jpg": (lambda: random.Random(3).randbytes(5000), "not an image: cannot identify image file"),
    "page.jpg": (lambda: b"<!DOCTYPE html><html><body><h1>403 Forbidden</h1></body></html>\n" * 30,
                 "not an image: cannot identify image file"),
    "truncated.jpg": (lambda: noisy_jpeg()[:2000], "truncated or corrupt image data"),
    "scan.jpg": (lambda: saved("TIFF"), "format TIFF not allowed (JPEG, PNG, WEBP)"),
    "layers.jpg": (lambda: psd(), "format PSD not allowed (JPEG, PNG, WEBP)"),
    "anim.png": (lambda: saved("GIF", "P"), "format GIF not allowed (JPEG, PNG, WEBP)"),
    "huge.png": (lambda: blank_png(6500, 6200), "image 6500x6200 is over the 40000000-pixel limit"),
    "bomb.png": (lambda: blank_png(20000, 20000), "over the 40000000-pixel limit (decompression bomb guard)"),
    "bomb_header.png": (lambda: png_claiming(20000, 20000), "over the 40000000-pixel limit"),
    "bomb.jpg": (lambda: jpeg_claiming(30000, 30000), "over the 40000000-pixel limit"),
    "bomb.webp": (lambda: webp_claiming(9000, 9000), "image 9000x9000 is over the 40000000-pixel limit"),
    "tiny.png": (lambda: png(8, 8), "image 8x8 has a side outside [32, 16384] pixels"),
}

CHILD = r"""
import json, sys
from PIL import Image
from faceclf.config import IngestConfig
from faceclf.dataset.ingest import ingest
from faceclf.store.s3 import S3Store

def peak_mb():
    # VmHWM: this process's own peak RSS (per address space, fresh at exec). ru_maxrss is not: Linux
    # carries the forking parent's RSS into it, so under a big pytest process it hides every peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB

store = S3Store(sys.argv[1])
store.exists("warm-up")  # boto3 loaded and a connection made before the baseline
before = peak_mb()
if sys.argv[4] == "ingest":
    report = ingest(store, sys.argv[2], IngestConfig(workers=4)).to_dict()
else:  # control, in its own process: decoding the 6500x6200 image (121 MB of RGB) shows in the peak
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(sys.argv[3]) as img:
        img.load()
    report = None
print(json.dumps({"report": report, "before": before, "after": peak_mb()}))
"""


def test_bad_bytes_quarantined_and_bombs_never_decoded(bucket: str, tmp_path: Path) -> None:
    objects = {f"incoming/with_mask/{name}": make() for name, (make, _) in BAD_BYTES.items()}
    bomb = objects["incoming/with_mask/bomb.png"]
    assert len(bomb) < 2 * 2**20 and struct.unpack(">II", bomb[16:24]) == (20000, 20000)  # 1.2 MB; 1.2 GB decoded
    with Image.open(io.BytesIO(blank_png(300, 200))) as small:  # the same construction decodes for real
        small.load()
        assert small.size == (300, 200) and small.getextrema() == ((0, 0),) * 3
    objects["incoming/with_mask/good.png"] = png()
    upload(bucket, objects)
    (tmp_path / "huge.png").write_bytes(objects["incoming/with_mask/huge.png"])
    dest = tmp_path / "face"

    # Ingest in a child process so its peak RSS (VmHWM) is its own, not this pytest process's.
    def child(mode: str) -> dict:
        out = subprocess.run([sys.executable, "-c", CHILD, bucket, str(dest), str(tmp_path / "huge.png"), mode],
                             capture_output=True, text=True, timeout=120, env=os.environ.copy())
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])

    result, probe = child("ingest"), child("control")  # separate processes: one peak cannot hide the other
    grew, control = result["after"] - result["before"], probe["after"] - probe["before"]
    assert control > 100, f"the RSS probe did not see a 121 MB decode (+{control:.0f} MB): it proves nothing"
    assert grew < 100, f"ingest's peak RSS grew by {grew:.0f} MB: something was decoded (the bomb needs 1200 MB)"
    print(f"peak RSS: {result['before']:.0f} MB before ingest, +{grew:.0f} MB during it, +{control:.0f} MB decoding "
          "the 6500x6200 control")

    report = result["report"]
    assert (report["new"], report["quarantined"], report["failed"]) == (1, len(BAD_BYTES), 0)
    reasons = {q["key"].rsplit("/", 1)[1]: q["reason"] for q in report["quarantine"]}
    for name, (_, why) in BAD_BYTES.items():
        assert why in reasons[name], (name, reasons[name])
    assert read_quarantine(S3Store(bucket)) == report["quarantine"]
    assert [p.name for p in dest.rglob("*") if p.is_file()] == [f"{hashlib.sha256(png()).hexdigest()}.png"]


# ---------------------------------------------------------------------------------------------
# 3. The same bytes under two classes: neither is trained on, in one run or across nights
# ---------------------------------------------------------------------------------------------
def test_conflict_within_a_run_and_later_copies(bucket: str, tmp_path: Path) -> None:
    face, other = noisy_jpeg(seed=5), png(40, 40, (1, 1, 1))
    sha = hashlib.sha256(face).hexdigest()
    upload(bucket, {"incoming/with_mask/a.jpg": face, "incoming/without_mask/b.jpg": face,
                    "incoming/without_mask/other.png": other})
    store = S3Store(bucket)
    before = incoming(store)
    dest = tmp_path / "face"

    r1 = ingest(store, dest, CFG)
    assert (r1.listed, r1.new, r1.duplicates, r1.quarantined, r1.failed) == (3, 2, 0, 1, 0)
    [q] = r1.quarantine
    assert (q["key"], q["sha256"], q["class"]) == ("incoming/without_mask/b.jpg", sha, "without_mask")
    assert q["reason"] == "conflict: same bytes as incoming/with_mask/a.jpg labelled with_mask"
    path = f"{split_of(sha, CFG.split_fractions)}/with_mask/{sha}.jpg"
    assert r1.conflicts == [{"sha256": sha, "keys": ["incoming/with_mask/a.jpg", "incoming/without_mask/b.jpg"],
                             "classes": ["with_mask", "without_mask"], "withdrawn": path}]
    assert not list(dest.rglob(f"{sha}.*")), "a conflicting image is still in the training tree"
    assert not (dest / path).parent.exists()  # with_mask has no image left: no empty class folder either
    rows = {r["key"]: r for r in read_manifest(store)}
    assert rows["incoming/with_mask/a.jpg"]["status"] == "conflict"
    assert rows["incoming/with_mask/a.jpg"]["conflict_with"] == "incoming/without_mask/b.jpg"
    assert rows["incoming/without_mask/other.png"]["status"] == "ok"
    assert r1.classes == {"without_mask": 1}
    assert read_quarantine(store) == r1.quarantine
    check_report_and_tree(store, dest, r1)
    json.loads(json.dumps(r1.to_dict()))

    # Next nights: more copies, in either class, are refused too; the conflict is reported again.
    upload(bucket, {"incoming/with_mask/a_again.jpg": face, "incoming/happy/c.jpg": face})
    r2 = ingest(store, dest, NEW_CLASSES)  # happy is a class nobody knew: taken, to meet the conflict
    assert (r2.new, r2.duplicates, r2.quarantined, r2.skipped) == (0, 0, 2, 3)
    assert all(q["reason"].startswith("conflict: same bytes as incoming/with_mask/a.jpg labelled with_mask, "
                                      "incoming/without_mask/b.jpg labelled without_mask") for q in r2.quarantine)
    assert r2.conflicts == [{"sha256": sha, "classes": ["happy", "with_mask", "without_mask"], "withdrawn": None,
                             "keys": ["incoming/happy/c.jpg", "incoming/with_mask/a.jpg",
                                      "incoming/with_mask/a_again.jpg", "incoming/without_mask/b.jpg"]}]
    assert not list(dest.rglob(f"{sha}.*"))
    check_report_and_tree(store, dest, r2)

    # A tree restored from a backup brings the image back: the next night takes it out again.
    (dest / path).parent.mkdir(parents=True)
    (dest / path).write_bytes(face)
    r3 = ingest(store, dest, CFG)
    assert (r3.new, r3.quarantined, r3.skipped, r3.conflicts) == (0, 0, 5, [])
    assert not list(dest.rglob(f"{sha}.*"))
    assert incoming(store) == {**before, "incoming/with_mask/a_again.jpg": sha, "incoming/happy/c.jpg": sha}


def test_conflict_found_on_a_later_night(tmp_path: Path) -> None:
    """Night 1 trains on x.png (and records its duplicate); night 2 brings the same bytes as another
    class: the image and its duplicate record are withdrawn, the newcomer quarantined."""
    store, dest = LocalStore(tmp_path / "bucket"), tmp_path / "face"
    face = png(48, 48, (90, 80, 70))
    sha = hashlib.sha256(face).hexdigest()
    store.put_bytes("incoming/with_mask/x.png", face)
    store.put_bytes("incoming/with_mask/x_copy.png", face)
    store.put_bytes("incoming/with_mask/keep.png", png(48, 48, (1, 2, 3)))
    r1 = ingest(store, dest, CFG)
    assert (r1.new, r1.duplicates, r1.conflicts) == (2, 1, [])
    assert list(dest.rglob(f"{sha}.png"))

    store.put_bytes("incoming/without_mask/y.png", face)
    r2 = ingest(store, dest, NEW_CLASSES)  # without_mask is new to this manifest
    assert (r2.new, r2.quarantined, r2.skipped) == (0, 1, 3)
    assert r2.conflicts[0]["keys"] == ["incoming/with_mask/x.png", "incoming/with_mask/x_copy.png",
                                       "incoming/without_mask/y.png"]
    assert r2.conflicts[0]["withdrawn"].endswith(f"/with_mask/{sha}.png")
    assert not list(dest.rglob(f"{sha}.*"))
    statuses = {r["key"]: r["status"] for r in read_manifest(store)}
    assert statuses == {"incoming/with_mask/x.png": "conflict", "incoming/with_mask/x_copy.png": "conflict",
                        "incoming/with_mask/keep.png": "ok"}
    assert r2.classes == {"with_mask": 1}
    check_report_and_tree(store, dest, r2)
    # Nothing lost: every object is still there.
    assert {o.key for o in store.list("incoming/")} == {"incoming/with_mask/x.png", "incoming/with_mask/x_copy.png",
                                                        "incoming/with_mask/keep.png", "incoming/without_mask/y.png"}


# ---------------------------------------------------------------------------------------------
# 5. Store errors: one line from the CLI, exit code 2, no traceback, no secret
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def iam_s3(tmp_path_factory: pytest.TempPathFactory):
    """A second moto server that checks credentials (moto's IAM auth): a bucket, a user allowed s3:*
    and a user allowed nothing. Yields (endpoint, bucket, {name: (key id, secret)})."""
    with moto_s3_server(tmp_path_factory.mktemp("moto-iam") / "moto.log") as url:
        admin = {"endpoint_url": url, "region_name": "us-east-1", "aws_access_key_id": "admin",
                 "aws_secret_access_key": "admin"}
        boto3.client("s3", **admin).create_bucket(Bucket="authbucket")
        iam, users = boto3.client("iam", **admin), {}
        for name, actions in (("reader", ["s3:*"]), ("nobody", [])):
            iam.create_user(UserName=name)
            key = iam.create_access_key(UserName=name)["AccessKey"]
            users[name] = (key["AccessKeyId"], key["SecretAccessKey"])
            if actions:
                policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}
                iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(policy))
        # From now on every request must be signed by a known key and allowed by its policy.
        req = urllib.request.Request(f"{url}/moto-api/reset-auth", data=b"0", method="POST",
                                     headers={"Content-Type": "text/plain"})
        urllib.request.urlopen(req, timeout=10).read()
        yield url, "authbucket", users


def run_cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "FACECLF_DEBUG"}
    return subprocess.run([sys.executable, "-m", "faceclf", *args], capture_output=True, text=True, timeout=120,
                          cwd=cwd, env={**base, "AWS_DEFAULT_REGION": "us-east-1", "AWS_MAX_ATTEMPTS": "2",
                                        "AWS_EC2_METADATA_DISABLED": "true", **env})


def assert_one_line_error(out: subprocess.CompletedProcess[str], command: str, *expected: str,
                          secrets: tuple[str, ...] = (SECRET, KEY_ID)) -> None:
    everything = out.stdout + out.stderr
    assert out.returncode == 2, everything[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"faceclf {command}: error: "), everything[-3000:]
    assert "Traceback" not in everything
    for s in secrets:
        assert s not in everything
    for e in expected:
        assert e in lines[0], (e, lines[0])


def test_cli_missing_bucket(s3_endpoint: str, tmp_path: Path) -> None:
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    out = run_cli(["ingest", "s3://missing-bucket", "face"], env, tmp_path)
    assert_one_line_error(out, "ingest", "S3 bucket 'missing-bucket' does not exist (NoSuchBucket, HTTP 404)",
                          f"endpoint {s3_endpoint}")
    out = run_cli(["models", "list", "--bucket", "s3://missing-bucket"], env, tmp_path)
    assert_one_line_error(out, "models", "S3 bucket 'missing-bucket' does not exist", f"endpoint {s3_endpoint}")
    assert not (tmp_path / "face").exists()


def test_cli_unreachable_endpoint(tmp_path: Path) -> None:
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {"AWS_ENDPOINT_URL": closed, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET}
    out = run_cli(["ingest", "s3://some-bucket", "face"], env, tmp_path)
    assert_one_line_error(out, "ingest", "cannot connect to the S3 endpoint after retries",
                          "(EndpointConnectionError)", "bucket 'some-bucket'", f"endpoint {closed}")


def test_cli_missing_credentials(s3_endpoint: str, tmp_path: Path) -> None:
    nowhere = str(tmp_path / "no-such-file")
    env = {"AWS_ENDPOINT_URL": s3_endpoint, "AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere}
    out = run_cli(["ingest", "s3://some-bucket", "face"], env, tmp_path)
    assert_one_line_error(out, "ingest", "no usable AWS credentials were found", "(NoCredentialsError)",
                          "bucket 'some-bucket'", f"endpoint {s3_endpoint}")


@pytest.mark.parametrize("who, expected", [
    pytest.param("wrong-secret", "S3 refused the request signature: the secret access key does not match the access "
                 "key id (wrong credentials: check AWS_SECRET_ACCESS_KEY / AWS_PROFILE) (SignatureDoesNotMatch, HTTP 403)",
                 id="wrong-secret"),
    pytest.param("unknown-key", "S3 does not know the access key id (wrong or missing credentials: check "
                 "AWS_ACCESS_KEY_ID / AWS_PROFILE) (InvalidAccessKeyId, HTTP 403)", id="unknown-key"),
    pytest.param("no-permission", "S3 access denied to s3://authbucket/models/face/lease.json: the credentials "
                 "lack permission for it (AccessDenied, HTTP 403)", id="no-permission"),  # the lease: its first read
])
def test_cli_refused_credentials(iam_s3, who: str, expected: str, tmp_path: Path) -> None:  # noqa: ANN001
    url, bucket, users = iam_s3
    key_id, secret = {"wrong-secret": (users["reader"][0], SECRET), "unknown-key": (KEY_ID, SECRET),
                      "no-permission": users["nobody"]}[who]
    env = {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret}
    out = run_cli(["ingest", f"s3://{bucket}", "face"], env, tmp_path)
    assert_one_line_error(out, "ingest", expected, f"bucket '{bucket}'", f"endpoint {url}", secrets=(key_id, secret))


def test_iam_server_accepts_the_right_credentials(iam_s3) -> None:  # noqa: ANN001
    """The control for the test above: the reader's real key passes the same server's checks.

    In-process, not through ``faceclf ingest``: moto 5.2's signature check rejects a correctly
    signed ListObjectsV2 whose prefix holds '/' (as incoming/ does), so a whole ingest cannot pass.
    """
    url, bucket, users = iam_s3
    key_id, secret = users["reader"]
    session = boto3.session.Session(aws_access_key_id=key_id, aws_secret_access_key=secret, region_name="us-east-1")
    store = S3Store(bucket, session.client("s3", endpoint_url=url))  # boto3's default session caches credentials
    store.put_bytes("incoming/a/x.png", png())
    assert store.get_bytes("incoming/a/x.png") == png() and store.exists("incoming/a/x.png")
    assert [o.key for o in store.list("incoming")] == ["incoming/a/x.png"]
    with pytest.raises(FileNotFoundError):
        store.get_bytes(MANIFEST_KEY)


def _client_error(code: str, status: int, message: str = "") -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": message}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "GetObject")


def _botocore(name: str, **kwargs: str) -> Exception:
    from botocore import exceptions

    return getattr(exceptions, name)(**kwargs)


@pytest.mark.parametrize("make, transient, expected", [
    (lambda: _botocore("ConnectTimeoutError", endpoint_url="http://x"), True, "cannot connect to the S3 endpoint"),
    (lambda: _botocore("ReadTimeoutError", endpoint_url="http://x"), True, "dropped or timed out the request for s3://b/k"),
    (lambda: _botocore("ConnectionClosedError", endpoint_url="http://x"), True, "dropped or timed out"),
    (lambda: _client_error("InternalError", 500), True, "S3 kept failing for s3://b/k after retries (InternalError, HTTP 500)"),
    (lambda: _botocore("NoCredentialsError"), False, "no usable AWS credentials were found"),
    (lambda: _botocore("PartialCredentialsError", provider="env", cred_var="AWS_SECRET_ACCESS_KEY"), False,
     "no usable AWS credentials were found"),
    (lambda: _botocore("SSLError", endpoint_url="https://x", error="bad cert"), False, "TLS handshake"),
    (lambda: _client_error("ExpiredToken", 400), False, "S3 credentials have expired"),
    (lambda: _client_error("403", 403), False, "S3 access denied to s3://b/k (wrong credentials or no permission)"),
    (lambda: _client_error("InvalidObjectState", 403, "The operation is not valid for the object's storage class"),
     False, "S3 refused the request for s3://b/k: The operation is not valid for the object's storage class"),
], ids=["connect-timeout", "read-timeout", "connection-closed", "500-after-retries", "no-credentials",
        "partial-credentials", "tls", "expired-token", "bare-403", "other-code"])
def test_store_error_kinds(make, transient: bool, expected: str) -> None:  # noqa: ANN001
    """Every translation names bucket and endpoint in one line; transient ones are ConnectionErrors, so a
    caller that retries I/O (flows/common.py retries OSError) retries them, and refusals it does not."""
    err = store_error(make(), "b", "http://user:pw@127.0.0.1:9", "k")
    text = str(err)
    assert isinstance(err, StoreError) and isinstance(err, RuntimeError) and "\n" not in text
    assert isinstance(err, StoreUnavailable) is transient and isinstance(err, OSError) is transient
    assert expected in text and text.endswith("; bucket 'b', endpoint http://127.0.0.1:9") and "pw" not in text


def test_upload_errors_are_translated_too(bucket: str, tmp_path: Path) -> None:
    """put_file goes through boto3's transfer manager, which wraps the ClientError in its own error."""
    (tmp_path / "m.onnx").write_bytes(b"model")
    with pytest.raises(StoreError, match="S3 bucket 'missing-bucket' does not exist \\(NoSuchBucket, HTTP 404\\)"):
        S3Store("missing-bucket").put_file("models/face/v1/model.onnx", tmp_path / "m.onnx")


# ---------------------------------------------------------------------------------------------
# 7. Generated keys and bytes: only typed outcomes, never an escape, never an unhandled exception
# ---------------------------------------------------------------------------------------------
PARTS = st.one_of(
    st.sampled_from(["..", ".", "", "with_mask", "a", "x.jpg", "y.PNG", "..\\x.jpg", "C:", "\x00", "~", "\u202e",
                     "n" * 256, "é" * 120, " ", ".hidden.png", "a.jpg\x00.png", "%2e%2e", "\\\\server\\share"]),
    st.text(max_size=12),
    st.text(st.characters(exclude_categories=("Cc", "Cs"), exclude_characters="/\\"), min_size=1, max_size=12),
)
EXTS = st.sampled_from(["", ".jpg", ".png", ".JPEG", ".txt"])
KEYS = st.one_of(
    st.tuples(PARTS, PARTS, EXTS).map(lambda t: f"incoming/{t[0]}/{t[1]}{t[2]}"),  # the expected shape
    st.tuples(st.lists(PARTS, min_size=1, max_size=4), EXTS).map(lambda t: "incoming/" + "/".join(t[0]) + t[1]),
    st.text(max_size=40),
)


def _seed_images() -> list[bytes]:
    return [png(), png(33, 70), noisy_jpeg(40), saved("JPEG", "L"), saved("PNG", "RGBA"), saved("PNG", "P"),
            saved("GIF", "P"), saved("TIFF"), saved("BMP"), png_claiming(9000, 9000), jpeg_claiming(40, 8),
            saved("WEBP"), saved("WEBP", "RGBA"), webp_claiming(9000, 9000)]


SEEDS = _seed_images()


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    """Mostly mutated real images (cut, bytes flipped, junk inserted), some pure noise."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=600))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 3))):
        op, at = draw(st.sampled_from(["cut", "flip", "insert", "none"])), draw(st.integers(0, len(data)))
        if op == "cut":
            del data[at:]
        elif op == "flip" and at < len(data):
            data[at] ^= draw(st.integers(1, 255))
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(data)


KEY_REASONS = ("unsafe key", "is not incoming/<class>/<name>", "hidden", "class name", "file name", "extension",
               "empty object", "-byte limit")
FAST = settings(deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@settings(FAST, max_examples=500)
@given(key=KEYS, size=st.integers(0, 5000) | st.integers(0, 2 * CFG.max_bytes))
def test_generated_keys(key: str, size: int) -> None:
    dest = Path("/srv/faceclf/face")
    try:
        cls = class_of(ObjectInfo(key, "etag", size), CFG)
    except Refused as e:
        assert str(e)
        event("refused: " + next((w for w in KEY_REASONS if w in str(e)), "other"))
        return
    event("accepted")
    assert key.startswith("incoming/") and key.count("/") == 2 and key.split("/")[1] == cls
    assert 1 <= size <= CFG.max_bytes
    assert cls not in ("", ".", "..") and not set(cls) & {"/", "\\", "\x00"} and len(cls) <= 64
    for fmt in ("JPEG", "PNG", "WEBP"):
        rel = image_path("0" * 64, cls, fmt, split_of("0" * 64, CFG.split_fractions))
        assert os.path.normpath(dest / rel).startswith(f"{dest}/") and ".." not in PurePosixPath(rel).parts
    assert os.path.normpath(dest.joinpath(*key.split("/"))).startswith(f"{dest}/")  # as LocalStore reads it


@settings(FAST, max_examples=400)
@given(data=image_bytes())
def test_generated_image_bytes(data: bytes) -> None:
    try:
        img = check_image(data, CFG)
    except Refused as e:
        assert str(e)
        event(f"refused: {str(e)[:24]}")
        return
    event(f"accepted {img.format}")
    assert isinstance(img, Checked) and img.format in CFG.allowed_formats
    assert CFG.min_side <= img.width <= CFG.max_side and CFG.min_side <= img.height <= CFG.max_side
    assert img.width * img.height <= CFG.max_pixels and img.sha256 == hashlib.sha256(data).hexdigest()


GOOD_SEEDS = 6  # SEEDS[:6] are acceptable images: the same few bytes under several classes make conflicts
NAME = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="/\x00"), min_size=1, max_size=20)
CLASS = st.sampled_from(["with_mask", "without_mask", "é é", ".x"]) | NAME
FILE = st.sampled_from(["a.png", "b.jpg", "c.JPEG"]) | NAME.map(lambda n: n + ".png") | NAME
CONTENT = st.sampled_from(range(GOOD_SEEDS)) | st.sampled_from(range(len(SEEDS))) | image_bytes()
LOCAL_OBJECTS = st.lists(st.tuples(CLASS, FILE, CONTENT), min_size=1, max_size=6, unique_by=lambda t: (t[0], t[1]))
S3_KEYS = st.tuples(CLASS, FILE).map(lambda t: f"incoming/{t[0]}/{t[1]}") | KEYS


def _check_run(store: Store, dest: Path, root: Path, before: dict[str, tuple[str, int]], objects: dict) -> None:
    """One generated night and the one after it: typed outcomes, no escape, conflicts held out."""
    report = ingest(store, dest, IngestConfig(workers=2))
    check_report_and_tree(store, dest, report)
    for what in ("new", "duplicates", "quarantined", "conflicts"):
        if getattr(report, what):
            event(f"night with {what}")
    assert report.failed == 0 and report.restored == report.missing == 0
    after = fs_snapshot(root, skip=dest)
    assert {k for k in after if k not in before} <= {"bucket/datasets", "bucket/datasets/face",
                                                     "bucket/" + MANIFEST_KEY, "bucket/" + QUARANTINE_KEY}
    # Every sha whose accepted copies carry two classes is out of the tree.
    classes: dict[str, set[str]] = {}
    for key, data in objects.items():
        try:
            cls = class_of(ObjectInfo(key, "e", len(data)), CFG)
            classes.setdefault(check_image(data, CFG).sha256, set()).add(cls)
        except Refused:
            pass
    held = {r["sha256"] for r in read_manifest(store) if r["status"] == "ok"}
    assert held == {sha for sha, c in classes.items() if len(c) == 1}
    again = ingest(store, dest, IngestConfig(workers=2))
    assert (again.new, again.quarantined, again.skipped) == (0, 0, again.listed)


@settings(FAST, max_examples=50)
@given(objects=LOCAL_OBJECTS)
def test_generated_local_nights(objects: list) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        files: dict[str, bytes] = {}
        for cls, name, content in objects:
            if cls in (".", "..") or name in (".", "..") or len(name.encode()) > 255 or len(cls.encode()) > 255:
                continue  # the file system itself refuses these (or they would leave root when written)
            data = SEEDS[content] if isinstance(content, int) else content
            path = root / "bucket" / "incoming" / cls / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            files[f"incoming/{cls}/{name}"] = data
        before = fs_snapshot(root, skip=root / "face")
        _check_run(LocalStore(root / "bucket"), root / "face", root, before, files)


@settings(FAST, max_examples=15)
@given(objects=st.dictionaries(S3_KEYS.filter(lambda k: "\n" not in k and "\r" not in k and 0 < len(k.encode()) <= 1024),
                               CONTENT, min_size=1, max_size=5))
def test_generated_s3_nights(s3_endpoint: str, objects: dict) -> None:
    bucket = f"faceclf-gen-{uuid.uuid4().hex[:12]}"
    client = s3_client()
    client.create_bucket(Bucket=bucket)
    files = {k: SEEDS[v] if isinstance(v, int) else v for k, v in objects.items()}
    for key, data in files.items():
        client.put_object(Bucket=bucket, Key=key, Body=data)
    store = S3Store(bucket, client)
    files = {o.key: files[o.key] for o in store.list("incoming/") if not o.key.endswith("/")}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "bucket").mkdir()  # nothing may appear here: the bucket is remote
        before = fs_snapshot(root, skip=root / "face")
        _check_run(store, root / "face", root, before, files)
        assert not any((root / "bucket").iterdir())


# ---------------------------------------------------------------------------------------------
# 8. Throttling and dropped connections are retried; refusals are not, and are reported
# ---------------------------------------------------------------------------------------------
@pytest.fixture()
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch):
    """A fault proxy in front of the moto server; boto3 clients made in the test go through it."""
    with FaultProxy(s3_endpoint) as p:
        monkeypatch.setenv("AWS_ENDPOINT_URL", p.url)
        yield p


def test_faults_are_retried_or_reported(bucket: str, s3_endpoint: str, proxy: FaultProxy, tmp_path: Path) -> None:
    objects = {f"incoming/a/{name}.png": png(40, 40, (i * 30, 5, 5)) for i, name in
               enumerate(["slow", "reset", "cut", "denied", "gone", "fine"])}
    upload(bucket, objects, endpoint=s3_endpoint)  # straight to moto
    proxy.add("slow.png", "slowdown", times=2)     # 503 SlowDown twice
    proxy.add("reset.png", "reset", times=2)       # TCP reset, no response, twice
    proxy.add("cut.png", "truncate", times=1)      # headers, half the body, connection closed
    proxy.add("denied.png", "denied")              # 403 AccessDenied, always
    proxy.add("gone.png", "nosuchkey")             # 404 NoSuchKey, always (deleted after the listing)
    proxy.add("manifest.jsonl", "slowdown", times=1, method="PUT")
    store, dest = S3Store(bucket), tmp_path / "face"
    assert store.client.meta.endpoint_url == proxy.url

    report = ingest(store, dest, CFG)
    assert (report.listed, report.new, report.failed, report.quarantined) == (6, 4, 2, 0)
    counts = {n: proxy.count(f"{n}.png") for n in ("slow", "reset", "cut", "denied", "gone", "fine")}
    assert counts == {"slow": 3, "reset": 3, "cut": 2, "denied": 1, "gone": 1, "fine": 1}
    assert proxy.count("manifest.jsonl", "PUT") == 2  # one answered 503 SlowDown, then the retried one
    failures = {f["key"]: f["error"] for f in report.failures}
    assert failures["incoming/a/denied.png"].startswith(
        "StoreError: S3 access denied to s3://%s/incoming/a/denied.png: the credentials lack permission" % bucket)
    assert "(AccessDenied, HTTP 403)" in failures["incoming/a/denied.png"]
    assert failures["incoming/a/gone.png"] == f"FileNotFoundError: s3://{bucket}/incoming/a/gone.png does not exist"
    ok = {r["key"]: r for r in read_manifest(store)}
    assert sorted(ok) == ["incoming/a/cut.png", "incoming/a/fine.png", "incoming/a/reset.png", "incoming/a/slow.png"]
    for key, row in ok.items():
        assert row["sha256"] == hashlib.sha256(objects[key]).hexdigest()  # whole bodies, not the cut one
    check_report_and_tree(store, dest, report)
    assert not read_quarantine(store)  # a refused download is not the object's fault

    # Next night the refusals are tried again (once each); once they clear, the objects come in.
    again = ingest(store, dest, CFG)
    assert (again.new, again.failed, again.skipped) == (0, 2, 4)
    assert (proxy.count("denied.png"), proxy.count("gone.png")) == (2, 2)
    proxy.rules.clear()
    healed = ingest(store, dest, CFG)
    assert (healed.new, healed.failed, healed.skipped) == (2, 0, 4)


def test_throttling_that_never_ends_is_reported_after_bounded_retries(bucket: str, s3_endpoint: str, proxy: FaultProxy,
                                                                      tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")  # s3_client leaves the attempt count to this when it is set
    upload(bucket, {"incoming/a/busy.png": png(), "incoming/a/fine.png": png(40, 40, (1, 1, 1))}, endpoint=s3_endpoint)
    proxy.add("busy.png", "slowdown")
    report = ingest(S3Store(bucket), tmp_path / "face", CFG)
    assert (report.new, report.failed) == (1, 1) and proxy.count("busy.png") == 3
    assert report.failures[0]["error"].startswith(
        f"StoreUnavailable: S3 kept failing for s3://{bucket}/incoming/a/busy.png after retries (SlowDown, HTTP 503)")
