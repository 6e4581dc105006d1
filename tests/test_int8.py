"""The optional int8 model: `faceclf export --int8` calibrates on the run's validation images, writes
model.int8.onnx only when it agrees with fp32, and the score flow can use it (real ONNX Runtime sessions)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from faceclf.config import Int8Config
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.layout import list_images
from faceclf.serving.quantize import (
    QuantizationRefused,
    calibration_images,
    folder_files,
    int8_path,
    quantize_int8,
    validation_files,
)
from faceclf.serving.onnx_model import load_onnx_model, predict_proba
from test_cli import TINY, faceclf


@pytest.fixture(scope="module")
def exported(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained for 12 epochs on the sample faces and its fp32 export: RUN/model.onnx."""
    run = tmp_path_factory.mktemp("int8") / "run"
    faceclf("train", str(faces), "--out", str(run), "--epochs", "12", "--patience", "12", *TINY)
    faceclf("export", str(run / "checkpoint.pt"), "--out", str(run / "model.onnx"))
    return run


def test_export_int8_agrees_with_fp32_on_the_validation_images(exported: Path) -> None:
    run = exported
    out = json.loads(faceclf("export", str(run / "checkpoint.pt"), "--out", str(run / "model.onnx"), "--int8").stdout)
    q = out["int8"]
    assert Path(q["onnx"]) == run / "model.int8.onnx" == int8_path(run / "model.onnx")
    assert q["images"] == len(validation_files(run / "checkpoint.pt")) > 0
    assert q["agreement"] >= Int8Config().min_agreement and q["int8_images_per_s"] > 0

    fp32, int8 = load_onnx_model(run / "model.onnx"), load_onnx_model(run / "model.int8.onnx")
    assert int8.classes == fp32.classes and int8.takes_pixels and int8.image_size == fp32.image_size
    meta = {p.key: p.value for p in onnx.load(str(run / "model.int8.onnx")).metadata_props}
    assert meta["quantization"].startswith("int8 static QDQ") and float(meta["int8_agreement"]) == q["agreement"]
    assert any(n.op_type in ("QuantizeLinear", "QLinearConv", "ConvInteger") for n in onnx.load(str(run / "model.int8.onnx")).graph.node)

    images = calibration_images(validation_files(run / "checkpoint.pt"), fp32.preprocess, 512, 2)
    p32, p8 = predict_proba(fp32, images), predict_proba(int8, images)
    assert np.mean(p32.argmax(1) == p8.argmax(1)) == q["agreement"]  # what export measured, scored again here
    assert np.allclose(p8.sum(1), 1.0, atol=1e-4)


def test_an_int8_model_that_disagrees_is_refused_and_not_written(exported: Path, tmp_path: Path) -> None:
    fp32 = load_onnx_model(exported / "model.onnx")
    images = calibration_images(validation_files(exported / "checkpoint.pt"), fp32.preprocess, 512, 2)
    out = tmp_path / "refused.int8.onnx"
    grey = np.full_like(images, 128)  # calibrated on flat grey only: every activation range is wrong for faces
    with pytest.raises(QuantizationRefused, match=r"agrees with the fp32 model on .* of \d+ validation images, "
                                                  r"below the 99.50% required"):
        quantize_int8(exported / "model.onnx", grey, out, judge=images)
    assert not out.exists()


def test_calibration_folder_without_images_is_a_one_line_error(exported: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = faceclf("export", str(exported / "checkpoint.pt"), "--out", str(tmp_path / "m.onnx"), "--int8",
                   "--calibration", str(empty), check=False)
    assert proc.returncode == 2 and "holds no images" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "m.int8.onnx").exists()


def test_calibration_on_a_named_folder(exported: Path, faces: Path, tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    out = json.loads(faceclf("export", str(exported / "checkpoint.pt"), "--out", str(model), "--int8",
                             "--calibration", str(faces), "--calibration-images", "64").stdout)
    assert out["int8"]["images"] == 64 and (tmp_path / "m.int8.onnx").is_file()
    every = folder_files(faces)
    assert len(every) == len(set(every)) == len(list_images(faces)) == 123  # each image once, sub-folders included
    assert load_onnx_model(tmp_path / "m.int8.onnx").preprocess == Preprocess.from_metadata(
        {p.key: p.value for p in onnx.load(str(model)).metadata_props})
