"""Evaluate a saved checkpoint on one split of a data folder, split the same way training did."""

from __future__ import annotations

import os
from typing import Any

from faceclf.config import DataConfig
from faceclf.dataset.images import discover, load_split, require_every_class
from faceclf.training.loop import (
    evaluate,
    load_checkpoint,
    model_from_checkpoint,
    resolve_device,
)


def evaluate_checkpoint(checkpoint: str | os.PathLike[str], data: str | os.PathLike[str], split: str = "test",
                        device: str = "auto") -> dict[str, Any]:
    """Metrics of the checkpoint on ``split`` of ``data``: loss, accuracy, per-class accuracy, confusion matrix, n.

    The split is recomputed from content hashes with the checkpoint's own fractions, so a folder of
    class folders yields exactly the test images the run held out.
    """
    ckpt = load_checkpoint(checkpoint)
    data_cfg = DataConfig(**ckpt["data_config"])
    splits = discover(data, data_cfg.split_fractions, data_cfg.decode_workers)
    if splits.classes != list(ckpt["classes"]):
        raise ValueError(f"the data's classes {splits.classes} differ from the checkpoint's {list(ckpt['classes'])}")
    require_every_class(splits, [split])
    dev = resolve_device(device)
    loaded = load_split(splits.split(split), data_cfg.image_size, data_cfg.decode_workers, desc=f"decode {split}")
    return evaluate(model_from_checkpoint(ckpt, dev), loaded, splits.classes, data_cfg, dev)
