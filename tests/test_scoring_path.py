"""The fast scoring path (each worker decodes into its batch array and runs a one-thread ORT session) gives the
rows and probabilities the reference path gives: PIL's pixels, one image at a time, ONNX Runtime's defaults."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from conftest import SHARED_FACES
from faceclf.config import ScoreConfig
from faceclf.dataset.layout import list_images
from faceclf.dataset.preprocess import pil_decode
from faceclf.serving.onnx_model import load_onnx_model
from faceclf.serving.stream import score_images, scoring_threads


def reference_probs(onnx_model: Path, files: list[Path], size: int) -> np.ndarray:
    """(N, C) probabilities: PIL decode per file, the default ORT session, one batch."""
    sess = ort.InferenceSession(str(onnx_model), providers=["CPUExecutionProvider"])
    pixels = np.stack([pil_decode(f.read_bytes(), size) for f in files])
    return np.exp(sess.run(None, {sess.get_inputs()[0].name: pixels})[0])


def photos_and_faces(faces: Path, folder: Path) -> list[Path]:
    """A folder of generated faces (JPEG and PNG) and, where ../shared has them, 40 face-mask photos (those with
    EXIF or other APP1/APP2 segments among them: they take PIL's header parser)."""
    shutil.copytree(faces, folder / "generated")
    if SHARED_FACES.is_dir():
        photos = list_images(SHARED_FACES)
        for f in photos[:: max(1, len(photos) // 40)]:
            (folder / "photos" / f.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, folder / "photos" / f.parent.name / f.name)
    return list_images(folder)


@pytest.mark.parametrize("workers,batch", [(1, 64), (2, 7), (3, 64)])
def test_csv_probabilities_are_the_reference_paths_within_1e6(onnx_model: Path, faces: Path, tmp_path: Path,
                                                              workers: int, batch: int) -> None:
    files = photos_and_faces(faces, tmp_path / "in")
    cfg = ScoreConfig(device="cpu", decode_workers=workers, batch_size=batch, part_rows=25)
    summary = score_images(onnx_model, [tmp_path / "in"], tmp_path / "p.csv", cfg)
    with open(tmp_path / "p.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    model = load_onnx_model(onnx_model, "cpu")
    want = reference_probs(onnx_model, files, model.image_size)
    assert summary.images == summary.scored == len(rows) == len(files)
    assert [r["path"] for r in rows] == sorted(str(p) for p in files)
    by_path = {r["path"]: r for r in rows}
    got = np.array([[float(by_path[str(f)][f"p_{c}"]) for c in model.classes] for f in files])
    assert np.abs(got - want).max() <= 1e-6  # 6 decimals in the CSV, same pixels, same model
    assert [by_path[str(f)]["predicted_class"] for f in files] == [model.classes[k] for k in want.argmax(1)]


def test_one_ort_thread_per_worker_only_where_workers_share_the_cores(onnx_model: Path) -> None:
    assert scoring_threads(ScoreConfig(decode_workers=2)) == 1
    assert scoring_threads(ScoreConfig(decode_workers=1)) == 0  # ORT's default: every core for the one caller
    model = load_onnx_model(onnx_model, "cpu", threads=1)
    options = model.session.get_session_options()
    assert options.intra_op_num_threads == 1
