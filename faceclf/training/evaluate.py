"""Evaluate a saved checkpoint on one split of a data folder, split the same way training did."""

from __future__ import annotations

import os
from typing import Any

from faceclf.config import DataConfig
from faceclf.dataset.discover import discover
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import load_split
from faceclf.training.calibrate import calibrated
from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint
from faceclf.training.loop import metrics_of, predict_split, resolve_device


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], split: str = "test",
                        device: str = "auto") -> dict[str, Any]:
    """Metrics of the checkpoint on ``split`` of ``data``: loss, accuracy, per-class accuracy, confusion matrix, n;
    of the model as exported, i.e. with the checkpoint's temperature applied (1.0 for checkpoints older than it).

    The split is recomputed from content hashes with the checkpoint's own fractions, so a folder of
    class folders yields exactly the test images the run held out.
    """
    ckpt = load_checkpoint(checkpoint)
    data_cfg = DataConfig(**ckpt["data_config"])
    faceset = discover(data, data_cfg.split_fractions, data_cfg.decode_workers, data_cfg.near_distance)
    if list(faceset.classes) != list(ckpt["classes"]):
        raise ValueError(f"the data's classes {list(faceset.classes)} differ from the checkpoint's {list(ckpt['classes'])}")
    faceset.require_every_class([split])
    dev, preset = resolve_device(device), Preprocess.from_checkpoint(ckpt)
    loaded = load_split(faceset, split, preset, data_cfg.decode_workers)
    log_probs = predict_split(model_from_checkpoint(ckpt, dev), loaded, preset, dev)  # (N, C), uncalibrated
    return metrics_of(calibrated(log_probs, float(ckpt.get("temperature", 1.0))), loaded.labels, list(faceset.classes))
