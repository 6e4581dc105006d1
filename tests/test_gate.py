"""The promotion gate's rules."""

from __future__ import annotations

import math

import pytest

from faceclf.config import GateConfig
from faceclf.nightly.gate import decide


def metrics(acc: float, per_class: dict, n: int = 100, loss: float = 0.1) -> dict:
    return {"accuracy": acc, "per_class_accuracy": per_class, "n": n, "loss": loss, "confusion_matrix": []}


GOOD = metrics(0.95, {"with_mask": 0.96, "without_mask": 0.94})


def test_first_night_uses_absolute_thresholds_only() -> None:
    d = decide(GOOD, GateConfig())
    assert d.promote and d.reasons == [] and "no champion" in d.summary()


def test_each_failed_rule_is_named_with_its_numbers() -> None:
    d = decide(metrics(0.85, {"with_mask": 0.95, "without_mask": 0.75}), GateConfig())
    assert not d.promote
    assert any("accuracy 0.85 is below the minimum 0.9" in r for r in d.reasons)
    assert any("'without_mask' accuracy 0.75 is below the minimum 0.85" in r for r in d.reasons)


def test_worse_than_champion_on_the_same_test_set_is_rejected() -> None:
    champion = metrics(0.97, {"with_mask": 0.97, "without_mask": 0.97})
    d = decide(GOOD, GateConfig(), champion, "v1")
    assert not d.promote and "worse than champion v1's 0.9700" in d.reasons[0] and "by 0.0200" in d.reasons[0]
    assert decide(GOOD, GateConfig(tolerance=0.03, class_tolerance=0.05), champion, "v1").promote
    assert decide(metrics(0.97, champion["per_class_accuracy"]), GateConfig(), champion, "v1").promote  # a tie passes


@pytest.mark.parametrize("bad", [
    metrics(math.nan, {"with_mask": 0.9, "without_mask": 0.9}),
    metrics(0.99, {"with_mask": 0.99, "without_mask": 0.99}, loss=math.nan),
    metrics(0.99, {"with_mask": 0.99, "without_mask": None}),
    metrics(math.nan, {"with_mask": None, "without_mask": None}, n=0),
])
def test_nan_empty_or_single_class_never_promotes(bad: dict) -> None:
    assert not decide(bad, GateConfig()).promote


def test_a_diverged_candidate_is_rejected_with_that_one_reason_whatever_the_gate() -> None:
    diverged = {**metrics(None, {"with_mask": None, "without_mask": None}, loss=None), "diverged": "no finite val loss"}
    champion = metrics(0.97, {"with_mask": 0.97, "without_mask": 0.97})
    d = decide(diverged, GateConfig(min_accuracy=0.0, min_class_accuracy=0.0, tolerance=1.0), champion, "v1")
    assert not d.promote and d.reasons == ["training diverged: no finite val loss"]
    assert d.champion_accuracy == 0.97 and d.summary() == "rejected: training diverged: no finite val loss"


def test_thresholds_are_validated() -> None:
    with pytest.raises(ValueError, match="min_accuracy must be in"):
        GateConfig(min_accuracy=1.5)


def test_bucket_names_and_folders_are_told_apart(tmp_path, monkeypatch) -> None:  # noqa: ANN001
    from faceclf.nightly.night import resolve_location

    monkeypatch.chdir(tmp_path)
    (tmp_path / "faceclf-demo").mkdir()  # a folder named like the bucket must not shadow it
    assert resolve_location("faceclf-demo") == "s3://faceclf-demo"
    assert resolve_location("s3://b") == "s3://b"
    assert resolve_location("./faceclf-demo") == "./faceclf-demo"
    assert resolve_location(str(tmp_path / "x")) == str(tmp_path / "x")
    monkeypatch.setenv("FACECLF_BUCKET", "nightly")
    assert resolve_location(None) == "s3://nightly"
    monkeypatch.delenv("FACECLF_BUCKET")
    with pytest.raises(ValueError, match="no bucket"):
        resolve_location(None)


# --- paired comparison (issue 12): McNemar on the same test images, per-class tolerance, Wilson intervals ---

from faceclf.nightly.stats import binom_cdf, mcnemar, wilson  # noqa: E402


def outcomes(right: int, n: int) -> list[bool]:
    return [True] * right + [False] * (n - right)


def scored(cand_right: list[bool], champ_right: list[bool], labels: list[int]) -> tuple[dict, dict]:
    """Candidate and champion metrics (as faceclf.training.metrics.summarize makes them) from per-image
    outcomes on the same images; class 0 with_mask, 1 without_mask (binary: a wrong image is the other class)."""
    def summary(right: list[bool]) -> dict:
        cm = [[0, 0], [0, 0]]
        for r, y in zip(right, labels):
            cm[y][y if r else 1 - y] += 1
        per = {c: (cm[i][i] / sum(cm[i]) if sum(cm[i]) else None) for i, c in enumerate(("with_mask", "without_mask"))}
        return {"accuracy": sum(right) / len(right), "per_class_accuracy": per, "n": len(right), "loss": 0.1,
                "confusion_matrix": cm}
    return summary(cand_right), summary(champ_right)


def test_wilson_and_the_exact_binomial_match_known_values() -> None:
    lo, hi = wilson(111, 111)
    assert hi == 1.0 and lo == pytest.approx(0.9666, abs=1e-4)
    lo, hi = wilson(50, 100)
    assert (lo, hi) == (pytest.approx(0.4038, abs=1e-4), pytest.approx(0.5962, abs=1e-4))
    assert wilson(0, 0) is None
    assert binom_cdf(0, 1) == 0.5 and binom_cdf(2, 10) == pytest.approx(56 / 1024)
    m = mcnemar([True, True, False, True], [True, False, True, False])
    assert (m.candidate_only, m.champion_only, m.both, m.neither) == (2, 1, 1, 0) and m.p_value == 1.0
    assert mcnemar(outcomes(10, 10), outcomes(0, 10)).p_value == pytest.approx(2 / 1024)


def test_one_image_better_on_111_is_not_significant() -> None:
    labels = [0] * 60 + [1] * 51
    cand = outcomes(111, 111)
    champ = [True] * 110 + [False]          # the champion misses one image the candidate gets right
    c, ch = scored(cand, champ, labels)
    paired = mcnemar(cand, champ)
    assert (paired.candidate_only, paired.champion_only, paired.p_value) == (1, 0, 1.0)
    assert decide(c, GateConfig(), ch, "v1", paired).promote                      # not worse: promoted
    strict = decide(c, GateConfig(require_improvement=True), ch, "v1", paired)
    assert not strict.promote and "not significantly better" in strict.reasons[0] and "p = 1" in strict.reasons[0]


def test_significantly_worse_is_rejected_even_within_the_tolerance() -> None:
    labels = [0] * 500 + [1] * 500
    champ = outcomes(1000, 1000)
    cand = [i % 100 != 0 for i in range(1000)]  # 10 errors, all where the champion is right: 0.99 vs 1.0
    c, ch = scored(cand, champ, labels)
    paired = mcnemar(cand, champ)
    assert paired.champion_only == 10 and paired.p_value < 0.05
    d = decide(c, GateConfig(tolerance=0.05, min_class_accuracy=0.5), ch, "v1", paired)
    assert not d.promote and any("significantly worse" in r and "gets 10 images wrong that the champion gets right"
                                 in r for r in d.reasons), d.reasons
    loose = decide(c, GateConfig(tolerance=0.05, alpha=0.001, min_class_accuracy=0.5), ch, "v1", paired)
    assert loose.promote  # p ~ 0.002 is not below alpha 0.001


def test_better_overall_but_a_class_regresses_is_rejected() -> None:
    labels = [0] * 100 + [1] * 20            # without_mask is the minority class
    champ = [True] * 90 + [False] * 10 + [True] * 20           # 0.90 / 1.00
    cand = [True] * 100 + [True] * 18 + [False] * 2             # 1.00 / 0.90: overall 0.983 > 0.917
    c, ch = scored(cand, champ, labels)
    d = decide(c, GateConfig(min_class_accuracy=0.5), ch, "v1", mcnemar(cand, champ))
    assert c["accuracy"] > ch["accuracy"] and not d.promote
    assert any("class 'without_mask'" in r and "0.9000" in r and "1.0000" in r for r in d.reasons), d.reasons
    assert decide(c, GateConfig(min_class_accuracy=0.5, class_tolerance=0.15), ch, "v1", mcnemar(cand, champ)).promote


def test_decision_json_carries_intervals_counts_and_the_p_value() -> None:
    labels = [0] * 60 + [1] * 51
    cand, champ = outcomes(111, 111), [True] * 109 + [False] * 2
    c, ch = scored(cand, champ, labels)
    d = decide(c, GateConfig(), ch, "v1", mcnemar(cand, champ)).to_dict()
    assert d["paired"] == {"n": 111, "candidate_only": 2, "champion_only": 0, "both": 109, "neither": 0,
                           "p_value": 0.5}
    acc = d["candidate"]["accuracy"]
    assert acc["value"] == 1.0 and acc["n"] == 111 and acc["low"] == pytest.approx(0.9666, abs=1e-4)
    assert d["candidate"]["per_class"]["without_mask"]["n"] == 51
    assert d["champion"]["accuracy"]["value"] == pytest.approx(109 / 111)
    assert d["why"].startswith("Promoted: test accuracy 1.0000 [0.966") and "n=111" in d["why"] and "p = 0.5" in d["why"]


def test_a_champion_that_scores_nan_is_never_replaced_blindly() -> None:
    c, _ = scored(outcomes(111, 111), outcomes(111, 111), [0] * 60 + [1] * 51)
    nan = metrics(math.nan, {"with_mask": None, "without_mask": None}, n=0, loss=math.nan)
    d = decide(c, GateConfig(), nan, "v1", None)
    assert not d.promote and "is not a number" in d.reasons[0]
