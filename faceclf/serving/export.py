"""Export a checkpoint to a self-contained ONNX file and prove it matches torch.

The model takes pixels: uint8 RGB (batch, S, S, 3), as any decoder gives them after a resize. The cast,
/255, (x - mean) / std and the NHWC -> NCHW change are the graph's first nodes, so a client needs no
numpy normalisation and cannot get it wrong. Its last node divides by the temperature fitted on the run's
validation split (faceclf.training.calibrate), so its probabilities are calibrated. The file gets a dynamic
batch dimension and metadata (classes, mean, std, image size, input format, version, temperature, the test
figures monitoring compares nights against), passes onnx.checker, and is only moved into place after
onnxruntime reproduced torch's output on a real batch within rtol 1e-3 / atol 1e-5.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from faceclf import __version__
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import normalize
from faceclf.store.atomic import atomic_path
from faceclf.training.calibrate import calibrated
from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)

INPUT_NAME = "input"      # uint8 (batch, S, S, 3), RGB, resized to S x S (earlier exports: float32 NCHW, normalised)
OUTPUT_NAME = "log_probs" # float32 (batch, num_classes), log-softmax (calibrated: of the model's output / T)
RTOL, ATOL = 1e-3, 1e-5
INPUT_FORMAT = ("uint8 (batch, image_size, image_size, 3) RGB, resized to image_size x image_size; cast, /255, "
                "(x-mean)/std and NCHW inside the graph")


class ExportParityError(RuntimeError):
    """onnxruntime's output differs from torch's beyond tolerance."""


@dataclass
class ExportReport:
    """What an export produced: the file, the version it carries and how close ORT came to torch."""

    path: Path
    version: str
    max_abs_diff: float
    batch: int
    int8: dict[str, Any] | None = None  # the int8 model's figures (or why it was refused), when one was asked for


class PixelInput(torch.nn.Module):
    """``model`` behind its preprocessing and calibration: uint8 (B, S, S, 3) -> calibrated log-probabilities
    (B, C), log_softmax(model(x) / temperature); temperature 1.0 adds no node (the model's own output)."""

    def __init__(self, model: torch.nn.Module, preset: Preprocess, temperature: float = 1.0):
        super().__init__()
        self.model, self.preset, self.temperature = model, preset, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = self.model(normalize(x.permute(0, 3, 1, 2), self.preset))  # (B, S, S, 3) -> (B, 3, S, S) -> (B, C)
        return calibrated(log_probs, self.temperature)


def temperature_of(ckpt: dict[str, Any]) -> float:
    """The checkpoint's fitted temperature; 1.0 (uncalibrated) for checkpoints written before calibration."""
    return float(ckpt.get("temperature", 1.0))


def pixel_model(ckpt: dict[str, Any], model: torch.nn.Module | None = None) -> PixelInput:
    """The checkpoint's model (or ``model``) taking uint8 pixels, calibrated with its temperature, as exported."""
    return PixelInput(model if model is not None else model_from_checkpoint(ckpt, "cpu"),
                      Preprocess.from_checkpoint(ckpt), temperature_of(ckpt)).eval()


def parity_batch(ckpt: dict[str, Any]) -> torch.Tensor:
    """The real images stored in the checkpoint for parity checks: uint8 (B, S, S, 3)."""
    images = ckpt.get("sample_images")
    if images is None or len(images) == 0:
        raise ValueError("checkpoint holds no sample_images for the parity check (was it written by faceclf train?)")
    return images.permute(0, 2, 3, 1).contiguous()


def to_onnx_proto(model: torch.nn.Module, example: torch.Tensor) -> onnx.ModelProto:
    """torch.export-based ONNX graph of ``model`` with a dynamic batch dimension, weights inline."""
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        verbose=False,
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=65536)}},
        external_data=False,
        optimize=True,
    )
    return program.model_proto


def reference_figures(ckpt: dict[str, Any]) -> dict[str, str]:
    """The model's test figures, for monitoring between nights (what scoring sees vs what the test set saw):
    test_accuracy, test_n and test_predicted_shares (JSON {class: share of the test images predicted as it},
    the confusion matrix's column sums / n; rows are true classes, columns predictions). Empty where the
    checkpoint holds no test metrics (or measured no image)."""
    test = ckpt.get("metrics", {}).get("test")
    if not test or not test.get("n"):
        return {}
    n, columns = int(test["n"]), zip(*test["confusion_matrix"])  # columns: one per predicted class
    shares = {c: sum(col) / n for c, col in zip(ckpt["classes"], columns)}
    return {"test_accuracy": str(float(test["accuracy"])), "test_n": str(n),
            "test_predicted_shares": json.dumps(shares)}


def add_metadata(proto: onnx.ModelProto, ckpt: dict[str, Any], version: str, source_sha256: str) -> None:
    """Write classes, normalisation, input size, version, temperature and the test figures (``reference_figures``)
    into the model's metadata_props."""
    props = {
        "classes": json.dumps(list(ckpt["classes"])),
        **Preprocess.from_checkpoint(ckpt).metadata(),  # image_size, mean, std
        "input_format": INPUT_FORMAT,
        "version": version,
        "output_format": "float32 (batch, classes) log-probabilities",
        "checkpoint_sha256": source_sha256,
        "producer": f"faceclf {__version__}",
        "temperature": str(temperature_of(ckpt)),  # already applied by the graph: for reading, not for clients
        **reference_figures(ckpt),
    }
    onnx.helper.set_model_props(proto, props)


def check_parity(onnx_path: Path, model: torch.nn.Module, batch: torch.Tensor) -> float:
    """Run ``batch`` through torch and a CPU onnxruntime session; return max |diff| or raise.

    ``onnx_path`` may be any file, so its external-data locations are checked before onnxruntime opens it.
    """
    import onnxruntime as ort  # imported here: only export and score need it

    from faceclf.serving.safety import check_external_data

    check_external_data(onnx.load(str(onnx_path), load_external_data=False), Path(onnx_path))
    with torch.no_grad():
        expected = model(batch).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})[0]
    max_abs = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else float("inf")
    if not np.allclose(got, expected, rtol=RTOL, atol=ATOL):
        raise ExportParityError(
            f"onnxruntime output differs from torch: max abs diff {max_abs:.3g} "
            f"(shapes {got.shape} vs {expected.shape}; tolerance rtol={RTOL}, atol={ATOL})"
        )
    return max_abs


def export_onnx(checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], version: str | None = None) -> ExportReport:
    """Export ``checkpoint`` to ``out`` (atomically, only after checker and parity pass on its real images)."""
    checkpoint = Path(checkpoint)
    ckpt = load_checkpoint(checkpoint)
    model = pixel_model(ckpt)
    batch = parity_batch(ckpt)
    version = version or ckpt["version"]
    proto = to_onnx_proto(model, batch)
    add_metadata(proto, ckpt, version, hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    onnx.checker.check_model(proto, full_check=True)
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp), save_as_external_data=False)
        max_abs = check_parity(tmp, model, batch)
    log.info("exported %s (version %s): onnxruntime vs torch max abs diff %.3g on %d real images",
             out, version, max_abs, len(batch))
    return ExportReport(Path(out), version, max_abs, len(batch))
