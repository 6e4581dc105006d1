"""PNG plots people would rather look at than read: learning curves, the confusion matrix, the reliability diagram."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

import torch  # noqa: E402

from faceclf.store.atomic import write_atomic  # noqa: E402
from faceclf.training.calibrate import (  # noqa: E402
    ECE_BINS,
    calibrated,
    expected_calibration_error,
    reliability_bins,
)


def _save(fig: Any, path: Path) -> Path:
    write_atomic(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def plot_history(history: Sequence[dict[str, Any]], path: Path, best_epoch: int | None = None) -> Path:
    """Train/val loss and val accuracy per epoch, with the kept (best) epoch marked."""
    epochs = [int(r["epoch"]) for r in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [float(r["train_loss"]) for r in history], label="train loss")
    ax_loss.plot(epochs, [float(r["val_loss"]) for r in history], label="val loss")
    ax_acc.plot(epochs, [float(r["val_accuracy"]) for r in history], color="tab:green", label="val accuracy")
    for ax in (ax_loss, ax_acc):
        if best_epoch is not None:
            ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"kept: epoch {best_epoch}")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend()
    ax_loss.set_yscale("log")  # late epochs differ by orders of magnitude, not by a sliver above 0
    ax_loss.set_title("NLL loss (log scale)")
    ax_acc.set_title("validation accuracy")
    return _save(fig, path)


def plot_confusion(matrix: Sequence[Sequence[int]], classes: Sequence[str], path: Path) -> Path:
    """Test-set confusion matrix heat map with counts; rows are true classes, columns predictions."""
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * n, 1.2 + 1.1 * n))
    ax.imshow(matrix, cmap="Blues")
    peak = max(max(row) for row in matrix) or 1
    for i in range(n):
        for j in range(n):
            v = matrix[i][j]
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > peak / 2 else "black")
    ax.set_xticks(range(n), classes, rotation=30, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("confusion matrix (test)")
    return _save(fig, path)


def plot_reliability(log_probs: torch.Tensor, labels: torch.Tensor, temperature: float, path: Path,
                     bins: int = ECE_BINS) -> Path:
    """Reliability diagram of the test split before and after temperature scaling: per equal-width confidence bin,
    the accuracy against the mean confidence (on the diagonal: calibrated), the ECE in the legend; below, how many
    images each bin holds. ``log_probs`` (N, C): the model's own, uncalibrated, output."""
    fig, (ax, ax_n) = plt.subplots(2, 1, figsize=(5.2, 6.4), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    width = 1 / bins
    for shift, (name, t, color) in zip((-0.2, 0.2), (("before", 1.0, "tab:red"),
                                                     (f"after (T = {temperature:.3g})", temperature, "tab:blue"))):
        scores = calibrated(log_probs, t)
        binned = [b for b in reliability_bins(scores, labels, bins) if b.count]
        ece = expected_calibration_error(scores, labels, bins)
        ax.plot([b.confidence for b in binned], [b.accuracy for b in binned], marker="o", color=color,
                label=f"{name}: ECE {ece:.4f}")
        ax_n.bar([(b.low + b.high) / 2 + shift * width for b in binned], [b.count for b in binned],
                 width=0.4 * width, color=color)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability diagram (test, {len(labels)} images, {bins} bins)")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    ax_n.set_xlabel("confidence of the predicted class")
    ax_n.set_ylabel("images")
    ax_n.set_yscale("log")  # a good model piles most images in its last bin
    ax_n.grid(alpha=0.3)
    return _save(fig, path)


def plot_versions(rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Test accuracy of the last model versions (oldest first) with their Wilson 95% intervals; promoted
    versions filled, rejected ones hollow, the champion starred. ``rows``: faceclf.store.registry.list_versions'
    rows (version, test_accuracy, test_low, test_high, gate_passed, champion)."""
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(rows) + 2), 3.6))
    for i, r in enumerate(rows):
        acc = r.get("test_accuracy")
        if acc is None:
            continue
        low, high = r.get("test_low"), r.get("test_high")
        err = [[acc - low], [high - acc]] if low is not None and high is not None else None
        ax.errorbar(i, acc, yerr=err, fmt="o", color="tab:blue" if r.get("gate_passed") else "tab:red",
                    mfc="tab:blue" if r.get("gate_passed") else "white", capsize=3)
        if r.get("champion"):
            ax.plot(i, acc, marker="*", markersize=14, color="gold", markeredgecolor="black", linestyle="none")
    ax.set_xticks(range(len(rows)), [r["version"][:15] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("test accuracy (95% interval)")
    ax.set_title("test accuracy by version: filled passed the gate, hollow rejected, star: champion")
    ax.grid(alpha=0.3)
    return _save(fig, path)
