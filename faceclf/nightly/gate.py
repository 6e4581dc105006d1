"""The promotion gate: absolute accuracy bars, then a paired comparison with the champion on the same test
images (exact McNemar test overall; per class, F1 compared by a paired permutation test), every accuracy with
its Wilson 95% interval and n, and the smallest difference the test set can detect (so that "not significant" is
read for what it is). A champion that itself fails the bars on tonight's test images is stale: it
cannot veto, and a candidate replaces it by clearing the bars and being better overall on the same images."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from faceclf.config import GateConfig
from faceclf.nightly.stats import (
    ClassComparison,
    McNemar,
    discordant_share,
    min_detectable_difference,
    wilson,
    wilson_half_width,
)

DETECT_POWER = 0.8  # the power at which decision.json and the report state the difference the test set detects


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


def interval(value: float | None, right: int | None, n: int | None) -> dict[str, Any]:
    """An accuracy as decision.json and the report show it: value, n, Wilson 95% low/high (None unmeasured)."""
    bounds = wilson(right, n) if right is not None and n else None
    return {"value": value if _finite(value) else None, "n": n or 0,
            "low": bounds[0] if bounds else None, "high": bounds[1] if bounds else None}


def accuracies(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """Overall and per-class accuracy of a metrics dict, each with n and its Wilson interval (counts from the
    confusion matrix, rows = true class)."""
    if metrics is None:
        return None
    cm = metrics.get("confusion_matrix") or []
    right = sum(cm[i][i] for i in range(len(cm))) if cm else None
    per_class = {}
    for i, (cls, value) in enumerate((metrics.get("per_class_accuracy") or {}).items()):
        row = cm[i] if i < len(cm) else None
        per_class[cls] = interval(value, row[i] if row else None, sum(row) if row else None)
    return {"accuracy": interval(metrics.get("accuracy"), right, metrics.get("n")), "per_class": per_class}


def fmt(acc: dict[str, Any]) -> str:
    """'0.9820 [0.9421, 0.9950], n=111' (or 'n/a')."""
    if acc["value"] is None:
        return f"n/a, n={acc['n']}"
    ci = f" [{acc['low']:.4f}, {acc['high']:.4f}]" if acc["low"] is not None else ""
    return f"{acc['value']:.4f}{ci}, n={acc['n']}"


@dataclass
class Decision:
    """Whether the candidate is promoted, every rule it failed (with by how much), and the evidence:
    accuracies with intervals, the paired comparison, and one sentence saying why."""

    promote: bool
    reasons: list[str] = field(default_factory=list)
    candidate_accuracy: float | None = None
    champion_version: str | None = None
    champion_accuracy: float | None = None
    gate: dict[str, Any] = field(default_factory=dict)
    candidate: dict[str, Any] | None = None     # accuracies() of the candidate
    champion: dict[str, Any] | None = None      # accuracies() of the champion on the same test set
    paired: dict[str, Any] | None = None        # McNemar counts and p-value (None: nothing to pair with)
    classes: list[dict[str, Any]] | None = None  # per class: both models' precision, recall, F1 and p_worse
    champion_stale: list[str] = field(default_factory=list)  # why the champion fails the bars on tonight's test set
    why: str = ""
    approval: dict[str, Any] | None = None      # a person's answer when the night asked for one
    detectable: dict[str, Any] | None = None    # the smallest difference tonight's test set resolves (detectable())

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
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def class_regressions(classes: Sequence[ClassComparison], version: str | None, cfg: GateConfig) -> list[str]:
    """A reason for each class whose F1 trails the champion's by more than ``class_tolerance`` and significantly
    (paired permutation test, p < alpha): a real regression, not the shadow of a champion that calls every
    image that class (perfect recall, poor precision, poor F1)."""
    reasons = []
    for c in classes:
        if c.candidate_f1 is None or c.champion_f1 is None:
            continue
        drop = c.champion_f1 - c.candidate_f1
        if drop > cfg.class_tolerance and c.p_worse < cfg.alpha:
            reasons.append(f"class {c.cls!r} F1 {c.candidate_f1:.4f} is worse than champion {version}'s "
                           f"{c.champion_f1:.4f} by {drop:.4f} (class_tolerance {cfg.class_tolerance}; precision "
                           f"{num(c.candidate_precision)} vs {num(c.champion_precision)}, recall "
                           f"{num(c.candidate_recall)} vs {num(c.champion_recall)}; paired permutation "
                           f"p = {c.p_worse:.3g} < {cfg.alpha})")
    return reasons


def num(x: float | None) -> str:
    """A rate as the report and the reasons print it: '0.9189', or 'n/a' where it is undefined."""
    return "n/a" if x is None else f"{x:.4f}"


def recall_regressions(candidate: dict[str, Any], champion: dict[str, Any], version: str | None,
                       cfg: GateConfig) -> list[str]:
    """Per-class recall against the champion's, without significance: only for runs written before per-image
    predictions existed (nothing to pair)."""
    reasons, theirs = [], champion.get("per_class_accuracy") or {}
    for cls, value in (candidate.get("per_class_accuracy") or {}).items():
        other = theirs.get(cls)
        if _finite(value) and _finite(other) and value < other - cfg.class_tolerance:
            reasons.append(f"class {cls!r} accuracy {value:.4f} is worse than champion {version}'s {other:.4f} by "
                           f"{other - value:.4f} (class_tolerance {cfg.class_tolerance})")
    return reasons


def detectable(paired: McNemar | None, candidate: dict[str, Any], alpha: float,
               power: float = DETECT_POWER) -> dict[str, Any] | None:
    """The smallest accuracy difference tonight's test set can resolve, as decision.json and the report give it.

    With a paired comparison: the difference the gate's exact McNemar test at ``alpha`` detects with ``power``
    (stats.min_detectable_difference; ``difference`` None: none at all), planned with the night's discordant
    share floored (stats.discordant_share). Without one (no champion, or a run without per-image predictions):
    the Wilson half-width at the candidate's accuracy, the distance from a fixed accuracy the test set can
    resolve, with no power attached (``power`` None). None when the candidate's accuracy was not measured."""
    if paired is not None and paired.n:
        share = discordant_share(paired.discordant, paired.n)
        return {"method": "exact McNemar", "n": paired.n, "discordant_images": paired.discordant,
                "discordant_observed": paired.discordant / paired.n, "discordant": share, "alpha": alpha,
                "power": power, "difference": min_detectable_difference(paired.n, share, alpha, power)}
    acc, n = candidate.get("accuracy"), candidate.get("n")
    if not _finite(acc) or not n:
        return None
    right = min(n, max(0, round(acc * n)))
    return {"method": "Wilson half-width", "n": n, "accuracy": acc, "alpha": alpha, "power": None,
            "difference": wilson_half_width(right, n, alpha)}


def better(paired: McNemar | None) -> bool:
    """The candidate is right on more of the images the two models disagree on (significance aside)."""
    return paired is not None and paired.candidate_only > paired.champion_only


def compare_with_champion(candidate: dict[str, Any], champion: dict[str, Any], version: str | None,
                          cfg: GateConfig, paired: McNemar | None,
                          classes: Sequence[ClassComparison] | None = None) -> list[str]:
    """Reasons the candidate may not replace the champion, re-scored on the same test images: worse overall
    by more than ``tolerance``, significantly worse (McNemar p < alpha), not significantly better (with
    ``require_improvement``), or any class's F1 significantly worse by more than ``class_tolerance``
    (``classes``; per-class recall where a run has no per-image predictions)."""
    reasons = []
    acc, champ_acc = candidate.get("accuracy"), champion.get("accuracy")
    if not _finite(champ_acc):
        return [f"the champion's re-scored accuracy {champ_acc} is not a number; refusing to replace it blindly"]
    if _finite(acc) and acc < champ_acc - cfg.tolerance:
        reasons.append(f"accuracy {acc:.4f} is worse than champion {version}'s {champ_acc:.4f} on the same test "
                       f"set by {champ_acc - acc:.4f} (tolerance {cfg.tolerance})")
    if paired is not None and paired.discordant:
        if paired.champion_only > paired.candidate_only and paired.p_value < cfg.alpha:
            reasons.append(f"significantly worse than champion {version} on the same images: it gets "
                           f"{paired.champion_only} images wrong that the champion gets right, and {paired.candidate_only} "
                           f"right that the champion gets wrong (McNemar p = {paired.p_value:.3g} < {cfg.alpha})")
    if cfg.require_improvement and not (better(paired) and paired.p_value < cfg.alpha):
        reasons.append(not_better(version, paired, cfg, "require_improvement"))
    if classes is not None:
        reasons += class_regressions(classes, version, cfg)
    else:
        reasons += recall_regressions(candidate, champion, version, cfg)
    return reasons


def not_better(version: str | None, paired: McNemar | None, cfg: GateConfig, rule: str) -> str:
    """'not significantly better than champion V (b vs c discordant images, p = ...; RULE with alpha A)'."""
    p = f"p = {paired.p_value:.3g}" if paired is not None else "no paired comparison"
    return (f"not significantly better than champion {version} ({paired.candidate_only if paired else 0} vs "
            f"{paired.champion_only if paired else 0} discordant images, {p}; {rule} with alpha {cfg.alpha})")


def stale_champion(champion: dict[str, Any] | None, version: str | None, cfg: GateConfig) -> list[str]:
    """Why the champion, re-scored on tonight's test images, fails the absolute bars itself (empty: it does not)."""
    if champion is None or not _finite(champion.get("accuracy")):
        return []
    return [f"champion {version}'s {r}" for r in gate_failures(champion, cfg.min_accuracy, cfg.min_class_accuracy)]


def against_stale_champion(candidate: dict[str, Any], champion: dict[str, Any], version: str | None,
                           paired: McNemar | None) -> list[str]:
    """A stale champion cannot veto (no tolerance, no per-class rule, no significance asked): a candidate that
    clears the bars must only be better overall, right on more of the images the two disagree on (on more test
    images, without per-image predictions). A night's small test split rarely makes a real gain significant,
    and waiting for that kept a champion below the bars in production."""
    if paired is not None:
        if better(paired):
            return []
        return [f"not better than the stale champion {version} on the same images ({paired.candidate_only} vs "
                f"{paired.champion_only} discordant)"]
    acc, champ_acc = candidate.get("accuracy"), champion.get("accuracy")
    if _finite(acc) and acc > champ_acc:
        return []
    return [f"accuracy {acc} is not above the stale champion {version}'s {champ_acc:.4f}"]


def why(promote: bool, reasons: Sequence[str], candidate: dict[str, Any] | None, champion: dict[str, Any] | None,
        version: str | None, paired: McNemar | None, stale: Sequence[str] = ()) -> str:
    """The decision in one sentence."""
    if not promote:
        return f"Rejected because {reasons[0]}" + (f" (and {len(reasons) - 1} more)" if len(reasons) > 1 else "") + "."
    if stale:
        test = (f": on the same images {paired.candidate_only} vs {paired.champion_only} discordant (McNemar p = "
                f"{paired.p_value:.3g})" if paired is not None else "")
        return (f"Promoted: test accuracy {fmt(candidate['accuracy'])} clears the bars and is better than champion "
                f"{version}, which is stale ({stale[0]}){test}.")
    cand = fmt(candidate["accuracy"]) if candidate else "n/a"
    if champion is None:
        return f"Promoted: test accuracy {cand} clears the absolute bars; there is no champion to compare with."
    test = (f"; on the same images {paired.candidate_only} vs {paired.champion_only} discordant "
            f"(McNemar p = {paired.p_value:.3g})" if paired is not None else "")
    return (f"Promoted: test accuracy {cand} against champion {version}'s {fmt(champion['accuracy'])}{test}, "
            "no class's F1 significantly worse by more than the class tolerance.")


def decide(candidate: dict[str, Any], cfg: GateConfig, champion: dict[str, Any] | None = None,
           champion_version: str | None = None, paired: McNemar | None = None,
           classes: Sequence[ClassComparison] | None = None) -> Decision:
    """Gate a candidate's test metrics; ``champion`` is the champion re-scored on the same test set, ``paired``
    the two models' per-image outcomes compared on it, and ``classes`` each class compared on it.

    Fails on: accuracy or any class below its bar, NaN/missing numbers, an empty or single-class test set,
    and against a champion: see ``compare_with_champion``, or, when the champion fails the bars itself
    (stale), ``against_stale_champion``.
    """
    champ_acc = champion.get("accuracy") if champion else None
    stale = stale_champion(champion, champion_version, cfg)
    evidence = dict(candidate=accuracies(candidate), champion=accuracies(champion),
                    paired={"n": paired.n, **asdict(paired)} if paired else None,
                    classes=[asdict(c) for c in classes] if classes is not None else None, champion_stale=stale,
                    detectable=detectable(paired, candidate, cfg.alpha))
    if candidate.get("diverged"):  # nothing was measured: the one reason says why
        reasons = [f"training diverged: {candidate['diverged']}"]
        return Decision(False, reasons, None, champion_version, champ_acc if _finite(champ_acc) else None, asdict(cfg),
                        **evidence, why=why(False, reasons, None, None, champion_version, paired))
    reasons = gate_failures(candidate, cfg.min_accuracy, cfg.min_class_accuracy)
    per_class = candidate.get("per_class_accuracy") or {}
    measured = [c for c, v in per_class.items() if v is not None]
    if not candidate.get("n"):
        reasons.append("the test set is empty")
    elif len(measured) < 2:
        reasons.append(f"the test set measures {len(measured)} class(es); at least 2 are needed")
    if not _finite(candidate.get("loss")):
        reasons.append(f"test loss {candidate.get('loss')} is not a finite number")
    if stale:
        reasons += against_stale_champion(candidate, champion, champion_version, paired)
    elif champion is not None:
        reasons += compare_with_champion(candidate, champion, champion_version, cfg, paired, classes)
    acc = candidate.get("accuracy")
    return Decision(not reasons, reasons, acc if _finite(acc) else None, champion_version,
                    champ_acc if _finite(champ_acc) else None, asdict(cfg), **evidence,
                    why=why(not reasons, reasons, evidence["candidate"], evidence["champion"], champion_version, paired,
                            stale))


def with_approval(decision: Decision, approved: bool, comment: str, timed_out: bool = False) -> Decision:
    """``decision`` (which passed the gate) after a person answered: promoted only if approved. A refusal or
    no answer in time becomes the reason; the comment is kept either way."""
    answer = {"approved": approved, "comment": comment, "timed_out": timed_out}
    if approved:
        note = f" Approved by a person{': ' + comment if comment else ''}."
        return dataclasses.replace(decision, approval=answer, why=decision.why + note)
    reason = comment if timed_out else f"rejected by a person{': ' + comment if comment else ''}"
    return dataclasses.replace(decision, promote=False, reasons=[*decision.reasons, reason], approval=answer,
                               why=f"Rejected because {reason} (the gate had passed).")
