"""Shared fixtures: a tiny generated face set on disk and a small config that trains in seconds."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import tempfile
from pathlib import Path

import numpy as np
import pytest

from faceclf.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from faceclf.devtools.sample import generate_sample_faces

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "datasets" / "face-mask"
# Flows here run on tmp_path folders, outside the worker's folder: allowed the way a deployment allows folders
# (faceclf.store.local_paths); the tests of the confinement itself unset it.
os.environ.setdefault("FACECLF_ALLOW_PATHS", tempfile.gettempdir())


def tiny_config(epochs: int = 4, **train: object) -> RunConfig:
    """32x32 inputs, a 2-block CNN: enough to learn the sample faces in a few CPU seconds."""
    return RunConfig(
        data=DataConfig(image_size=32, decode_workers=2),
        model=ModelConfig(image_size=32, conv_channels=(8, 16), fc_hidden=32, dropout=0.1),
        training=TrainConfig(epochs=epochs, batch_size=16, learning_rate=5e-3, patience=10, **train),
    )


@pytest.fixture(scope="session")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders with 60 generated faces each (48x48, JPEG and PNG) plus 3 exact duplicates."""
    root = tmp_path_factory.mktemp("faces")
    generate_sample_faces(root, per_class=60, size=48, seed=1)
    for i, src in enumerate(sorted((root / "with_mask").glob("*.jpg"))[:3]):
        shutil.copy(src, root / "with_mask" / f"copy_{i}.jpg")  # byte-identical: must be dropped
    return root


@pytest.fixture(scope="session")
def trained_run(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished training run on ``faces`` (shared by export/score/evaluate tests; do not modify)."""
    from faceclf.training.launch import run_training

    run = tmp_path_factory.mktemp("run")
    run_training(faces, run, tiny_config(epochs=6))
    return run


@pytest.fixture(scope="session")
def onnx_model(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``trained_run`` exported to ONNX (self-contained, metadata included, parity-checked)."""
    from faceclf.serving.export import export_onnx

    report = export_onnx(trained_run / "checkpoint.pt", tmp_path_factory.mktemp("onnx") / "model.onnx")
    assert report.max_abs_diff <= 1e-4 and report.batch > 1
    return report.path


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory):
    """A real S3 HTTP endpoint (moto server mode) on 127.0.0.1; boto3 in this process points at it."""
    from faceclf.devtools.services import local_s3_env, moto_s3_server

    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with moto_s3_server(log) as url, local_s3_env(url):
        yield url


@pytest.fixture()
def bucket(s3_endpoint: str) -> str:
    """A new, empty bucket on the local S3 endpoint, unique per test."""
    import uuid

    from faceclf.store.s3 import s3_client

    name = f"faceclf-test-{uuid.uuid4().hex[:12]}"
    s3_client().create_bucket(Bucket=name)
    return name


# Night settings for flow tests: tiny images and CNN so a night trains in seconds.
# They train from scratch (warm_start false): each night's model depends on its data alone, which the
# gate, resume and determinism tests rely on; tests/test_warmstart.py drives warm nights. The label audit
# (seconds a night: cleanlab's import, the champion on new and val images) is off but where a test drives it
# (tests/test_flows.py's third night); the demo and tests/test_e2e.py run it at its default.
FAST = {"epochs": 12, "image_size": 32, "batch_size": 16, "conv_channels": [8, 16], "learning_rate": 5e-3,
        "warm_start": False, "label_audit": "off"}
LENIENT = {"min_accuracy": 0.75, "min_class_accuracy": 0.6}  # small test sets: ~20 images
TOP_LEVEL = ("bucket", "face_dir", "runs_dir", "return_state")  # outside any group (and Prefect's own)


def grouped(**flat: object) -> dict[str, object]:
    """The train flow's parameters from the tests' flat shorthand (FAST, LENIENT...): each setting into its
    group (flows.params), e.g. min_accuracy -> {"gate": {"min_accuracy": ...}}."""
    from flows.params import TRAIN_GROUPS, new_places

    places, out = new_places(TRAIN_GROUPS), {}
    for name, value in flat.items():
        if name in TOP_LEVEL:
            out[name] = value
            continue
        group, field = places[name].split(".")
        out.setdefault(group, {})[field] = value  # type: ignore[union-attr]
    return out


HARNESS_DB = "prefect-test.db"  # the SQLite file prefect_test_harness creates in its temporary folder
_MIGRATED: dict[str, Path] = {}  # "db": a copy of a freshly migrated, still empty server database


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory: pytest.TempPathFactory):
    """A temporary Prefect server for the module, with telemetry off, as the demo's (no internet here: with it
    on, the server logs "Failed to send telemetry" errors).

    The first server of the session migrates its empty database (~21 s to start); the database is copied
    right after start-up, before any test writes to it, and every later module's server starts from that
    copy (~11 s): the same empty, migrated database, without running the migrations ten times.
    """
    import prefect.testing.utilities as harness

    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    template, made = _MIGRATED.get("db"), []
    fresh_folder = harness.mkdtemp

    def seeded_folder() -> str:
        folder = fresh_folder()
        made.append(Path(folder))
        if template is not None:
            shutil.copyfile(template, Path(folder) / HARNESS_DB)
        return folder

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(harness, "mkdtemp", seeded_folder)
        with harness.prefect_test_harness(server_startup_timeout=120):
            if template is None and made and (made[0] / HARNESS_DB).is_file():
                _MIGRATED["db"] = snapshot_sqlite(made[0] / HARNESS_DB,
                                                  tmp_path_factory.mktemp("prefect-db") / HARNESS_DB)
            yield


def snapshot_sqlite(src: Path, dst: Path) -> Path:
    """A consistent copy of a SQLite database another process has open (SQLite's online backup)."""
    import sqlite3

    with sqlite3.connect(src) as source, sqlite3.connect(dst) as target:
        source.backup(target)
    return dst


def upload_faces(bucket: str, root: Path, per_class: int, seed: int) -> int:
    """Generate faces and put them under incoming/<class>/."""
    from faceclf.store.s3 import s3_client

    generate_sample_faces(root, per_class=per_class, size=48, seed=seed)
    client, n = s3_client(), 0
    for p in sorted(root.rglob("*.*")):
        client.put_object(Bucket=bucket, Key=f"incoming/{p.parent.name}/s{seed}-{p.name}", Body=p.read_bytes())
        n += 1
    return n


def put_local_faces(bucket: Path, root: Path, per_class: int, seed: int) -> int:
    """Generate faces and put them under incoming/<class>/ of a local bucket folder."""
    generate_sample_faces(root, per_class=per_class, size=48, seed=seed)
    n = 0
    for p in sorted(root.rglob("*.*")):
        dest = bucket / "incoming" / p.parent.name / f"s{seed}-{p.name}"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(p, dest)
        n += 1
    return n


def tree(face: Path) -> dict[str, str]:
    """file name (sha256.ext) -> split, for every image under face/."""
    return {p.name: p.relative_to(face).parts[0] for p in face.rglob("*.*") if p.is_file() and not p.name.startswith(".")}


def onnx_accuracy(model_path: Path, folder: Path) -> float:
    """Accuracy of an exported model on folder/<class>/*, as any client runs it: from its metadata alone,
    decode and resize to uint8 pixels (the graph normalises them itself)."""
    import onnxruntime as ort

    from faceclf.dataset.preprocess import load_image

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    classes, size = json.loads(meta["classes"]), int(meta["image_size"])
    assert meta["input_format"].startswith("uint8 (batch, image_size, image_size, 3) RGB"), meta["input_format"]
    paths = sorted(folder.rglob("*.*"))
    pixels = np.stack([load_image(p, size) for p in paths])  # uint8 (N, S, S, 3)
    pred = session.run(None, {"input": pixels})[0].argmax(1)
    return float(np.mean([classes[k] == p.parent.name for k, p in zip(pred, paths)]))




TWIN_KINDS = ("noise", "resize", "rotate", "reencode")


def twin_images(src: Path, seed: int = 0) -> dict[str, bytes]:
    """Augmented copies of an image file, as people upload them: added noise (sigma 8, PNG), a 1.5x resize, a
    5-degree rotation and a JPEG re-encode at quality 50; each is new bytes (a new sha256) of the same photo."""
    import io

    from PIL import Image

    img = Image.open(src).convert("RGB")
    pixels = np.asarray(img).astype(np.int16)
    noisy = Image.fromarray((pixels + np.random.default_rng(seed).normal(0, 8, pixels.shape).round()).clip(0, 255)
                            .astype(np.uint8))

    def encoded(im: "Image.Image", fmt: str = "JPEG", quality: int = 92) -> bytes:
        buf = io.BytesIO()
        im.save(buf, format=fmt, quality=quality)
        return buf.getvalue()

    return {"noise": encoded(noisy, "PNG"), "resize": encoded(img.resize((img.width * 3 // 2, img.height * 3 // 2))),
            "rotate": encoded(img.rotate(5, resample=Image.Resampling.BICUBIC)), "reencode": encoded(img, quality=50)}


class Receiver:
    """A webhook on 127.0.0.1: every POST's JSON body, in order; it answers ``status``."""

    def __init__(self, status: int = 200) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append({"path": self.path, **json.loads(body or b"{}")})
                self.send_response(status)
                self.end_headers()

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - quiet
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.http = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}/night"
