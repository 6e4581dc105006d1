"""The statistics of the promotion gate: Wilson intervals for accuracies, the exact McNemar test for two
models scored on the same images. Plain math (no scipy): a few lines each, checked against known values
in tests/test_gate.py."""

from __future__ import annotations

import math
from dataclasses import dataclass

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
