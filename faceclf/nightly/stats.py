"""The statistics of the promotion gate: Wilson intervals for accuracies, the exact McNemar test for two
models scored on the same images, its power (the smallest accuracy difference a night's test set can detect),
and per-class precision, recall and F1 compared by a paired permutation test. Plain math (no scipy): a few
lines each, checked against known values in tests/test_gate.py and by properties in tests/test_properties.py."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist

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


# --- power: the smallest accuracy difference a night's test set can detect ---

EXACT_WALK = 400    # discordant counts up to which critical_counts uses integers (bit for bit the gate's floats)
POWER_TOL = 1e-6    # min_detectable_difference's resolution, in accuracy (0.0001 points)


def z_two_sided(alpha: float) -> float:
    """The normal quantile z with P(|Z| > z) = alpha (1.96 at 0.05); finite for any alpha in (0, 1)."""
    return -NormalDist().inv_cdf(max(alpha / 2, sys.float_info.min))


def _table_size(n: int) -> int:
    """The length the cached tables are built to for n: a power of 2 >= max(n, 1024), so nights of nearby
    sizes share one table."""
    return 1 << max(10, n.bit_length())


@lru_cache(maxsize=4)
def _log_factorials(size: int) -> np.ndarray:
    """(size + 1,) log(k!) for k = 0..size, read-only (cached)."""
    table = np.array([math.lgamma(k + 1) for k in range(size + 1)])
    table.flags.writeable = False
    return table


@lru_cache(maxsize=16)
def critical_counts(alpha: float, size: int) -> np.ndarray:
    """int64 (size + 1,): for d discordant images, the largest count c of the losing side at which the gate's
    exact McNemar test rejects at ``alpha`` (2 P(Bin(d, 1/2) <= c) < alpha, as ``mcnemar`` computes it); -1
    where no split of d images is significant (d <= 5 at alpha 0.05). Read-only (cached per alpha).

    Walks d upward, the count rising by 0 or 1 per image. Up to EXACT_WALK in integers, giving the very floats
    ``mcnemar`` compares; beyond, in floating point from there (relative error ~1e-11, which could only move a
    count at an exact tie alpha == 2 P, not met by an alpha anyone sets)."""
    counts = np.full(size + 1, -1, dtype=np.int64)
    k, below = -1, 0                        # below = sum of C(d, i) for i <= k, at the current d
    for d in range(1, min(size, EXACT_WALK) + 1):
        if k >= 0:
            below = 2 * below - math.comb(d - 1, k)          # sum_{i<=k} C(d, i) from the row above
        step = below + math.comb(d, k + 1)
        if min(1.0, 2 * (step / 2 ** d)) < alpha:
            k, below = k + 1, step
        counts[d] = k
    if size > EXACT_WALK:
        lf = _log_factorials(size).tolist()
        ln2 = math.log(2)
        cdf = below / 2 ** EXACT_WALK                      # P(Bin(d, 1/2) <= k) at d = EXACT_WALK
        for d in range(EXACT_WALK + 1, size + 1):
            if k >= 0:                                     # P(Bin(d) <= k) = P(Bin(d-1) <= k) - P(Bin(d-1) = k) / 2
                cdf -= 0.5 * math.exp(lf[d - 1] - lf[k] - lf[d - 1 - k] - (d - 1) * ln2)
            step = cdf + math.exp(lf[d] - lf[k + 1] - lf[d - k - 1] - d * ln2)
            if min(1.0, 2 * step) < alpha:
                k, cdf = k + 1, step
            counts[d] = k
    counts.flags.writeable = False
    return counts


def _log_binom_pmf(lf: np.ndarray, n: np.ndarray | int, k: np.ndarray, p: float) -> np.ndarray:
    """log P(Bin(n, p) = k) elementwise, for 0 <= k <= n (0 * log 0 taken as 0, so p = 0 or 1 work)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        heads = np.where(k > 0, k * math.log(p) if p > 0 else -np.inf, 0.0)
        tails = np.where(n - k > 0, (n - k) * math.log1p(-p) if p < 1 else -np.inf, 0.0)
    return lf[n] - lf[k] - lf[n - k] + heads + tails


def _check_power_args(n: int, discordant: float, alpha: float, power: float | None = None) -> None:
    """ValueError naming the first argument of the power functions out of its range (``power``: unless None)."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 0.0 <= discordant <= 1.0:
        raise ValueError(f"discordant must be a share in [0, 1], got {discordant}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if power is not None and not 0.0 < power < 1.0:
        raise ValueError(f"power must be in (0, 1), got {power}")


def mcnemar_power(n: int, discordant: float, difference: float, alpha: float) -> float:
    """The probability that the gate's exact McNemar test at ``alpha``, on n paired images, finds the better of two
    models significantly better, when they disagree by chance on a share ``discordant`` of images (churn, half
    each way) and the better one is in truth also right on a further share ``difference``. Per image:
    P(only the better right) = discordant/2 + difference, P(only the other right) = discordant/2.

    Exact: the discordant count D ~ Bin(n, discordant + difference); given D = d the other model's count is
    Bin(d, q), q = (discordant/2) / (discordant + difference), and the test rejects when it is at most
    critical_counts[d]. P(reject | d) for every d at once comes from a recurrence in d, summed as a cumulative
    sum: P(Bin(d+1, q) <= k) = P(Bin(d, q) <= k) - q P(Bin(d, q) = k), plus P(Bin(d+1, q) = k+1) where the
    critical count steps up. O(n) numpy per call. Rejecting the other way round is not counted as detecting."""
    _check_power_args(n, discordant, alpha)
    if not 0.0 <= difference <= 1.0 - discordant:
        raise ValueError(f"difference must be in [0, 1 - discordant] = [0, {1 - discordant}], got {difference}")
    psi = discordant + difference                      # the share of discordant images under this alternative
    if n == 0 or psi <= 0.0:
        return 0.0
    size = _table_size(n)
    lf, crit = _log_factorials(size), critical_counts(alpha, size)[: n + 1]
    d = np.arange(n + 1)
    p_d = np.exp(_log_binom_pmf(lf, n, d, min(psi, 1.0)))                  # (n + 1,) P(D = d)
    q = (discordant / 2) / psi
    if q == 0.0:                                       # no churn: every discordant image goes the better one's way
        reject = (crit >= 0).astype(float)
    else:
        at_k = np.where(crit >= 0, np.exp(_log_binom_pmf(lf, d, np.maximum(crit, 0), q)), 0.0)  # P(Bin(d, q) = k_d)
        step = np.zeros(n + 1)
        step[1:] = -q * at_k[:-1] + np.where(crit[1:] > crit[:-1], at_k[1:], 0.0)
        reject = np.clip(np.cumsum(step), 0.0, 1.0)    # (n + 1,) P(Bin(d, q) <= k_d)
    return float(min(1.0, max(0.0, np.dot(p_d, reject))))


def min_detectable_difference(n: int, discordant: float, alpha: float, power: float = 0.8) -> float | None:
    """The smallest true accuracy difference between two models scored on the same n images that the gate's
    two-sided exact McNemar test at ``alpha`` finds significant (in the right direction) with probability at
    least ``power``, when the two models disagree by chance on a share ``discordant`` of the images.

    Exact (``mcnemar_power``, bisected to POWER_TOL; power rises with the difference): milliseconds at n = 10^3,
    about a second at 10^5. The better model is taken to be right on ``difference`` more images on top of the
    churn, so a larger difference brings more discordant images (it cannot be larger than them). None when no
    difference at all reaches ``power``: too few images (e.g. n <= 5 at alpha 0.05: five discordant images all one way
    give p = 0.0625). ``discordant``: the night passes ``discordant_share`` of its paired comparison; the observed
    share holds whatever real difference there is as well, so the answer errs on the large (cautious) side."""
    _check_power_args(n, discordant, alpha, power)
    top = 1.0 - discordant
    if n == 0 or mcnemar_power(n, discordant, top, alpha) < power:
        return None
    low, high = 0.0, top                               # power(low) < power <= power(high)
    while high - low > POWER_TOL:
        mid = (low + high) / 2
        if mcnemar_power(n, discordant, mid, alpha) >= power:
            high = mid
        else:
            low = mid
    return high


def connor_difference(n: int, discordant: float, alpha: float, power: float = 0.8) -> float | None:
    """``min_detectable_difference`` under the normal approximation of Connor (1987): n = (z_a sqrt(psi) +
    z_b sqrt(psi - d^2))^2 / d^2 with psi = discordant + d, solved for d by bisection. A cross-check of the
    exact answer (tests/test_gate.py), which it approaches as the discordant images grow many."""
    _check_power_args(n, discordant, alpha, power)
    z_a, z_b = z_two_sided(alpha), NormalDist().inv_cdf(power)

    def margin(d: float) -> float:
        psi = discordant + d
        return d * math.sqrt(n) - z_a * math.sqrt(psi) - z_b * math.sqrt(max(psi - d * d, 0.0))

    top = 1.0 - discordant
    if n == 0 or margin(top) < 0:
        return None
    low, high = 0.0, top
    while high - low > POWER_TOL:
        mid = (low + high) / 2
        low, high = (low, mid) if margin(mid) >= 0 else (mid, high)
    return high


def discordant_share(discordant: int, n: int) -> float:
    """The share of discordant images a night plans with: its observed share, but at least the Wilson 95% upper
    bound of 0 discordant in n, z^2 / (n + z^2) (3.3% at n = 111, 0.38% at 1000). Two models that agree on all
    111 images have not shown that their churn is 0, only that it is below that bound; planning with 0 would
    claim a detectable difference the test set cannot back."""
    if n <= 0:
        raise ValueError(f"n must be > 0, got {n}")
    return max(discordant / n, wilson(0, n)[1])


def wilson_half_width(successes: int, n: int, alpha: float) -> float | None:
    """Half the width of the Wilson interval at level 1 - alpha: how close to a fixed accuracy the test set can
    tell an accuracy apart (no power attached: a true accuracy exactly that far off is told apart about half
    the time). None when n is 0."""
    bounds = wilson(successes, n, z_two_sided(alpha))
    return None if bounds is None else (bounds[1] - bounds[0]) / 2


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
