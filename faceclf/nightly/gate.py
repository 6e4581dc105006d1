"""The promotion gate: absolute accuracy bars, then 'not worse than the champion' on the same test set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from faceclf.training.metrics import gate_failures

# Defaults, in one place.
MIN_ACCURACY = 0.90        # overall test accuracy a candidate must reach
MIN_CLASS_ACCURACY = 0.85  # every class's test accuracy must reach this
TOLERANCE = 0.0            # candidate accuracy may trail the champion's by at most this much


@dataclass
class GateConfig:
    """Thresholds of the promotion gate."""

    min_accuracy: float = MIN_ACCURACY
    min_class_accuracy: float = MIN_CLASS_ACCURACY
    tolerance: float = TOLERANCE

    def __post_init__(self) -> None:
        for name in ("min_accuracy", "min_class_accuracy"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {v}")
        if self.tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {self.tolerance}")


@dataclass
class Decision:
    """Whether the candidate is promoted, and every rule it failed (with by how much)."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_accuracy: float | None = None
    champion_version: str | None = None
    champion_accuracy: float | None = None
    gate: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (decision.json)."""
        return asdict(self)

    def summary(self) -> str:
        """One sentence for logs and reports."""
        if self.promote:
            vs = (f" (champion {self.champion_version}: {self.champion_accuracy:.4f})"
                  if self.champion_version else " (no champion yet: absolute thresholds only)")
            return f"promoted: test accuracy {self.candidate_accuracy:.4f}{vs}"
        return "rejected: " + "; ".join(self.reasons)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def decide(candidate: dict[str, Any], cfg: GateConfig, champion: dict[str, Any] | None = None,
           champion_version: str | None = None) -> Decision:
    """Gate a candidate's test metrics; ``champion`` is the champion re-scored on the same test set.

    Fails on: accuracy or any class below its bar, NaN/missing numbers, an empty or single-class
    test set, or accuracy below the champion's minus the tolerance.
    """
    champ_acc = champion.get("accuracy") if champion else None
    if candidate.get("diverged"):  # nothing was measured: the one reason says why
        return Decision(False, [f"training diverged: {candidate['diverged']}"], None, champion_version,
                        champ_acc if _finite(champ_acc) else None, asdict(cfg))
    reasons = gate_failures(candidate, cfg.min_accuracy, cfg.min_class_accuracy)
    per_class = candidate.get("per_class_accuracy") or {}
    measured = [c for c, v in per_class.items() if v is not None]
    if not candidate.get("n"):
        reasons.append("the test set is empty")
    elif len(measured) < 2:
        reasons.append(f"the test set measures {len(measured)} class(es); at least 2 are needed")
    if not _finite(candidate.get("loss")):
        reasons.append(f"test loss {candidate.get('loss')} is not a finite number")
    acc = candidate.get("accuracy")
    if champion is not None:
        if not _finite(champ_acc):
            reasons.append(f"the champion's re-scored accuracy {champ_acc} is not a number; refusing to replace it blindly")
        elif _finite(acc) and acc < champ_acc - cfg.tolerance:
            reasons.append(f"accuracy {acc:.4f} is worse than champion {champion_version}'s {champ_acc:.4f} "
                           f"on the same test set by {champ_acc - acc:.4f} (tolerance {cfg.tolerance})")
    return Decision(not reasons, reasons, acc if _finite(acc) else None, champion_version,
                    champ_acc if _finite(champ_acc) else None, asdict(cfg))
