"""Temperature scaling (Guo et al., 2017): one scalar T > 0, fitted on the validation split, that makes the
model's probabilities mean what they say, and the figures that show it (expected calibration error, the
reliability diagram's bins).

The CNN ends in LogSoftmax, and log_softmax(log_softmax(z) / T) == log_softmax(z / T) (log_softmax(z) is z
shifted by one constant per row, and a shift cancels), so T applies to the model's output as it is. T > 0
divides every logit of a row alike: the predicted class, hence accuracy, never changes; only the confidence.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import torch
from torch.nn import functional as F

log = logging.getLogger(__name__)

# --- calibration defaults ---------------------------------------------------------------------------------------
ECE_BINS = 15                  # equal-width confidence bins of the ECE and the reliability diagram (Guo et al.'s 15)
T_MIN, T_MAX = 0.05, 20.0      # the temperature's search bounds: 20x sharper to 20x flatter than the model as trained
LOG_T_TOLERANCE = 1e-5         # the search stops when log T is known to this (T to ~0.001%): far below any ECE change
# ------------------------------------------------------------------------------------------------------------------


class ReliabilityBin(NamedTuple):
    """One equal-width confidence bin (low, high]: the mean top-label confidence and the accuracy of the images
    whose confidence falls in it (NaN for both when it holds none), and how many it holds."""

    low: float
    high: float
    confidence: float
    accuracy: float
    count: int


def as_probs(scores: torch.Tensor) -> torch.Tensor:
    """(N, C) probabilities from probabilities or log-probabilities, float64. Unambiguous: a probability row sums
    to 1, so holds an entry > 0; a log-probability row is all <= 0 (log_softmax never exceeds 0)."""
    scores = scores.detach().to(torch.float64)
    return scores.exp() if bool((scores <= 0).all()) else scores


def calibrated(log_probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """The log-probabilities (N, C) of the calibrated model: log_softmax(log_probs / T). Same argmax; T=1: same."""
    if temperature == 1.0:
        return log_probs
    return torch.log_softmax(log_probs / temperature, dim=1)


def _nll(log_probs: torch.Tensor, labels: torch.Tensor, log_t: float) -> float:
    """Mean NLL of the labels under log_softmax(log_probs / exp(log_t)); log_probs float64 (N, C)."""
    return float(F.cross_entropy(log_probs * math.exp(-log_t), labels))


def fit_temperature(log_probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in [T_MIN, T_MAX] minimising the NLL of ``labels`` (N,) under log_softmax(log_probs / T),
    ``log_probs`` (N, C) the model's log-probabilities on the validation split.

    Searched over log T (bounded Brent, scipy): the NLL is convex in 1/T, hence unimodal in log T, and the search
    is deterministic. Where the split cannot determine T the model is left as it is, 1.0: no images, a single
    class among the labels, a NaN output, or every image classified correctly. In that last case the NLL only
    falls as T -> 0, so the bound would pick T, not the data: a small val split of a good model would otherwise
    export a model 20x over-confident (measured on the tests' tiny run: test NLL 0.28 -> 3.6).
    """
    from scipy.optimize import minimize_scalar  # imported here: training alone needs it, not scoring

    lp, y = log_probs.detach().to("cpu", torch.float64), labels.detach().to("cpu", torch.int64)
    if len(y) == 0 or len(torch.unique(y)) < 2 or bool(torch.isnan(lp).any()) or bool((lp.argmax(1) == y).all()):
        return 1.0
    found = minimize_scalar(lambda s: _nll(lp, y, s), bounds=(math.log(T_MIN), math.log(T_MAX)),
                            method="bounded", options={"xatol": LOG_T_TOLERANCE})
    t = math.exp(float(found.x))
    if not math.isfinite(t):
        return 1.0
    if min(abs(found.x - math.log(T_MIN)), abs(found.x - math.log(T_MAX))) < 1e-3:
        log.warning("the fitted temperature %.4g is at its bound [%g, %g] (%d validation images): the split barely "
                    "constrains it", t, T_MIN, T_MAX, len(y))
    return t


def reliability_bins(scores: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> list[ReliabilityBin]:
    """Top-label reliability: the (N, C) probabilities or log-probabilities ``scores`` binned by their top
    confidence into ``bins`` equal-width bins (low, high] of [0, 1]; each bin's mean confidence, accuracy, count."""
    probs, y = as_probs(scores), labels.detach().to("cpu", torch.int64)
    conf, pred = probs.cpu().max(dim=1)                                        # (N,) top confidence, its class
    correct = (pred == y).to(torch.float64)                                    # (N,)
    which = (torch.ceil(conf * bins).to(torch.int64) - 1).clamp(0, bins - 1)  # (N,): bin (k/B, (k+1)/B]
    count = torch.bincount(which, minlength=bins)                              # (B,)
    conf_sum = torch.bincount(which, weights=conf, minlength=bins)
    correct_sum = torch.bincount(which, weights=correct, minlength=bins)
    return [ReliabilityBin(k / bins, (k + 1) / bins,
                           float(conf_sum[k] / count[k]) if count[k] else math.nan,
                           float(correct_sum[k] / count[k]) if count[k] else math.nan, int(count[k]))
            for k in range(bins)]


def expected_calibration_error(scores: torch.Tensor, labels: torch.Tensor, bins: int = ECE_BINS) -> float:
    """Top-label ECE in [0, 1]: sum over bins of (share of the images in the bin) x |accuracy - mean confidence|;
    0.0 for no images. ``scores``: (N, C) probabilities or log-probabilities."""
    binned = reliability_bins(scores, labels, bins)
    n = sum(b.count for b in binned)
    return sum(b.count / n * abs(b.accuracy - b.confidence) for b in binned if b.count) if n else 0.0


def calibration_summary(temperature: float, splits: dict[str, tuple[torch.Tensor, torch.Tensor]],
                        bins: int = ECE_BINS) -> dict[str, Any]:
    """metrics.json's "calibration" block, plain types: {"temperature", "bins", <split>: {"ece_before",
    "ece_after", "n"}} for each of ``splits`` (name -> (log_probs (N, C) as the model gives them, labels (N,)))."""
    out: dict[str, Any] = {"temperature": float(temperature), "bins": int(bins)}
    for name, (log_probs, labels) in splits.items():
        out[name] = {"ece_before": expected_calibration_error(log_probs, labels, bins),
                     "ece_after": expected_calibration_error(calibrated(log_probs, temperature), labels, bins),
                     "n": int(len(labels))}
    return out
