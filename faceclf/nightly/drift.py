"""Drift on arrival: tonight's new images against the images the model was trained on, before training.

    class balance     share of each class among the new images vs the train split's (largest difference)
    image size        short side in pixels (from the manifest): two-sample Kolmogorov-Smirnov statistic
    brightness        mean pixel value of each decoded image (the decoded cache): KS statistic
    champion          the champion's accuracy on the new images against its own test accuracy

Each check is flagged when it moves past its threshold (``DriftConfig``); the report lists every figure and
the flags, and the night stops before training when ``fail_on_drift`` is set. At most
``DriftConfig.sample`` images of each side are read for brightness (evenly spread over the index).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import numpy as np

from faceclf.config import DriftConfig
from faceclf.dataset.cache import DecodedCache
from faceclf.dataset.faceset import FaceSet, ImageIndex, evenly_spread

log = logging.getLogger(__name__)


class DriftDetected(RuntimeError):
    """The new images moved beyond a threshold and fail_on_drift is set: the night stops before training."""


@dataclass
class DriftReport:
    """Every figure measured, and the checks that moved beyond their threshold (one sentence each)."""

    new_images: int
    reference_images: int
    class_share: dict[str, dict[str, float]] = field(default_factory=dict)  # class -> {"new", "train"}
    class_shift: float | None = None           # largest |share_new - share_train| over the classes
    size_ks: float | None = None
    brightness_ks: float | None = None
    brightness_mean: dict[str, float] = field(default_factory=dict)         # {"new", "train"}
    champion_accuracy_new: float | None = None
    champion_accuracy_test: float | None = None
    flags: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (drift.json)."""
        return asdict(self)


def ks_statistic(a: np.ndarray, b: np.ndarray) -> float | None:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs (0: same, 1:
    disjoint); None when either sample is empty."""
    if not len(a) or not len(b):
        return None
    a, b = np.sort(a), np.sort(b)
    values = np.concatenate([a, b])
    cdf_a = np.searchsorted(a, values, side="right") / len(a)
    cdf_b = np.searchsorted(b, values, side="right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def spread(index: ImageIndex, k: int) -> ImageIndex:
    """At most ``k`` of ``index``'s images, evenly spread (deterministic)."""
    return index if len(index) <= k else index.take(evenly_spread(len(index), k))


def brightness(cache: DecodedCache, images: ImageIndex) -> np.ndarray:
    """Mean pixel value (0-255) of each of ``images`` that the cache holds, float64 (K,)."""
    _, index = cache.locate().lookup(images.sha256s)  # (K, 2): shard, row of each cached image
    shards = {}
    out = np.empty(len(index))
    for k, (shard, row) in enumerate(index):
        if shard not in shards:
            shards[shard] = cache.open(int(shard))
        out[k] = float(shards[shard][row].mean())  # (3, S, S) uint8
    return out


def class_shares(faceset: FaceSet, images: ImageIndex) -> np.ndarray:
    """Share of each of the FaceSet's classes among ``images`` (C,)."""
    counts = np.bincount(faceset.label_indices(images), minlength=len(faceset.classes)).astype(float)
    return counts / max(counts.sum(), 1.0)


def new_mask(faceset: FaceSet, new: Sequence[str]) -> np.ndarray:
    """bool (N,): which of the FaceSet's images have a sha256 in ``new``."""
    return np.isin(faceset.images.sha256s, np.array(sorted(new), dtype="S64"))


def measure(faceset: FaceSet, new: Sequence[str], cache: DecodedCache | None, cfg: DriftConfig,
            champion_new: float | None = None, champion_test: float | None = None) -> DriftReport:
    """Compare the images of ``faceset`` whose sha256 is in ``new`` with its train split's other images."""
    is_new = new_mask(faceset, new)
    fresh = faceset.images.take(is_new)
    reference = faceset.images.take(~is_new & faceset.images.split_mask("train"))
    report = DriftReport(len(fresh), len(reference), champion_accuracy_new=champion_new,
                         champion_accuracy_test=champion_test)
    if not len(fresh) or not len(reference):
        return report
    shares_new, shares_ref = class_shares(faceset, fresh), class_shares(faceset, reference)
    report.class_share = {c: {"new": float(n), "train": float(r)}
                          for c, n, r in zip(faceset.classes, shares_new, shares_ref)}
    report.class_shift = float(np.max(np.abs(shares_new - shares_ref)))
    known_new, known_ref = fresh.short_sides[fresh.short_sides > 0], reference.short_sides[reference.short_sides > 0]
    report.size_ks = ks_statistic(known_new.astype(float), known_ref.astype(float))
    if cache is not None:
        b_new, b_ref = brightness(cache, spread(fresh, cfg.sample)), brightness(cache, spread(reference, cfg.sample))
        report.brightness_ks = ks_statistic(b_new, b_ref)
        if len(b_new) and len(b_ref):
            report.brightness_mean = {"new": float(b_new.mean()), "train": float(b_ref.mean())}
    report.flags = flags(report, cfg)
    for f in report.flags:
        log.warning("drift: %s", f)
    return report


def flags(r: DriftReport, cfg: DriftConfig) -> list[str]:
    """One sentence per check beyond its threshold."""
    out = []
    if r.class_shift is not None and r.class_shift > cfg.class_shift:
        worst = max(r.class_share, key=lambda c: abs(r.class_share[c]["new"] - r.class_share[c]["train"]))
        out.append(f"class balance moved: {worst!r} is {r.class_share[worst]['new']:.0%} of the new images against "
                   f"{r.class_share[worst]['train']:.0%} of the train split (limit {cfg.class_shift:.0%} points)")
    if r.size_ks is not None and r.size_ks > cfg.size_ks:
        out.append(f"image sizes moved: KS statistic {r.size_ks:.2f} between the new images' short sides and the "
                   f"train split's (limit {cfg.size_ks})")
    if r.brightness_ks is not None and r.brightness_ks > cfg.brightness_ks:
        out.append(f"brightness moved: KS statistic {r.brightness_ks:.2f} (mean {r.brightness_mean['new']:.0f} "
                   f"against {r.brightness_mean['train']:.0f} of 255; limit {cfg.brightness_ks})")
    if (r.champion_accuracy_new is not None and r.champion_accuracy_test is not None
            and r.champion_accuracy_new < r.champion_accuracy_test - cfg.accuracy_drop):
        out.append(f"the champion gets {r.champion_accuracy_new:.1%} of the new images right against "
                   f"{r.champion_accuracy_test:.1%} of its test set (limit {cfg.accuracy_drop:.0%} points)")
    return out


def markdown(r: DriftReport) -> str:
    """The report.md section: what was compared, every figure, and what moved."""
    fmt = (lambda x: "n/a" if x is None else f"{x:.3f}")
    lines = ["## Drift on arrival", "",
             f"{r.new_images} new images against {r.reference_images} train images already held.", "",
             "| check | figure |", "| --- | --- |",
             f"| class balance, largest share difference | {fmt(r.class_shift)} |",
             f"| image short side, KS statistic | {fmt(r.size_ks)} |",
             f"| brightness, KS statistic | {fmt(r.brightness_ks)} |",
             f"| champion accuracy, new images / its test set | {fmt(r.champion_accuracy_new)} / "
             f"{fmt(r.champion_accuracy_test)} |", ""]
    lines += ([f"- **moved:** {f}" for f in r.flags] or ["Nothing moved beyond its threshold."]) + [""]
    return "\n".join(lines)
