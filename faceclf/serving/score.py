"""Batch scoring with ONNX Runtime: CUDA where a GPU is really there, else CPU, and it says which.

Decoding of the next batch runs in threads while the current batch is in the model, so the
slower of the two sets the pace, not their sum.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from faceclf.config import ScoreConfig
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.layout import list_images
from faceclf.dataset.preprocess import Preprocess
from faceclf.progress import progress
from faceclf.serving.safety import session_source
from faceclf.store.atomic import atomic_path, remove_stale_temps

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


def load_onnx_model(path: str | os.PathLike[str], device: str = "auto", expected_sha256: str | None = None) -> OnnxModel:
    """Open an exported model in onnxruntime and read its classes/normalisation metadata.

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
    try:
        session = ort.InferenceSession(source, options, providers=providers)
    except Exception as e:  # onnxruntime's own exception types are not ValueError/RuntimeError
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"onnxruntime cannot open ONNX model {str(path)!r}: {first}") from e
    meta = session.get_modelmeta().custom_metadata_map
    provider = session.get_providers()[0]
    if device != "cpu" and gpu_present() and provider != CUDA_PROVIDER:
        log.warning("a GPU is present but onnxruntime fell back to %s", provider)
    return OnnxModel(
        session=session,
        path=path,
        classes=json.loads(_meta(meta, "classes", path)),
        preprocess=Preprocess.from_metadata({k: _meta(meta, k, path) for k in ("image_size", "mean", "std")}),
        version=meta.get("version", "unknown"),
        provider=provider,
        input_name=session.get_inputs()[0].name,
    )


def predict_log_proba(model: OnnxModel, images: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) -> class log-probabilities (B, C), the model's raw output."""
    return model.session.run(None, {model.input_name: model.preprocess.to_input(images)})[0]


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
    import torch

    from faceclf.dataset.tensors import decode_images
    from faceclf.training.metrics import summarize

    cfg = cfg or ScoreConfig()
    model = load_onnx_model(model_path, cfg.device, expected_sha256)
    paths, labels = labelled_files(data, model.classes, model.version)
    images, ok, _ = decode_images(paths, model.preprocess, cfg.decode_workers, desc="decode (champion)")
    y = np.asarray([labels[i] for i in ok], dtype=np.int64)
    nhwc = images.permute(0, 2, 3, 1).numpy()  # (N, S, S, 3)
    log_probs = np.concatenate([predict_log_proba(model, nhwc[i:i + cfg.batch_size])
                                for i in range(0, len(nhwc), cfg.batch_size)]) if len(nhwc) else np.empty((0, len(model.classes)))
    if not len(y):
        log.warning("no decodable images of classes %s in %s: empty metrics (n=0, accuracy NaN)", model.classes, data)
    loss_sum = float(-log_probs[np.arange(len(y)), y].sum()) if len(y) else 0.0
    return summarize(loss_sum, torch.from_numpy(log_probs.argmax(1)), torch.from_numpy(y), model.classes)


def collect_inputs(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders (recursively, image extensions only) and keep named files as given."""
    paths: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            paths += list_images(p)
        elif p.is_file():
            paths.append(p)
        else:
            raise FileNotFoundError(f"input {str(p)!r} does not exist")
    return paths


def _batches(paths: list[Path], batch_size: int) -> Iterator[list[Path]]:
    for i in range(0, len(paths), batch_size):
        yield paths[i:i + batch_size]


def score_rows(model: OnnxModel, paths: list[Path], cfg: ScoreConfig, relative_to: Path | None = None) -> Iterator[dict[str, str]]:
    """One row per path: predicted class and probabilities, or an error for an undecodable file.

    Batches k+1..k+prefetch_batches are decoding in the pool while batch k runs in onnxruntime. With ``relative_to`` the
    path column is relative to it (e.g. an S3 key when images were downloaded to dir/<key>).
    """
    def name(p: Path) -> str:
        return p.relative_to(relative_to).as_posix() if relative_to else str(p)

    batches = list(_batches(paths, cfg.batch_size))
    with ThreadPoolExecutor(cfg.decode_workers) as pool:
        def submit(batch: list[Path]) -> list[Future]:
            return [pool.submit(model.preprocess.try_decode, p) for p in batch]

        # Up to prefetch_batches batches decode while one runs: decoding never waits on the model.
        pending = deque(submit(b) for b in batches[:cfg.prefetch_batches])
        for k, batch in enumerate(batches):
            decoded = [f.result() for f in pending.popleft()]
            if k + cfg.prefetch_batches < len(batches):
                pending.append(submit(batches[k + cfg.prefetch_batches]))
            good = [i for i, d in enumerate(decoded) if not isinstance(d, str)]
            probs = predict_proba(model, np.stack([decoded[i] for i in good])) if good else np.empty((0, len(model.classes)))
            by_index = dict(zip(good, probs))
            for i, p in enumerate(batch):
                if i in by_index:
                    pr = by_index[i]
                    row = {"path": name(p), "predicted_class": model.classes[int(pr.argmax())], "error": ""}
                    row.update({f"p_{c}": f"{float(v):.6f}" for c, v in zip(model.classes, pr)})
                else:
                    row = {"path": name(p), "predicted_class": "", "error": decoded[i]}
                    row.update({f"p_{c}": "" for c in model.classes})
                row["model_version"] = model.version
                yield row


@dataclass
class ScoreSummary:
    """What a scoring run did and how fast."""

    out: Path
    images: int
    scored: int
    errors: int
    seconds: float
    images_per_s: float
    provider: str
    version: str


def score(model_path: str | os.PathLike[str], inputs: Sequence[str | os.PathLike[str]], out: str | os.PathLike[str],
          cfg: ScoreConfig | None = None, relative_to: Path | None = None, expected_sha256: str | None = None) -> ScoreSummary:
    """Score every image in ``inputs`` with the ONNX model and write ``out`` (CSV) atomically.

    Columns: path, predicted_class, p_<class>..., error, model_version. A file that does not decode
    gets a row with its error and the run goes on; rerunning replaces the file, never appends to it,
    and removes what a killed run left beside it. With ``expected_sha256`` a model file whose
    sha256 differs is refused before onnxruntime opens it.
    """
    cfg = cfg or ScoreConfig()
    model = load_onnx_model(model_path, cfg.device, expected_sha256)
    log.info("scoring with %s on %s (model version %s)", model.path, model.provider, model.version)
    paths = collect_inputs(inputs)
    for p in remove_stale_temps(Path(out).parent, Path(out).name):  # only this output's own leftovers
        log.warning("removed %s, left by an interrupted scoring run", p)
    fields = ["path", "predicted_class", *[f"p_{c}" for c in model.classes], "error", "model_version"]
    errors = 0
    t0 = time.perf_counter()
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in progress(score_rows(model, paths, cfg, relative_to), total=len(paths), desc="score", unit="img"):
            errors += bool(row["error"])
            writer.writerow(row)
    seconds = time.perf_counter() - t0
    summary = ScoreSummary(Path(out), len(paths), len(paths) - errors, errors, seconds,
                           len(paths) / seconds if seconds > 0 else 0.0, model.provider, model.version)
    log.info("scored %d images (%d errors) in %.2fs: %.1f images/s on %s", summary.images, errors, seconds,
             summary.images_per_s, model.provider)
    return summary
