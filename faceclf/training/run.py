"""A planned training run executed in this process (or as one DDP rank): load, fit, test, write RUN/."""

from __future__ import annotations

import csv
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceclf.config import RunConfig
from faceclf.dataset.cache import DecodedCache
from faceclf.dataset.faceset import FaceSet
from faceclf.dataset.layout import SPLITS
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import TensorSplit, load_cached_splits, load_split
from faceclf.inform import Warnings
from faceclf.store.atomic import (
    remove_stale_temps,
    write_atomic,
    write_json_atomic,
    write_text_atomic,
)
from faceclf.training.calibrate import calibrated, calibration_summary, fit_temperature
from faceclf.training.distributed import current
from faceclf.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from faceclf.training.fit import EpochCallback, fit
from faceclf.training.loop import metrics_of, predict_split, release_memory, resolve_device
from faceclf.training.plan import Plan
from faceclf.training.plots import plot_confusion, plot_history, plot_reliability
from faceclf.training.warmstart import init_weights

log = logging.getLogger(__name__)

TEST_PREDICTIONS = "test_predictions.csv"


def load_splits(faceset: FaceSet, cfg: RunConfig, cache: DecodedCache | None = None) -> dict[str, TensorSplit]:
    """Each split: decoded once into memory, or read from the decoded cache's shards through memory maps.
    Refuse to go on if a split lost a whole class to bad files."""
    preset = Preprocess.from_config(cfg.data)
    if cache is not None and cache.preset.image_size != preset.image_size:
        raise ValueError(f"the decoded cache holds {cache.preset.image_size} px images; the run wants "
                         f"{preset.image_size} px")
    loaded = load_cached_splits(faceset, cache) if cache is not None else \
        {s: load_split(faceset, s, preset, cfg.data.decode_workers) for s in SPLITS}
    for s, t in loaded.items():
        present = set(t.labels.tolist())
        for i, c in enumerate(faceset.classes):
            if i not in present:
                raise ValueError(f"class {c!r} has no decodable images in the {s} split")
    return loaded


def write_rejected(path: Path, loaded: dict[str, TensorSplit]) -> int:
    """List files that could not be decoded (split, path, reason) in rejected.csv; returns how many."""
    rows = [(s, str(p), reason) for s, t in loaded.items() for p, reason in t.rejected]
    if rows:
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["split", "path", "reason"])
        w.writerows(rows)
        write_text_atomic(path, buf.getvalue())
    return len(rows)


def run_plan(plan: Plan, cache: DecodedCache | None = None, on_epoch: EpochCallback | None = None) -> dict[str, Any]:
    """Execute ``plan`` in this process: load its splits, fit, test, write its run folder; the metrics written to
    metrics.json. Nothing is resolved here: the plan holds every choice (faceclf.training.plan).

    With ``cache`` (holding the FaceSet's images at the run's size) images are read from its shards through
    memory maps instead of being decoded into memory. ``on_epoch``: see ``fit``.

    Under torch.distributed every rank calls this alike; rank 0 alone writes the run folder and returns the
    metrics, the other ranks return an empty dict once training ends.
    """
    release_memory()
    run_dir, part, cfg, faceset = plan.run_dir, current(), plan.cfg, plan.faceset
    run_dir.mkdir(parents=True, exist_ok=True)
    if part.is_main:  # another rank must not remove rank 0's half-written files
        for p in remove_stale_temps(run_dir):
            log.warning("removed %s, left by an interrupted write", p)
        write_atomic(run_dir / "splits.csv", faceset.write_csv)
    loaded = load_splits(faceset, cfg, cache)
    n_rejected = write_rejected(run_dir / "rejected.csv", loaded) if part.is_main else 0
    classes = list(faceset.classes)
    init = init_weights(plan.init_checkpoint, classes, cfg.model) if plan.init_checkpoint else None
    result = fit(cfg, classes, loaded["train"], loaded["val"], run_dir, resume=plan.resume, version=plan.version,
                 init_state=init, on_epoch=on_epoch)
    if not part.is_main:
        return {}
    metrics, test_log_probs = finish_run(run_dir, classes, loaded, result.best_epoch, result.device)
    metrics["ranks"] = {"world_size": part.world_size, "weights_sha256": result.rank_digests}
    metrics["data"] = {"counts": {s: len(loaded[s].labels) for s in SPLITS}, "duplicates_dropped": faceset.duplicates,
                       "conflicts_dropped": len(faceset.conflicts), "rejected": n_rejected, "presplit": faceset.presplit}
    plots = Warnings()  # the plots only inform: a failed one is a warning in metrics.json, not a failed run
    plots.attempt("learning curves plot (history.png)", plot_history, result.history, run_dir / "history.png",
                  result.best_epoch)
    plots.attempt("confusion matrix plot (confusion_matrix.png)", plot_confusion, metrics["test"]["confusion_matrix"],
                  classes, run_dir / "confusion_matrix.png")
    plots.attempt("reliability diagram (reliability.png)", plot_reliability, test_log_probs, loaded["test"].labels,
                  metrics["calibration"]["temperature"], run_dir / "reliability.png")
    if plots.items:
        metrics["warnings"] = plots.items
    write_json_atomic(run_dir / "metrics.json", finite_or_none(metrics))
    return metrics


def finite_or_none(obj: Any) -> Any:
    """NaN/inf -> None (JSON null), recursively: a diverged run is recorded and gated, not a crash."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [finite_or_none(v) for v in obj]
    return obj


def write_test_predictions(path: Path, split: TensorSplit, predicted: torch.Tensor, classes: list[str]) -> None:
    """RUN/test_predictions.csv: sha256, class, predicted class of every test image, in the split's order. The
    gate pairs them with the champion's predictions on the same images (McNemar); written row by row."""
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["sha256", "class", "predicted"])
            w.writerows((sha, classes[int(y)], classes[int(p)]) for sha, y, p in
                        zip(np.char.decode(split.records.sha256s).tolist(), split.labels.tolist(), predicted.tolist()))
    write_atomic(path, write)


def finish_run(run_dir: Path, classes: list[str], loaded: dict[str, TensorSplit], best_epoch: int,
               device: str) -> tuple[dict[str, Any], torch.Tensor]:
    """Re-load the best weights, fit their temperature on val (faceclf.training.calibrate), measure them on val
    and test, and store the temperature and the metrics in checkpoint.pt.

    Val figures are the model's own (T was fitted on them); test figures are the calibrated model's, as exported:
    accuracy is unchanged (T > 0 keeps the argmax), the loss is the exported model's, so a candidate's test loss
    and the champion's, re-scored through ONNX, compare on the same footing. Returns the metrics and the test
    split's uncalibrated log-probabilities (N, C), which the reliability diagram shows before and after.
    """
    ckpt = load_checkpoint(run_dir / "checkpoint.pt")
    cfg = RunConfig.from_dict({"data": ckpt["data_config"], "model": ckpt["model_config"], "training": ckpt["train_config"]})
    dev = resolve_device(cfg.training.device)
    model, preset = model_from_checkpoint(ckpt, dev), Preprocess.from_checkpoint(ckpt)
    val, test = loaded["val"], loaded["test"]
    val_log_probs, test_log_probs = (predict_split(model, s, preset, dev, batch_size=cfg.training.batch_size)
                                     for s in (val, test))  # (N_val, C), (N_test, C)
    temperature = fit_temperature(val_log_probs, val.labels)
    calibration = calibration_summary(temperature, {"val": (val_log_probs, val.labels),
                                                    "test": (test_log_probs, test.labels)})
    metrics = {
        "classes": classes,
        "best_epoch": best_epoch,
        "device": device,
        "version": ckpt["version"],
        "val": metrics_of(val_log_probs, val.labels, classes),
        "test": metrics_of(calibrated(test_log_probs, temperature), test.labels, classes),
        "calibration": calibration,
    }
    write_test_predictions(run_dir / TEST_PREDICTIONS, test, test_log_probs.argmax(dim=1), classes)
    ckpt["metrics"] = {"val": metrics["val"], "test": metrics["test"]}
    ckpt["temperature"], ckpt["calibration"] = temperature, calibration
    save_checkpoint(run_dir / "checkpoint.pt", ckpt)
    log.info("test: loss %.4f accuracy %.4f per class %s", metrics["test"]["loss"], metrics["test"]["accuracy"],
             metrics["test"]["per_class_accuracy"])
    log.info("calibration: temperature %.4f; ECE val %.4f -> %.4f, test %.4f -> %.4f (%d bins)", temperature,
             calibration["val"]["ece_before"], calibration["val"]["ece_after"], calibration["test"]["ece_before"],
             calibration["test"]["ece_after"], calibration["bins"])
    return metrics, test_log_probs
