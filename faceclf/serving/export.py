"""Export a checkpoint to a self-contained ONNX file and prove it matches torch.

The file gets a dynamic batch dimension and metadata (classes, mean, std, image size, version),
passes onnx.checker, and is only moved into place after onnxruntime reproduced torch's output on
a real batch within rtol 1e-3 / atol 1e-5.
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
from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)

INPUT_NAME = "input"      # float32 (batch, 3, S, S), RGB, normalised with the metadata's mean/std
OUTPUT_NAME = "log_probs" # float32 (batch, num_classes), log-softmax
RTOL, ATOL = 1e-3, 1e-5


class ExportParityError(RuntimeError):
    """onnxruntime's output differs from torch's beyond tolerance."""


@dataclass
class ExportReport:
    """What an export produced: the file, the version it carries and how close ORT came to torch."""

    path: Path
    version: str
    max_abs_diff: float
    batch: int


def parity_batch(ckpt: dict[str, Any]) -> torch.Tensor:
    """The real images stored in the checkpoint for parity checks, normalised: float (B, 3, S, S)."""
    images = ckpt.get("sample_images")
    if images is None or len(images) == 0:
        raise ValueError("checkpoint holds no sample_images for the parity check (was it written by faceclf train?)")
    return normalize(images, Preprocess.from_checkpoint(ckpt))


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


def add_metadata(proto: onnx.ModelProto, ckpt: dict[str, Any], version: str, source_sha256: str) -> None:
    """Write classes, normalisation, input size and version into the model's metadata_props."""
    props = {
        "classes": json.dumps(list(ckpt["classes"])),
        **Preprocess.from_checkpoint(ckpt).metadata(),  # image_size, mean, std, input_format
        "version": version,
        "output_format": "float32 (batch, classes) log-probabilities",
        "checkpoint_sha256": source_sha256,
        "producer": f"faceclf {__version__}",
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
    model = model_from_checkpoint(ckpt, "cpu")
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
