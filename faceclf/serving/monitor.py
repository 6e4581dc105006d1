"""The champion watched between nights: each scoring run's predicted classes, its confidences and a label-free
estimate of the model's accuracy on the images it scored.

The estimate is confidence-based performance estimation (CBPE, as NannyML estimates accuracy). With calibrated
probabilities (the export's temperature scaling) the predicted class is right with probability p, its own
probability; the number right among n images is then a sum of independent Bernoulli(p_i), a Poisson-binomial
variable: expected accuracy mean(p_i), variance sum p_i (1 - p_i) / n^2, and a 95% interval by the normal
approximation. It is set against the model's own test figures (model.onnx's metadata): an estimate more than
``accuracy_drop`` below the test accuracy, or a class whose share of the predictions moved more than
``class_shift`` from its share of the test predictions, is an alarm, once ``min_images`` images are in.

Probabilities are counted in millionths, the resolution of the CSV's '%.6f' columns: the sums are exact
integers, so the same rows give the same figures whichever order or pieces they come in (new, reused and
resumed rows, a rerun, batches or all at once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from faceclf.config import MonitorConfig
from faceclf.nightly.stats import Z95

MICRO = 1_000_000   # probabilities in millionths: the CSV's 6 decimals
BINS = 10           # confidence histogram: bin k holds max probabilities in [k/10, (k+1)/10), the last one 1.0 too
CHUNK = 1 << 20     # rows summed per numpy call: p (1 - p) in millionths^2 (<= 2.5e11) stays far inside int64


def micro(text: str) -> int:
    """A probability written in the CSV ('0.987654') in millionths (987654); ValueError when it is not a number
    in [0, 1] (a row read back from an earlier CSV is input)."""
    value = round(float(text) * MICRO)  # ValueError on NaN, OverflowError on inf
    if not 0 <= value <= MICRO:
        raise ValueError(f"probability {text!r} is not in [0, 1]")
    return value


def confidence_bin(p: int) -> int:
    """The histogram bin of a max probability ``p`` in millionths."""
    return min(p * BINS // MICRO, BINS - 1)


@dataclass
class Tally:
    """What a scoring run predicted, added up row by row: images per predicted class, the histogram of the
    predicted class's probability, and the sums behind the estimate (in millionths, exact)."""

    classes: Sequence[str]
    counts: dict[str, int] = field(default_factory=dict)   # predicted class -> images
    histogram: list[int] = field(default_factory=lambda: [0] * BINS)
    sum_p: int = 0           # sum of p, millionths
    sum_pq: int = 0          # sum of p (1 - p), millionths squared
    unreadable: int = 0      # rows without an error whose class or probability is not one (skipped)

    def __post_init__(self) -> None:
        self.counts = {c: self.counts.get(c, 0) for c in self.classes}
        self._column = {c: f"p_{c}" for c in self.classes}  # predicted class -> its probability's CSV column

    @property
    def n(self) -> int:
        """Images counted."""
        return sum(self.counts.values())

    def add_row(self, row: Mapping[str, str]) -> None:
        """Count one CSV row (text values, as written or read back); a row with an error is not a prediction.
        About 1 us: one dict lookup and one float parse, whatever the number of classes."""
        if row["error"]:
            return
        cls = row["predicted_class"]
        try:
            p = micro(row[self._column[cls]])
        except (KeyError, ValueError, OverflowError):
            self.unreadable += 1
            return
        self.counts[cls] += 1
        self.histogram[confidence_bin(p)] += 1
        self.sum_p += p
        self.sum_pq += p * (MICRO - p)

    def add_probs(self, probs: np.ndarray) -> None:
        """Count a batch of probabilities (B, C), columns in ``classes`` order (rounded to millionths as the CSV
        rounds them, so it agrees with ``add_row`` on the written rows but for an ulp at a rounding tie)."""
        for start in range(0, len(probs), CHUNK):
            part = np.asarray(probs[start:start + CHUNK], dtype=np.float64)
            best = part.argmax(axis=1)
            p = np.clip(np.rint(part[np.arange(len(part)), best] * MICRO), 0, MICRO).astype(np.int64)
            for cls, k in zip(self.classes, np.bincount(best, minlength=len(self.classes)).tolist()):
                self.counts[cls] += k
            bins = np.bincount(np.minimum(p * BINS // MICRO, BINS - 1), minlength=BINS).tolist()
            self.histogram = [a + b for a, b in zip(self.histogram, bins)]
            self.sum_p += int(p.sum())
            self.sum_pq += int((p * (MICRO - p)).sum())


def estimate(sum_p: int, sum_pq: int, n: int, z: float = Z95) -> tuple[float, float, float] | None:
    """(expected accuracy, low, high) from the sums of p and p (1 - p) in millionths over n images: the mean
    of p and the normal interval of the Poisson-binomial accuracy (sd = sqrt(sum p (1 - p)) / n), kept inside
    [0, 1] and around the estimate. None when n is 0."""
    if n <= 0:
        return None
    value = sum_p / (n * MICRO)
    half = z * math.sqrt(sum_pq) / (n * MICRO)
    return value, max(0.0, value - half), min(1.0, value + half)  # half >= 0: the interval holds the estimate


def shares(counts: Mapping[str, int]) -> dict[str, float]:
    """Each class's share of the images (every class, 0 included); all 0 when there are none."""
    n = sum(counts.values())
    return {c: k / n if n else 0.0 for c, k in counts.items()}


def share_shift(now: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
    """Each class's share now minus its share on the test set (a class absent from either counts as 0)."""
    return {c: now.get(c, 0.0) - reference.get(c, 0.0) for c in sorted(set(now) | set(reference))}


def beyond(moved: float, bar: float, se: float, z: float = Z95) -> bool:
    """Whether a move of ``moved`` is past ``bar`` and also past its own noise: more than ``z`` standard errors
    ``se`` from nothing (a 5% two-sided test at Z95). On a model whose test set is small (the test accuracy and
    shares it is set against are themselves noisy) a move past the bar alone is often chance."""
    return abs(moved) > bar and abs(moved) > z * se


def accuracy_se(low_high: tuple[float, float] | None, reference: Mapping[str, Any]) -> float:
    """Standard error of (test accuracy - estimate): the estimate's own (from its 95% interval) and the test
    accuracy's binomial one on its test_n images, independent."""
    low, high = low_high or (0.0, 0.0)
    acc, n_test = reference["test_accuracy"], max(1, int(reference.get("test_n") or 1))
    return math.sqrt(((high - low) / (2 * Z95)) ** 2 + acc * (1 - acc) / n_test)


def share_se(now: float, ref: float, n: int, n_test: int) -> float:
    """Standard error of the difference of two shares (n scored images, n_test test images), pooled."""
    pooled = (now * n + ref * n_test) / max(1, n + n_test)
    return math.sqrt(pooled * (1 - pooled) * (1 / max(1, n) + 1 / max(1, n_test)))


def alarms(n: int, value: float | None, low_high: tuple[float, float] | None, reference: Mapping[str, Any] | None,
           now: Mapping[str, float], shift: Mapping[str, float], cfg: MonitorConfig) -> list[str]:
    """Human-readable alarms, each naming its numbers: the estimate more than ``cfg.accuracy_drop`` below the
    test accuracy, a class's share moved by more than ``cfg.class_shift``, each also significant given both
    sides' sampling noise (``beyond``). None below ``cfg.min_images`` images or without a reference."""
    if reference is None or value is None or n < cfg.min_images:
        return []
    found = []
    drop = reference["test_accuracy"] - value
    if drop > 0 and beyond(drop, cfg.accuracy_drop, accuracy_se(low_high, reference)):
        low, high = low_high or (value, value)
        found.append(f"estimated accuracy {value:.4f} [{low:.4f}, {high:.4f}] on {n} images is {drop:.4f} below the "
                     f"test accuracy {reference['test_accuracy']:.4f} on {reference.get('test_n')} images (alarm "
                     f"above {cfg.accuracy_drop:g}, and significant)")
    ref_shares, n_test = reference["predicted_shares"], max(1, int(reference.get("test_n") or 1))
    for cls, moved in shift.items():
        if beyond(moved, cfg.class_shift, share_se(now.get(cls, 0.0), ref_shares.get(cls, 0.0), n, n_test)):
            found.append(f"class {cls!r} is predicted for {now.get(cls, 0.0):.1%} of {n} images against "
                         f"{ref_shares.get(cls, 0.0):.1%} of the {n_test} test images (shift {moved:+.3f}, alarm "
                         f"above {cfg.class_shift:g}, and significant)")
    return found


def notes(n: int, tally: Tally, reference: Mapping[str, Any] | None, temperature: float | None,
          cfg: MonitorConfig) -> list[str]:
    """Why figures may be read with care or raise no alarm: too few images, no reference, uncalibrated
    probabilities, unreadable rows."""
    said = []
    if reference is None:
        said.append("the model carries no test reference (exported before calibration): estimate only, no alarms")
    elif n < cfg.min_images:
        said.append(f"only {n} scored images, fewer than min_images {cfg.min_images}: recorded, no alarms raised")
    if temperature is None:
        said.append("the model's probabilities are not temperature-calibrated: the estimate may run high")
    if tally.unreadable:
        said.append(f"{tally.unreadable} rows without an error had no readable class probability: not counted")
    return said


def summarize(tally: Tally, reference: Mapping[str, Any] | None, cfg: MonitorConfig,
              temperature: float | None = None) -> dict[str, Any]:
    """The run's monitor block (predictions.json "monitor"): plain types, see ``tally``'s counts and
    ``estimate``, set against ``reference`` ({"test_accuracy", "test_n", "predicted_shares"} or None)."""
    n = tally.n
    found = estimate(tally.sum_p, tally.sum_pq, n)
    value, interval = (found[0], [found[1], found[2]]) if found else (None, None)
    now = shares(tally.counts)
    shift = share_shift(now, reference["predicted_shares"]) if reference else {}
    return {
        "n": n,
        "predicted_shares": now,
        "confidence_histogram": {"edges": [k / BINS for k in range(BINS + 1)], "counts": list(tally.histogram)},
        "mean_confidence": value,  # the mean probability of the predicted class: the estimate itself (CBPE)
        "estimated_accuracy": value,
        "interval": interval,
        "temperature": temperature,
        "reference": dict(reference) if reference else None,
        "accuracy_drop": reference["test_accuracy"] - value if reference and value is not None else None,
        "share_shift": shift,
        "alarms": alarms(n, value, tuple(interval) if interval else None, reference, now, shift, cfg),
        "notes": notes(n, tally, reference, temperature, cfg),
        "thresholds": {"accuracy_drop": cfg.accuracy_drop, "class_shift": cfg.class_shift,
                       "min_images": cfg.min_images, "confidence_level": 0.95},
    }


def brief(summary: Mapping[str, Any]) -> str:
    """One line: the estimate with its interval on n images, the test accuracy it is set against, the alarms."""
    if summary.get("estimated_accuracy") is None:
        return "no scored images: no accuracy estimate"
    low, high = summary["interval"]
    text = f"estimated accuracy {summary['estimated_accuracy']:.4f} [{low:.4f}, {high:.4f}] on {summary['n']} images"
    reference = summary.get("reference")
    text += f" vs test {reference['test_accuracy']:.4f}" if reference else " (no test reference in the model)"
    if summary.get("alarms"):
        text += "; ALARM: " + "; ".join(summary["alarms"])
    return text
