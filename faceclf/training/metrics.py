"""Classification metrics: loss, accuracy, per-class accuracy and confusion matrix."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch


def confusion_matrix(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) int64 counts; row = true class, column = predicted class."""
    idx = labels.to(torch.int64) * num_classes + preds.to(torch.int64)
    return torch.bincount(idx, minlength=num_classes * num_classes).view(num_classes, num_classes)


def summarize(loss_sum: float, preds: torch.Tensor, labels: torch.Tensor, classes: Sequence[str]) -> dict[str, Any]:
    """Metrics dict: {'loss', 'accuracy', 'per_class_accuracy', 'confusion_matrix', 'n'}.

    ``loss_sum`` is the summed (not mean) NLL over the ``n`` examples. A class with no examples
    gets accuracy None (it was not measured), never a made-up number.
    """
    n = int(labels.numel())
    cm = confusion_matrix(preds.cpu(), labels.cpu(), len(classes))
    correct = cm.diag()
    per_class_n = cm.sum(dim=1)
    per_class = {
        c: (float(correct[i]) / float(per_class_n[i]) if per_class_n[i] > 0 else None)
        for i, c in enumerate(classes)
    }
    return {
        "loss": float(loss_sum) / n if n else math.nan,
        "accuracy": float(correct.sum()) / n if n else math.nan,
        "per_class_accuracy": per_class,
        "confusion_matrix": cm.tolist(),
        "n": n,
    }


@dataclass(frozen=True)
class RunMetrics:
    """A run's metrics.json as a typed value: the model version, its classes, and val/test metrics
    (dicts as ``summarize`` makes them); ``diverged`` holds the reason when nothing could be measured."""

    version: str
    classes: list[str]
    best_epoch: int | None
    device: str | None
    val: dict[str, Any]
    test: dict[str, Any]
    data: dict[str, Any] = field(default_factory=dict)
    diverged: str | None = None
    warnings: list[str] = field(default_factory=list)   # informing steps of the run that failed (faceclf.inform)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunMetrics":
        """From metrics.json's content."""
        return cls(d["version"], list(d["classes"]), d.get("best_epoch"), d.get("device"), d["val"], d["test"],
                   d.get("data", {}), d.get("diverged"), list(d.get("warnings", [])))

    def to_dict(self) -> dict[str, Any]:
        """metrics.json's content (no ``diverged`` key when training did not diverge, no ``warnings`` when none)."""
        d = asdict(self)
        for key in ("diverged", "warnings"):
            if not d[key]:
                del d[key]
        return d
