"""The ONNX model for scoring: CUDA where a GPU is really there, else CPU, and it says which.

Loading (checked against its sha256), prediction on uint8 batches and evaluation on a labelled test
set. The bulk-scoring stream that feeds it is faceclf.serving.stream.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from faceclf.config import ScoreConfig
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.layout import list_images
from faceclf.dataset.preprocess import Preprocess
from faceclf.serving.safety import session_source

log = logging.getLogger(__name__)

CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"


@dataclass
class OnnxModel:
    """An onnxruntime session plus the preprocessing facts its metadata carries."""

    session: "object"
    path: Path
    classes: list[str]
    preprocess: Preprocess  # rebuilt from the model's own metadata
    version: str
    provider: str           # the execution provider that actually runs the model
    input_name: str
    takes_pixels: bool = True  # uint8 (B, S, S, 3) input; False: a float32 NCHW export of earlier versions
    reference: dict[str, Any] | None = None  # its own test figures: test_accuracy, test_n, predicted_shares
    temperature: float | None = None         # the calibration temperature folded into its output (None: uncalibrated)

    @property
    def image_size(self) -> int:
        """Side of the square input the model takes."""
        return self.preprocess.image_size


def gpu_present() -> bool:
    """True when a CUDA GPU is usable (asked through torch, which already ships the CUDA runtime)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # noqa: BLE001 - no torch or a broken driver both mean: no GPU for us
        return False


def providers_for(device: str) -> list[str]:
    """Providers to ask for: CUDA first only where a GPU is present (asking without one prints load errors)."""
    import onnxruntime as ort

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu":
        return [CPU_PROVIDER]
    want_cuda = gpu_present() and CUDA_PROVIDER in ort.get_available_providers()
    if device == "cuda" and not want_cuda:
        raise RuntimeError("device 'cuda' was asked for but no GPU / CUDA provider is available")
    if want_cuda:
        ort.preload_dlls()  # CUDA/cuDNN libraries from the pip-installed nvidia packages
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def _meta(meta: dict[str, str], key: str, path: Path) -> str:
    if key not in meta:
        raise ValueError(f"{path} has no '{key}' in its metadata; was it exported by `faceclf export`?")
    return meta[key]


def _share(value: Any) -> float:
    """A share in [0, 1] (a JSON number, not a bool); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{value!r} is not a share in [0, 1]")
    return float(value)


def _reference(meta: dict[str, str], classes: Sequence[str]) -> dict[str, Any]:
    """The test figures of the metadata as plain types; ValueError (or KeyError, TypeError) naming what is wrong."""
    accuracy = _share(float(meta["test_accuracy"]))
    n = int(meta["test_n"])
    shares = json.loads(meta["test_predicted_shares"])
    if n < 1 or not isinstance(shares, dict) or not set(shares) <= set(classes):
        raise ValueError(f"test_n {n} must be >= 1 and test_predicted_shares {str(shares)[:200]} a map from some of "
                         f"the model's classes {list(classes)} to shares")
    shares = {c: _share(shares.get(c, 0.0)) for c in classes}
    if abs(sum(shares.values()) - 1.0) > 0.01:  # rounded shares sum to 1 within their rounding
        raise ValueError(f"test_predicted_shares sum to {sum(shares.values()):.4f}, not 1")
    return {"test_accuracy": accuracy, "test_n": n, "predicted_shares": shares}


def reference_from_metadata(meta: dict[str, str], classes: Sequence[str], path: Path) -> dict[str, Any] | None:
    """The model's own test figures (export's "test_accuracy", "test_n", "test_predicted_shares"), which each
    scoring run's label-free estimate is set against (faceclf.serving.monitor). None for a model exported before
    them, and, with a warning, for props that are not what export writes: the file's sha256 is checked, but a
    malformed prop only costs the alarms, never the scoring run."""
    if "test_accuracy" not in meta:
        return None
    try:
        return _reference(meta, classes)
    except (KeyError, ValueError, TypeError) as e:
        log.warning("%s: ignoring its test reference metadata (%s: %s); scoring with no accuracy alarms",
                    path, type(e).__name__, str(e)[:200])
        return None


def temperature_from_metadata(meta: dict[str, str], path: Path) -> float | None:
    """The calibration temperature export folded into the model (a positive number); None without one, and,
    with a warning, when it is not a positive finite number."""
    if "temperature" not in meta:
        return None
    try:
        value = float(meta["temperature"])
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        log.warning("%s: ignoring its temperature metadata %r (not a positive number)", path, meta["temperature"][:80])
        return None
    return value


def load_onnx_model(path: str | os.PathLike[str], device: str = "auto", expected_sha256: str | None = None,
                    threads: int = 0) -> OnnxModel:
    """Open an exported model in onnxruntime and read its classes/normalisation metadata.

    ``threads``: ONNX Runtime's intra-op threads (0: its default, one per core). Bulk scoring passes 1 and
    runs one session call per worker thread: each core then decodes and scores its own batch, with no
    thread pool to wake per call (measured on 2 AVX2 cores, 64 px, batch 64: 2 callers x 1 thread
    4,943 img/s at 402 us of CPU an image; 1 caller x 2 threads 4,745 img/s at 405 us, 3,177 img/s at
    587 us with batches of 16).

    Before a session is created the file is checked: its sha256 against ``expected_sha256`` (when
    given) and every external-data location (it must stay inside the model's folder). Without
    external data the session is built from the very bytes that were checked.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {str(path)!r} does not exist")
    source = session_source(path, expected_sha256)
    providers = providers_for(device)
    options = ort.SessionOptions()
    # Scoring decodes the next batch on the same CPU cores while this one runs: ORT's default
    # busy-waiting threads would burn that CPU (measured: end-to-end 1,240 -> 1,475 img/s on 2 cores).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as e:  # onnxruntime's own exception types are not ValueError/RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"onnxruntime cannot open ONNX model {str(path)!r}: {first}") from e
    meta = session.get_modelmeta().custom_metadata_map
    provider = session.get_providers()[0]
    if device != "cpu" and gpu_present() and provider != CUDA_PROVIDER:
        log.warning("a GPU is present but onnxruntime fell back to %s", provider)
    classes = json.loads(_meta(meta, "classes", path))
    return OnnxModel(
        session=session,
        path=path,
        classes=classes,
        preprocess=Preprocess.from_metadata({k: _meta(meta, k, path) for k in ("image_size", "mean", "std")}),
        version=meta.get("version", "unknown"),
        provider=provider,
        input_name=session.get_inputs()[0].name,
        takes_pixels=session.get_inputs()[0].type == "tensor(uint8)",
        reference=reference_from_metadata(meta, classes, path),
        temperature=temperature_from_metadata(meta, path),
    )


def predict_log_proba(model: OnnxModel, images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> class log-probabilities (B, C), the model's raw output."""
    x = np.ascontiguousarray(images) if model.takes_pixels else model.preprocess.to_input(images)
    return model.session.run(None, {model.input_name: x})[0]


def predict_proba(model: OnnxModel, images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> class probabilities (B, C)."""
    return np.exp(predict_log_proba(model, images))


def labelled_files(data: FaceSet | str | os.PathLike[str], classes: list[str], version: str) -> tuple[list[Path], list[int]]:
    """(paths, class indices in ``classes``) of a FaceSet's test split, or of a folder of class folders.

    A class the model (``version``, knowing ``classes``) does not know is an error.
    """
    if isinstance(data, FaceSet):
        unknown = sorted(set(data.classes) - set(classes))
        test = data.split("test")
        found = [(data.file(i), i.label) for i in test]
    else:
        folder = Path(data)
        if not folder.is_dir():
            raise FileNotFoundError(f"data folder {str(folder)!r} does not exist or is not a folder")
        present = [p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
        unknown = sorted(set(present) - set(classes))
        found = [(p, c) for c in classes if (folder / c).is_dir() for p in list_images(folder / c)]
    if unknown:
        raise ValueError(f"{data if not isinstance(data, FaceSet) else 'the test set'} has classes {unknown} that "
                         f"model {version} does not know ({classes})")
    return [p for p, _ in found], [classes.index(c) for _, c in found]


def evaluate_onnx(model_path: str | os.PathLike[str], data: FaceSet | str | os.PathLike[str],
                  cfg: ScoreConfig | None = None, expected_sha256: str | None = None) -> dict:
    """Metrics of an exported model on a FaceSet's test split or a folder of class folders: the same dict
    as ``faceclf.training.loop.evaluate``. Used to re-score the champion on tonight's test set.

    No images gives n=0 and NaN loss/accuracy (which the gate rejects) rather than an error.
    """
    return evaluate_onnx_per_image(model_path, data, cfg, expected_sha256)[0]


def predict_files(model: OnnxModel, paths: Sequence[Path], labels: Sequence[int],
                  cfg: ScoreConfig) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """(log-probabilities (K, C), labels (K,), positions in ``paths``) of the files that decode."""
    from faceclf.dataset.tensors import decode_images

    images, ok, _ = decode_images(paths, model.preprocess, cfg.decode_workers, desc=f"decode ({model.version})")
    y = np.asarray([labels[i] for i in ok], dtype=np.int64)
    nhwc = images.permute(0, 2, 3, 1).numpy()  # (K, S, S, 3)
    log_probs = np.concatenate([predict_log_proba(model, nhwc[i:i + cfg.batch_size])
                                for i in range(0, len(nhwc), cfg.batch_size)]) if len(nhwc) else np.empty((0, len(model.classes)))
    return log_probs, y, ok


def accuracy_on(model_path: str | os.PathLike[str], paths: Sequence[Path], labels: Sequence[str],
                cfg: ScoreConfig | None = None, expected_sha256: str | None = None) -> float | None:
    """Share of ``paths`` (labelled ``labels``, class names) the model classifies right; None when none decodes
    or a label is a class the model does not know."""
    cfg = cfg or ScoreConfig()
    model = load_onnx_model(model_path, cfg.device, expected_sha256)
    if set(labels) - set(model.classes):
        return None
    log_probs, y, _ = predict_files(model, paths, [model.classes.index(c) for c in labels], cfg)
    return float(np.mean(log_probs.argmax(1) == y)) if len(y) else None


def evaluate_onnx_per_image(model_path: str | os.PathLike[str], data: FaceSet | str | os.PathLike[str],
                            cfg: ScoreConfig | None = None,
                            expected_sha256: str | None = None) -> tuple[dict, dict[str, str]]:
    """``evaluate_onnx``'s metrics and, for a FaceSet, each decoded test image's predicted class by sha256
    (the gate pairs them with the candidate's, image by image)."""
    import torch

    from faceclf.training.metrics import summarize

    cfg = cfg or ScoreConfig()
    model = load_onnx_model(model_path, cfg.device, expected_sha256)
    paths, labels = labelled_files(data, model.classes, model.version)
    log_probs, y, ok = predict_files(model, paths, labels, cfg)
    if not len(y):
        log.warning("no decodable images of classes %s in %s: empty metrics (n=0, accuracy NaN)", model.classes, data)
    loss_sum = float(-log_probs[np.arange(len(y)), y].sum()) if len(y) else 0.0
    predicted = log_probs.argmax(1)
    metrics = summarize(loss_sum, torch.from_numpy(predicted), torch.from_numpy(y), model.classes)
    per_image = {}
    if isinstance(data, FaceSet):
        shas = np.char.decode(data.split("test").sha256s).tolist()  # labelled_files' order
        per_image = {shas[i]: model.classes[int(p)] for i, p in zip(ok, predicted)}
    return metrics, per_image
