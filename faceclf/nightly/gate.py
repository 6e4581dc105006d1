"""The promotion gate: absolute accuracy bars, then 'not worse than the champion' on the same test set."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from faceclf.config import GateConfig


def gate_failures(metrics: dict[str, Any], min_accuracy: float, min_class_accuracy: float) -> list[str]:
    """Reasons ``metrics`` misses the bar, one sentence each; empty when it passes.

    NaN or unmeasured values fail: a model is never passed on numbers that do not exist.
    """
    reasons = []
    acc = metrics.get("accuracy")
    if acc is None or not math.isfinite(acc) or acc < min_accuracy:
        reasons.append(f"accuracy {acc} is below the minimum {min_accuracy}")
    for cls, value in metrics.get("per_class_accuracy", {}).items():
        if value is None or not math.isfinite(value) or value < min_class_accuracy:
            reasons.append(f"class {cls!r} accuracy {value} is below the minimum {min_class_accuracy}")
    return reasons


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
