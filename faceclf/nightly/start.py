"""Warm or cold: whether a night fine-tunes the champion or trains from scratch, from what it knows before it
trains (faceclf.config's WARM_* defaults cite the measurements behind the rule: `python3 -m benchmarks --only
warmstart`).

    warm_start=false                       cold
    no champion, or other classes          cold (nothing to fine-tune)
    warm_start=true                        warm
    warm_start=auto (the default):
      the champion is below the gate's bars on tonight's test split (stale)       cold
      more than max_new_share of tonight's images are new since the champion's   cold
      (or how many are new is unknown)
      otherwise                                                                   warm

The champion's accuracy on tonight's test split is the re-score the gate uses (faceclf.nightly.night.
rescore_champion, run before training); the share of new images compares tonight's FaceSet with the images the
champion was trained on (its metrics.json). Drift on arrival is not an input: see README ("Warm or cold").
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from typing import Any, Literal, Sequence

from faceclf.config import WARM_MAX_NEW_SHARE, GateConfig, NightConfig, parse_warm_start
from faceclf.dataset.faceset import FaceSet
from faceclf.nightly.gate import gate_failures
from faceclf.store.objects import Store
from faceclf.store.registry import ChampionRef, version_key

log = logging.getLogger(__name__)

WarmStart = bool | Literal["auto"]


@dataclass(frozen=True)
class StartChoice:
    """How tonight's training starts, and why in one sentence (logged, in RUN/night.json, report.md's data table
    and the flow's result)."""

    warm: bool
    reason: str
    setting: str                                 # warm_start as given: "auto", "true" or "false"
    champion: str | None = None                  # the champion's version (fine-tuned when warm)
    new_share: float | None = None               # share of tonight's images the champion was not trained on
    champion_accuracy: float | None = None       # the champion re-scored on tonight's test split
    champion_stale: tuple[str, ...] = ()         # the gate's bars it misses there

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready."""
        return {**asdict(self), "champion_stale": list(self.champion_stale)}

    def summary(self) -> str:
        """'warm: REASON' or 'cold: REASON'."""
        return f"{'warm' if self.warm else 'cold'}: {self.reason}"


def new_share(tonight: int, champion_images: int | None) -> float | None:
    """Share of tonight's ``tonight`` images that the champion, trained on ``champion_images``, never saw (the set
    only grows): 1 - champion_images / tonight, in [0, 1]; None when either count is unknown or zero."""
    if not champion_images or tonight <= 0:
        return None
    return min(1.0, max(0.0, 1.0 - champion_images / tonight))


def champion_images(store: Store, champion: ChampionRef | None) -> int | None:
    """How many images the champion was trained on (train + val + test of its metrics.json); None when there is no
    champion or its metrics do not say."""
    if champion is None:
        return None
    try:
        counts = json.loads(store.get_bytes(version_key(champion.version, "metrics.json")))["data"]["counts"]
        return int(sum(counts.values()))
    except (FileNotFoundError, KeyError, TypeError, ValueError) as e:
        log.warning("champion %s: how many images it was trained on is unknown (%s: %s)", champion.version,
                    type(e).__name__, e)
        return None


def choose_start(setting: WarmStart | str, champion: str | None, same_classes: bool, share: float | None,
                 champion_accuracy: float | None, champion_stale: Sequence[str], warm_epochs: int,
                 max_new_share: float = WARM_MAX_NEW_SHARE) -> StartChoice:
    """Warm or cold, with the reason (see the module docstring).

    ``champion``: its version (None: none yet); ``same_classes``: it knows exactly tonight's classes; ``share``:
    new_share(); ``champion_accuracy``: its accuracy on tonight's test split (None: not measured);
    ``champion_stale``: the gate's bars it misses there (faceclf.nightly.gate.gate_failures, as the gate finds a
    champion stale).
    """
    mode = parse_warm_start(setting)
    said = "auto" if mode == "auto" else str(mode).lower()
    known = {"setting": said, "champion": champion, "new_share": share, "champion_accuracy": champion_accuracy,
             "champion_stale": tuple(champion_stale)}
    if mode is False:
        return StartChoice(False, "warm_start=false: training from scratch", **known)
    if champion is None:
        return StartChoice(False, "no champion yet: training from scratch", **known)
    if not same_classes:
        return StartChoice(False, f"champion {champion} knows other classes than tonight's data: training from "
                                  "scratch (a class change needs a new model)", **known)
    pct = "an unknown share" if share is None else f"{share:.0%}"
    if mode is True:
        return StartChoice(True, f"warm_start=true: fine-tuning champion {champion} for {warm_epochs} epochs "
                                 f"({pct} of tonight's images are new to it)", **known)
    causes = []  # every reason to start cold, said in one sentence
    if champion_stale:
        causes.append(f"champion {champion} is below the gate's bars on tonight's test split "
                      f"({'; '.join(champion_stale)})")
    elif champion_accuracy is None:
        causes.append(f"champion {champion} could not be scored on tonight's test split")
    if share is None:
        causes.append(f"how many of tonight's images are new since champion {champion} is unknown")
    elif share > max_new_share:
        causes.append(f"{pct} of tonight's images are new since champion {champion} (more than max_new_share "
                      f"{max_new_share:.0%})")
    if causes:
        return StartChoice(False, " and ".join(causes) + ": training from scratch", **known)
    return StartChoice(True, f"{pct} of tonight's images are new since champion {champion} (at most max_new_share "
                             f"{max_new_share:.0%}) and it scores {champion_accuracy:.4f} on tonight's test split, "
                             f"above the gate's bars: fine-tuning it for {warm_epochs} epochs", **known)


def night_start(store: Store, cfg: NightConfig, gate: GateConfig, champion: ChampionRef | None, faceset: FaceSet,
                champion_metrics: dict[str, Any] | None) -> StartChoice:
    """Tonight's choice from what the night knows before it trains: ``champion_metrics``, the champion re-scored on
    tonight's test split (None: no champion, or not comparable), judged against the gate's bars as the gate
    judges it; the share of ``faceset``'s images new since the champion's metrics.json."""
    share = new_share(len(faceset.images), champion_images(store, champion)) if champion else None
    accuracy = (champion_metrics or {}).get("accuracy")
    measured = isinstance(accuracy, (int, float)) and math.isfinite(accuracy)
    version = champion.version if champion else None
    stale = gate_failures(champion_metrics or {}, gate.min_accuracy, gate.min_class_accuracy) if measured else []
    choice = choose_start(cfg.warm_start, version,
                          champion is not None and list(champion.classes) == list(faceset.classes), share,
                          float(accuracy) if measured else None, stale, cfg.warm_epochs, cfg.warm_max_new_share)
    log.info("training starts %s", choice.summary())
    return choice
