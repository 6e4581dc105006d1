"""The README's first command: train, export and score end to end on a folder, or on sample faces."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

from faceclf.config import RunConfig
from faceclf.data import find_classes

log = logging.getLogger(__name__)

SAMPLE_PER_CLASS = 150  # generated faces per class when no folder is given


def prepare_data(folder: str | Path | None, out: Path) -> Path:
    """The folder to train on: the user's, else a generated sample face set under ``out``."""
    if folder is not None:
        folder = Path(folder)
        find_classes(folder)  # fails early, with a clear message, on a folder without classes
        return folder
    from faceclf.sample import generate_sample_faces

    sample = out / "sample-faces"
    if not (sample.is_dir() and any(sample.rglob("*.jpg"))):
        log.info("no folder given: generating %d sample faces per class in %s", SAMPLE_PER_CLASS, sample)
        generate_sample_faces(sample, per_class=SAMPLE_PER_CLASS)
    return sample


def labelled_accuracy(predictions: Path) -> float | None:
    """Share of scored rows whose predicted class equals the image's parent folder name (if it is a class)."""
    with open(predictions, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if not r["error"]]
    if not rows:
        return None
    return sum(Path(r["path"]).parent.name == r["predicted_class"] for r in rows) / len(rows)


def run_demo(folder: str | Path | None, out: str | Path, epochs: int | None = None) -> dict[str, Any]:
    """Train -> export -> score, then print where every output is and how well it did."""
    from faceclf.export import export_onnx
    from faceclf.pipeline import read_split_paths, train_run
    from faceclf.score import score

    out = Path(out)
    data = prepare_data(folder, out)
    cfg = RunConfig()
    if epochs:
        cfg.train.epochs = epochs
    t0 = time.perf_counter()
    metrics = train_run(data, out / "run", cfg)
    t_train = time.perf_counter() - t0
    report = export_onnx(out / "run" / "checkpoint.pt", out / "model.onnx")
    held_out = read_split_paths(out / "run" / "splits.csv", "test")  # images the model never trained on
    summary = score(out / "model.onnx", held_out, out / "predictions.csv")
    result = {
        "data": str(data),
        "run": str(out / "run"),
        "train_seconds": round(t_train, 1),
        "test_accuracy": metrics["test"]["accuracy"],
        "test_per_class_accuracy": metrics["test"]["per_class_accuracy"],
        "model": str(report.path),
        "model_version": report.version,
        "onnx_max_abs_diff": report.max_abs_diff,
        "predictions": str(summary.out),
        "scored_images": summary.images,
        "score_images_per_s": round(summary.images_per_s, 1),
        "score_provider": summary.provider,
        "held_out_predictions_matching_folder_label": labelled_accuracy(summary.out),
    }
    print(json.dumps(result, indent=2))
    return result
