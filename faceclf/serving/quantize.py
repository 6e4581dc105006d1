"""An optional int8 model: ONNX Runtime static quantization, kept only where it agrees with the fp32 model.

    model.onnx (fp32, uint8 pixels in) + the run's validation images
        -> quant_pre_process (shape inference, graph clean-up)
        -> quantize_static: QDQ, int8 per-channel weights, uint8 activations, calibrated on the images
           (the input's cast and normalisation stay float: only convolutions, matrix products, ReLU and pooling
           are quantized)
        -> agreement: the share of the calibration images on which both models predict the same class;
           below ``Int8Config.min_agreement`` the int8 file is refused (QuantizationRefused) and not written
        -> model.int8.onnx, atomically, with the fp32 model's metadata plus what was measured

Whether int8 is faster depends on the CPU (VNNI/AMX int8 instructions); ``faceclf export --int8`` says
both speeds, measured on the same images, and the README the figures per CPU.
"""

from __future__ import annotations

import csv
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from faceclf.config import Int8Config
from faceclf.dataset.faceset import evenly_spread
from faceclf.dataset.layout import list_images
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import decode_images
from faceclf.store.atomic import atomic_path

log = logging.getLogger(__name__)

INT8_SUFFIX = ".int8.onnx"
QUANTIZED_OPS = ["Conv", "MatMul", "Gemm", "Relu", "MaxPool"]


class QuantizationRefused(ValueError):
    """The int8 model disagrees with the fp32 model on too many images (or there are none to judge by)."""


@dataclass
class Int8Report:
    """What quantization produced and measured, on the calibration images."""

    path: Path
    images: int
    agreement: float        # share of images with the same predicted class as fp32
    max_prob_diff: float    # largest |p_int8 - p_fp32| over images and classes
    fp32_img_s: float
    int8_img_s: float

    @property
    def speedup(self) -> float:
        """int8 images/s over fp32 images/s on this machine."""
        return self.int8_img_s / self.fp32_img_s if self.fp32_img_s else float("nan")


def int8_path(fp32_path: str | os.PathLike[str]) -> Path:
    """model.onnx -> model.int8.onnx, beside it."""
    p = Path(fp32_path)
    return p.with_name(p.name[: -len(".onnx")] + INT8_SUFFIX if p.name.endswith(".onnx") else p.name + INT8_SUFFIX)


def validation_files(checkpoint: str | os.PathLike[str]) -> list[Path]:
    """The val images of the run that wrote ``checkpoint``: splits.csv beside it (as `faceclf train` writes)."""
    splits = Path(checkpoint).parent / "splits.csv"
    if not splits.is_file():
        raise FileNotFoundError(f"no {splits} beside the checkpoint to calibrate the int8 model on: pass "
                                "--calibration FOLDER (images like the ones the model will score)")
    with open(splits, newline="", encoding="utf-8") as f:
        files = [Path(r["path"]) for r in csv.DictReader(f) if r["split"] == "val"]
    present = [p for p in files if p.is_file()]
    if not present:
        raise FileNotFoundError(f"none of the {len(files)} val images listed in {splits} are there any more: pass "
                                "--calibration FOLDER")
    return present


def calibration_images(files: Sequence[Path], preset: Preprocess, limit: int, workers: int) -> np.ndarray:
    """uint8 (N, S, S, 3) of at most ``limit`` of ``files`` (evenly spread over the sorted list)."""
    ordered = sorted(files)
    chosen = [ordered[k] for k in evenly_spread(len(ordered), limit)]
    images, _, _ = decode_images(chosen, preset, workers, desc="decode (calibration)")
    if not len(images):
        raise QuantizationRefused("none of the calibration images decoded: nothing to calibrate or judge by")
    return images.permute(0, 2, 3, 1).contiguous().numpy()


class _Batches:
    """ONNX Runtime's CalibrationDataReader over uint8 (N, S, S, 3) images, in batches."""

    def __init__(self, input_name: str, images: np.ndarray, batch: int):
        self._it: Iterator[dict[str, np.ndarray]] = iter(
            [{input_name: images[i:i + batch]} for i in range(0, len(images), batch)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)


def _session(path: Path):  # noqa: ANN202 - an onnxruntime InferenceSession
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _probs(session, images: np.ndarray, batch: int) -> tuple[np.ndarray, float]:  # noqa: ANN001
    """(probabilities (N, C), images/s of the best of three passes) of ``session`` on ``images``."""
    name = session.get_inputs()[0].name
    best, out = float("inf"), None
    for _ in range(3):
        t0 = time.perf_counter()
        out = np.concatenate([session.run(None, {name: images[i:i + batch]})[0] for i in range(0, len(images), batch)])
        best = min(best, time.perf_counter() - t0)
    return np.exp(out), len(images) / best


def quantize_int8(fp32_path: str | os.PathLike[str], images: np.ndarray, out: str | os.PathLike[str] | None = None,
                  cfg: Int8Config | None = None, judge: np.ndarray | None = None) -> Int8Report:
    """Quantize the fp32 model at ``fp32_path`` to int8, calibrated on ``images`` (uint8 (N, S, S, 3)), and
    write it to ``out`` (default: model.int8.onnx beside it) only if it agrees with fp32 on at least
    ``cfg.min_agreement`` of the ``judge`` images (default: the same validation images);
    QuantizationRefused (nothing written) otherwise."""
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    cfg = cfg or Int8Config()
    fp32_path = Path(fp32_path)
    out = Path(out) if out else int8_path(fp32_path)
    fp32 = _session(fp32_path)
    with tempfile.TemporaryDirectory(prefix="faceclf-int8-") as tmp:
        pre, q = Path(tmp) / "pre.onnx", Path(tmp) / "int8.onnx"
        quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(q), _Batches(fp32.get_inputs()[0].name, images, cfg.batch_size),
                        quant_format=QuantFormat.QDQ, op_types_to_quantize=QUANTIZED_OPS, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, reduce_range=cfg.reduce_range)
        judge = images if judge is None else judge
        p32, fp32_rate = _probs(fp32, judge, cfg.batch_size)
        p8, int8_rate = _probs(_session(q), judge, cfg.batch_size)
        agreement = float(np.mean(p32.argmax(1) == p8.argmax(1)))
        max_diff = float(np.max(np.abs(p32 - p8)))
        log.info("int8 vs fp32 on %d validation images: agreement %.4f, max |dp| %.3g; %.0f vs %.0f images/s",
                 len(judge), agreement, max_diff, int8_rate, fp32_rate)
        if agreement < cfg.min_agreement:
            raise QuantizationRefused(
                f"the int8 model agrees with the fp32 model on {agreement:.2%} of {len(judge)} validation images, "
                f"below the {cfg.min_agreement:.2%} required: not written (the fp32 model is unaffected)")
        model = onnx.load(str(q))
        props = {p.key: p.value for p in onnx.load(str(fp32_path), load_external_data=False).metadata_props}
        props.update(quantization=f"int8 static QDQ (per-channel int8 weights, uint8 activations), calibrated on "
                                  f"{len(images)} validation images",
                     int8_agreement=f"{agreement:.6f}", int8_images=str(len(judge)))
        onnx.helper.set_model_props(model, props)
        with atomic_path(out) as tmp_out:
            onnx.save_model(model, str(tmp_out))
    return Int8Report(out, len(judge), agreement, max_diff, fp32_rate, int8_rate)


def folder_files(folder: str | os.PathLike[str]) -> list[Path]:
    """Every image under ``folder`` (class sub-folders or not), for --calibration."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"calibration folder {str(folder)!r} does not exist or is not a folder")
    files = list_images(folder)
    if not files:
        raise FileNotFoundError(f"calibration folder {str(folder)!r} holds no images")
    return files


def export_int8(checkpoint: str | os.PathLike[str], fp32_path: str | os.PathLike[str], cfg: Int8Config | None = None,
                calibration: str | os.PathLike[str] | None = None) -> Int8Report:
    """model.int8.onnx beside the exported ``fp32_path`` of ``checkpoint``, calibrated on the run's validation
    images (or every image under ``calibration``) at the model's own input size."""
    from faceclf.training.checkpoint import load_checkpoint

    cfg = cfg or Int8Config()
    preset = Preprocess.from_checkpoint(load_checkpoint(Path(checkpoint)))
    files = folder_files(calibration) if calibration else validation_files(checkpoint)
    images = calibration_images(files, preset, cfg.calibration_images, workers=os.cpu_count() or 1)
    return quantize_int8(fp32_path, images, cfg=cfg)
