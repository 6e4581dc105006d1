"""The statistics of the promotion gate: Wilson intervals for accuracies, the exact McNemar test for two
models scored on the same images, and per-class precision, recall and F1 compared by a paired permutation
test. Plain math (no scipy): a few lines each, checked against known values in tests/test_gate.py and by
properties in tests/test_properties.py."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval (low, high) of a proportion ``successes / n``; None when n is 0.

    Unlike the normal approximation it stays inside [0, 1] and is honest at 0/n and n/n, which is where
    accuracies on small test sets live (111 images at 100% -> [0.967, 1.0])."""
    if n <= 0:
        return None
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exact at the edges, and never excluding p: in floating point centre + half at n/n lands about 1e-16
    # below 1.0 for 119 of n = 1..399 (a negative error bar), and centre - half at 0/n a hair above 0.
    low = 0.0 if successes <= 0 else min(p, max(0.0, centre - half))
    high = 1.0 if successes >= n else max(p, min(1.0, centre + half))
    return low, high


def binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2), exactly (integer arithmetic until the final division)."""
    if k < 0:
        return 0.0
    if k >= n:
        return 1.0
    return sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n


@dataclass(frozen=True)
class McNemar:
    """Paired comparison of a candidate with the champion on the same images.

    ``candidate_only``: images the candidate classifies right and the champion wrong; ``champion_only``:
    the reverse (the discordant pairs); ``both``/``neither``: the concordant ones. ``p_value``: the exact
    two-sided McNemar test (binomial on the discordant pairs, p = 1/2 under "equally good")."""

    candidate_only: int
    champion_only: int
    both: int
    neither: int
    p_value: float

    @property
    def n(self) -> int:
        """Images compared."""
        return self.candidate_only + self.champion_only + self.both + self.neither

    @property
    def discordant(self) -> int:
        """Images on which exactly one of the two models is right."""
        return self.candidate_only + self.champion_only


def mcnemar(candidate_right: list[bool], champion_right: list[bool]) -> McNemar:
    """The exact McNemar test on paired outcomes (same images, same order)."""
    if len(candidate_right) != len(champion_right):
        raise ValueError(f"paired outcomes differ in length: {len(candidate_right)} vs {len(champion_right)}")
    b = sum(1 for a, c in zip(candidate_right, champion_right) if a and not c)
    c = sum(1 for a, ch in zip(candidate_right, champion_right) if ch and not a)
    both = sum(1 for a, ch in zip(candidate_right, champion_right) if a and ch)
    neither = len(candidate_right) - b - c - both
    p = min(1.0, 2 * binom_cdf(min(b, c), b + c)) if b + c else 1.0
    return McNemar(b, c, both, neither, p)


@dataclass(frozen=True)
class ClassComparison:
    """One class, the candidate against the champion on the same images: each model's precision, recall and
    F1 on it (None where undefined: a class never predicted has no precision), and ``p_worse``, the one-sided
    p-value of a paired permutation test that the candidate's F1 is this much lower by chance alone."""

    cls: str
    n: int                       # test images of this class
    candidate_precision: float | None
    candidate_recall: float | None
    candidate_f1: float | None
    champion_precision: float | None
    champion_recall: float | None
    champion_f1: float | None
    p_worse: float


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, NaN where den is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / np.maximum(den, 1), np.nan)


def f1_rows(truth: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """(R, k) per-class F1 of each row of ``predicted`` (R, N) against ``truth`` (N,): 2 TP / (predicted + true),
    NaN for a class neither present nor predicted."""
    onehot_true = truth[None, :, None] == np.arange(k)                 # (1, N, k)
    onehot_pred = predicted[:, :, None] == np.arange(k)                # (R, N, k)
    tp = (onehot_pred & onehot_true).sum(1)                            # (R, k)
    return _ratio(2.0 * tp, onehot_pred.sum(1) + onehot_true.sum(1))


def _optional(x: float) -> float | None:
    return None if math.isnan(x) else float(x)


def compare_classes(classes: Sequence[str], truth: Sequence[int], candidate: Sequence[int], champion: Sequence[int],
                    permutations: int = 2000, seed: int = 0) -> list[ClassComparison]:
    """Each class compared on paired predictions (class indices, same images, same order).

    F1 rather than recall: a model that calls every image one class has perfect recall on it, and would make
    any real classifier look worse there; its precision on that class gives it away. Significance: under
    "the two models are exchangeable", each image's two predictions may be swapped; ``permutations`` random
    swaps (seeded: the same answer every time) give the distribution of the F1 difference, and ``p_worse`` is
    the share at or below the observed one (add-one, so never 0)."""
    y, a, b = (np.asarray(v, dtype=np.int64) for v in (truth, candidate, champion))
    if not len(y) == len(a) == len(b):
        raise ValueError(f"paired predictions differ in length: {len(y)}, {len(a)}, {len(b)}")
    k = len(classes)
    observed = f1_rows(y, np.stack([a, b]), k)                        # (2, k): candidate, champion
    delta = observed[0] - observed[1]
    at_or_below = np.zeros(k, dtype=np.int64)
    rng = np.random.default_rng(seed)
    for start in range(0, permutations, 256):                         # (256, N) swaps at a time: bounded memory
        swap = rng.random((min(256, permutations - start), len(y))) < 0.5
        f1_a = f1_rows(y, np.where(swap, b, a), k)
        f1_b = f1_rows(y, np.where(swap, a, b), k)
        at_or_below += ((f1_a - f1_b) <= delta + 1e-12).sum(0)        # NaN classes count nowhere
    p = (1 + at_or_below) / (1 + permutations)
    true_n = np.bincount(y, minlength=k)
    rows = []
    for i, cls in enumerate(classes):
        prec = [_ratio(np.array(((m == i) & (y == i)).sum()), np.array((m == i).sum())) for m in (a, b)]
        rec = [_ratio(np.array(((m == i) & (y == i)).sum()), np.array(true_n[i])) for m in (a, b)]
        rows.append(ClassComparison(cls, int(true_n[i]), _optional(prec[0]), _optional(rec[0]), _optional(observed[0, i]),
                                    _optional(prec[1]), _optional(rec[1]), _optional(observed[1, i]),
                                    1.0 if math.isnan(delta[i]) else float(p[i])))
    return rows
