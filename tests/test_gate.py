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
    from faceclf.store.objects import resolve_location

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

from faceclf.nightly.stats import ClassComparison, McNemar, binom_cdf, compare_classes, mcnemar, wilson  # noqa: E402

CLASSES = ("with_mask", "without_mask")


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


def predicted(right: list[bool], labels: list[int]) -> list[int]:
    """Binary predictions from per-image outcomes: a wrong image is called the other class."""
    return [y if r else 1 - y for r, y in zip(right, labels)]


def compared(cand_right: list[bool], champ_right: list[bool], labels: list[int],
             permutations: int = 2000) -> tuple[McNemar, list[ClassComparison]]:
    """What the night hands the gate: McNemar overall and each class compared (F1, permutation test)."""
    return mcnemar(cand_right, champ_right), compare_classes(CLASSES, labels, predicted(cand_right, labels),
                                                             predicted(champ_right, labels), permutations)


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


def test_a_degenerate_champion_never_vetoes_a_candidate_better_on_both_classes() -> None:
    """Issue 23's night: the champion calls every image without_mask (perfect recall there, 0.61 overall); the
    candidate trails it on without_mask's recall but beats it on both classes' F1: promoted, whatever the
    champion's recall on its favourite class."""
    labels = [0] * 170 + [1] * 265
    champ = [y == 1 for y in labels]                                      # everything called without_mask
    cand = [i % 20 != 0 for i in range(435)]                              # 0.95 on both classes
    c, ch = scored(cand, champ, labels)
    paired, classes = compared(cand, champ, labels)
    assert ch["per_class_accuracy"]["without_mask"] == 1.0 > c["per_class_accuracy"]["without_mask"]
    low_bars = GateConfig(min_accuracy=0.5, min_class_accuracy=0.0)  # the champion clears them: not stale
    for gate in (GateConfig(), low_bars):
        d = decide(c, gate, ch, "v1", paired, classes)
        assert d.promote, d.reasons
    assert d.champion_stale == [] and decide(c, GateConfig(), ch, "v1", paired, classes).champion_stale
    by_class = {k["cls"]: k for k in d.to_dict()["classes"]}
    assert by_class["with_mask"]["champion_precision"] is None and by_class["with_mask"]["champion_f1"] == 0.0
    assert by_class["without_mask"]["candidate_f1"] > by_class["without_mask"]["champion_f1"]
    old_rule = decide(c, low_bars, ch, "v1", paired)  # recall alone (no per-image classes): the veto of issue 23
    assert not old_rule.promote and "class 'without_mask' accuracy" in old_rule.reasons[0]


def test_a_real_regression_of_one_class_still_blocks() -> None:
    """Fewer correct images of the minority class, significantly: rejected naming the class and its F1, even
    though overall the candidate is within the tolerance."""
    labels = [0] * 500 + [1] * 100
    champ = [True] * 495 + [False] * 5 + [True] * 100
    cand = [True] * 500 + [True] * 85 + [False] * 15            # 15 minority images lost, 5 majority won
    c, ch = scored(cand, champ, labels)
    paired, classes = compared(cand, champ, labels)
    d = decide(c, GateConfig(tolerance=0.05, min_class_accuracy=0.5), ch, "v1", paired, classes)
    assert abs(c["accuracy"] - ch["accuracy"]) < 0.05 and not d.promote
    assert any(r.startswith("class 'without_mask' F1 0.9189 is worse than champion v1's 0.9756 by 0.0567") and
               "recall 0.8500 vs 1.0000; paired permutation p = 0.006" in r for r in d.reasons), d.reasons
    loose = GateConfig(tolerance=0.05, alpha=0.01, min_class_accuracy=0.5, class_tolerance=0.06)
    assert decide(c, loose, ch, "v1", paired, classes).promote  # within a class tolerance of 0.06 (McNemar p 0.04)


def test_a_small_class_drop_that_is_not_significant_passes() -> None:
    """One minority image lost on a small test set: F1 drops by more than the tolerance, but by chance alone."""
    labels = [0] * 40 + [1] * 10
    champ, cand = outcomes(50, 50), [True] * 49 + [False]
    c, ch = scored(cand, champ, labels)
    paired, classes = compared(cand, champ, labels)
    assert classes[1].champion_f1 - classes[1].candidate_f1 > 0.02 and classes[1].p_worse > 0.05
    assert decide(c, GateConfig(min_class_accuracy=0.5, tolerance=0.05), ch, "v1", paired, classes).promote


def test_a_champion_below_the_bars_is_stale_and_cannot_veto() -> None:
    """Re-scored on tonight's test set the champion fails the bars: the candidate only has to clear them and be
    better overall on the same images; the decision and its sentence say the champion is stale."""
    labels = [0] * 100 + [1] * 100
    champ = [True] * 100 + [True] * 60 + [False] * 40              # 0.80: below min_accuracy 0.90
    cand = [True] * 97 + [False] * 3 + [True] * 98 + [False] * 2
    c, ch = scored(cand, champ, labels)
    paired, classes = compared(cand, champ, labels)
    d = decide(c, GateConfig(), ch, "v1", paired, classes)
    assert d.promote and d.champion_stale and "accuracy 0.8 is below the minimum 0.9" in d.champion_stale[0]
    assert "which is stale" in d.why
    # Better but not significantly (a small test split, 2 vs 0 discordant, p = 0.5): replaced all the same.
    few = [0] * 6 + [1] * 6
    c2, ch2 = scored([True] * 12, [True] * 10 + [False] * 2, few)
    d2 = decide(c2, GateConfig(), ch2, "v1", *compared([True] * 12, [True] * 10 + [False] * 2, few))
    assert d2.promote and d2.champion_stale and "p = 0.5" in d2.why
    # Not better on the images they disagree on: rejected, even though the champion is stale.
    labels3 = [0] * 10 + [1] * 10
    champ3 = [True] * 10 + [True] * 8 + [False] * 2               # 0.90 overall, without_mask 0.80 < 0.85: stale
    cand3 = [False] + [True] * 9 + [True] * 9 + [False]           # 0.90 / 0.90: clears every bar
    c3, ch3 = scored(cand3, champ3, labels3)
    d3 = decide(c3, GateConfig(), ch3, "v1", *compared(cand3, champ3, labels3))
    assert d3.champion_stale and not d3.promote
    assert d3.reasons == ["not better than the stale champion v1 on the same images (1 vs 1 discordant)"], d3.reasons


def test_per_class_f1_matches_hand_counts_and_identical_models_are_never_worse() -> None:
    labels = [0, 0, 0, 1, 1]
    (a, b) = compare_classes(CLASSES, labels, [0, 0, 1, 1, 1], [0, 0, 0, 0, 0])
    assert (a.candidate_precision, a.candidate_recall) == (1.0, 2 / 3) and a.candidate_f1 == pytest.approx(0.8)
    assert (b.candidate_precision, b.candidate_recall, b.candidate_f1) == (pytest.approx(2 / 3), 1.0, 0.8)
    assert b.champion_precision is None and b.champion_recall == 0.0 and b.champion_f1 == 0.0
    assert all(k.p_worse == 1.0 for k in compare_classes(CLASSES, labels, [0, 1, 0, 1, 0], [0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="differ in length"):
        compare_classes(CLASSES, labels, [0], [0])


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


def test_stuck_counts_rejections_back_to_the_last_promotion() -> None:
    from faceclf.nightly.stuck import rejected_in_a_row, stuck_reasons

    def row(v: str, promoted: bool, stale: list | None = None) -> dict:
        return {"version": v, "promoted": promoted, "gate_passed": promoted, "why": "w", "champion_stale": stale or []}

    rows = [row("a", False), row("b", True), row("c", False), row("d", False, ["its accuracy 0.6 is below 0.9"])]
    assert [r["version"] for r in rejected_in_a_row(rows)] == ["c", "d"]
    assert stuck_reasons(rows, "b", 3) == ["champion b is below the bars on the test split of night d: its accuracy "
                                           "0.6 is below 0.9"]
    assert len(stuck_reasons(rows, "b", 2)) == 2 and stuck_reasons(rows[:2], "b", 1) == []
    assert stuck_reasons([], None, 1) == [] and stuck_reasons(rows + [row("e", True)], "e", 1) == []


# --- power (issue 25): the smallest accuracy difference a night's test set detects ---

import numpy as np  # noqa: E402

from faceclf.nightly.report import render_report  # noqa: E402
from faceclf.nightly.stats import (  # noqa: E402
    POWER_TOL,
    Z95,
    connor_difference,
    critical_counts,
    discordant_share,
    mcnemar_power,
    min_detectable_difference,
    wilson_half_width,
)


def test_min_detectable_difference_matches_known_values() -> None:
    """Six images, no churn: only all six discordant and one way is significant (2/64 < 0.05), so the power at a
    difference d is d^6 and 80% needs d = 0.8^(1/6); five images can never be significant (2/32 > 0.05). Then
    the values the report quotes (n = 111 and 1000), pinned."""
    assert min_detectable_difference(6, 0.0, 0.05) == pytest.approx(0.8 ** (1 / 6), abs=POWER_TOL)
    assert min_detectable_difference(5, 0.0, 0.05) is None and min_detectable_difference(0, 0.1, 0.05) is None
    pinned = {(111, 0.02): 0.0879, (111, 0.05): 0.1071, (111, 0.10): 0.1320, (1000, 0.05): 0.0249,
              (10_000, 0.05): 0.0068}
    for (n, share), value in pinned.items():
        assert min_detectable_difference(n, share, 0.05) == pytest.approx(value, abs=1e-4), (n, share)


def brute_power(n: int, discordant: float, difference: float, alpha: float) -> float:
    """mcnemar_power by summing the multinomial over every (b, c) with the gate's own p-value (binom_cdf)."""
    p10, p01 = discordant / 2 + difference, discordant / 2
    total = 0.0
    for b in range(n + 1):
        for c in range(min(b, n - b + 1)):               # c < b: the better model ahead
            if min(1.0, 2 * binom_cdf(c, b + c)) < alpha:
                ways = math.factorial(n) // (math.factorial(b) * math.factorial(c) * math.factorial(n - b - c))
                total += ways * p10 ** b * p01 ** c * (1 - p10 - p01) ** (n - b - c)
    return total


@pytest.mark.parametrize("n, discordant, difference, alpha", [
    (30, 0.1, 0.2, 0.05), (50, 0.05, 0.1, 0.05), (40, 0.0, 0.15, 0.05), (60, 0.3, 0.2, 0.01), (25, 0.5, 0.5, 0.2),
    (12, 0.0, 1.0, 0.05), (7, 0.4, 0.0, 0.125),
])
def test_mcnemar_power_equals_the_sum_over_every_outcome(n: int, discordant: float, difference: float,
                                                         alpha: float) -> None:
    expected = brute_power(n, discordant, difference, alpha)
    assert mcnemar_power(n, discordant, difference, alpha) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("alpha", [0.05, 0.01, 0.1, 0.0625, 0.125])  # 0.0625 and 0.125: ties (2/32 at d=5, 16/128 at 7)
def test_critical_counts_are_the_gates_test(alpha: float) -> None:
    """For every d to beyond the integer walk, the critical count c is significant and c + 1 is not, by the very
    floats ``mcnemar`` compares; far beyond (the floating-point walk) the same by an independent log-space sum."""
    table = critical_counts(alpha, 32_768)
    for d in range(1, 460):
        k = int(table[d])
        assert k < 0 or min(1.0, 2 * binom_cdf(k, d)) < alpha, (d, k)
        assert min(1.0, 2 * binom_cdf(k + 1, d)) >= alpha, (d, k)

    def cdf(k: int, d: int) -> float:
        return math.fsum(math.exp(math.lgamma(d + 1) - math.lgamma(i + 1) - math.lgamma(d - i + 1) - d * math.log(2))
                         for i in range(k + 1))

    for d in (1_000, 5_001, 20_000, 32_768):
        k = int(table[d])
        assert 2 * cdf(k, d) < alpha <= 2 * cdf(k + 1, d), (d, k)


def test_the_exact_answer_is_close_to_connors_normal_approximation() -> None:
    """Connor (1987) is within 6% wherever there is churn (>= 1% discordant) and within 1.5% at n = 10^4 with
    5% or more; with no churn at all the count of discordant images is Poisson-like and the normal
    approximation is off by ~12% however many images there are: the exact computation is the one to use."""
    for n in (200, 500, 2000):
        for share in (0.01, 0.05, 0.2, 0.5):
            for alpha in (0.01, 0.05):
                exact, normal = min_detectable_difference(n, share, alpha), connor_difference(n, share, alpha)
                assert abs(exact - normal) / normal < 0.06, (n, share, alpha)
    for share in (0.05, 0.2):
        assert abs(min_detectable_difference(10_000, share, 0.05) / connor_difference(10_000, share, 0.05) - 1) < 0.015
    assert abs(min_detectable_difference(2000, 0.0, 0.01) / connor_difference(2000, 0.0, 0.01) - 1) > 0.1


def test_simulated_nights_detect_the_returned_difference() -> None:
    """20,000 simulated nights of 111 test images, judged by the gate's own McNemar test: at the returned difference
    at least 80% come out significant (less 3 standard errors); at 80% of it, clearly fewer."""
    n, share, alpha = 111, 0.04, 0.05
    found = min_detectable_difference(n, share, alpha)
    rng = np.random.default_rng(0)

    def detected(difference: float, nights: int = 20_000) -> float:
        counts = rng.multinomial(n, [share / 2 + difference, share / 2, 1 - share - difference], size=nights)
        p = {}
        hits = 0
        for b, c in counts[:, :2].tolist():
            if (b, c) not in p:
                p[(b, c)] = mcnemar([True] * b + [False] * c, [False] * b + [True] * c).p_value
            hits += b > c and p[(b, c)] < alpha
        return hits / nights

    se = math.sqrt(0.8 * 0.2 / 20_000)
    assert detected(found) >= 0.8 - 3 * se
    assert detected(0.8 * found) < 0.8 - 10 * se


def test_the_exact_test_is_not_monotone_in_n_at_the_edge() -> None:
    """Why the property tests double n rather than add one image: an exact test's power saws up and down with n.
    At half the images discordant by chance, 30 images detect a difference just under the 0.5 possible, and 31
    detect none (odd d loses a rejectable split)."""
    assert min_detectable_difference(30, 0.5, 0.05) == pytest.approx(0.4991, abs=1e-4)
    assert min_detectable_difference(31, 0.5, 0.05) is None
    assert min_detectable_difference(60, 0.5, 0.05) < 0.4991


def test_power_functions_refuse_arguments_out_of_range() -> None:
    for bad, match in [((-1, 0.1, 0.05), "n must be"), ((10, 1.5, 0.05), "discordant must be"),
                       ((10, 0.1, 0.0), "alpha must be"), ((10, 0.1, 0.05, 1.0), "power must be")]:
        with pytest.raises(ValueError, match=match):
            min_detectable_difference(*bad)
    with pytest.raises(ValueError, match="difference must be in"):
        mcnemar_power(10, 0.5, 0.6, 0.05)


def test_a_night_on_which_the_models_agree_everywhere_gets_a_finite_answer() -> None:
    """0 discordant in 111 is planned as the Wilson 95% upper bound z^2 / (n + z^2) = 3.3%, never as 0 churn."""
    assert discordant_share(0, 111) == pytest.approx(Z95 ** 2 / (111 + Z95 ** 2)) == pytest.approx(0.0335, abs=1e-4)
    assert discordant_share(9, 111) == 9 / 111
    labels = [0] * 60 + [1] * 51
    same = outcomes(111, 111)
    c, ch = scored(same, same, labels)
    d = decide(c, GateConfig(), ch, "v1", mcnemar(same, same))
    assert d.detectable["discordant_images"] == 0 and d.detectable["discordant"] == discordant_share(0, 111)
    assert d.detectable["difference"] == min_detectable_difference(111, discordant_share(0, 111), 0.05)
    assert 0.09 < d.detectable["difference"] < 0.11


def report_of(decision: dict) -> str:
    test = {"loss": 0.1, "accuracy": 1.0, "n": 111, "confusion_matrix": [[60, 0], [0, 51]]}
    return render_report("v2", CLASSES, {"test": test}, decision, {"test images": 111})


def test_the_decision_and_the_report_say_what_the_test_set_can_detect() -> None:
    labels = [0] * 60 + [1] * 51
    cand, champ = outcomes(111, 111), [True] * 107 + [False] * 4       # 4 discordant of 111: 3.6%
    c, ch = scored(cand, champ, labels)
    d = decide(c, GateConfig(), ch, "v1", mcnemar(cand, champ)).to_dict()
    det = d["detectable"]
    assert (det["method"], det["n"], det["discordant_images"], det["alpha"], det["power"]) == ("exact McNemar", 111, 4,
                                                                                               0.05, 0.8)
    assert det["discordant"] == det["discordant_observed"] == 4 / 111
    assert det["difference"] == pytest.approx(min_detectable_difference(111, 4 / 111, 0.05))
    report = report_of(d)
    line = (f"This test set (n=111, 3.6% discordant) detects a difference of {100 * det['difference']:.1f} points at "
            "alpha 0.05 with 80% power (exact McNemar test); a smaller real difference reads as 'not significant'.")
    assert line in report and report.index("exact McNemar p =") < report.index(line)

    first = decide(c, GateConfig(alpha=0.01)).to_dict()                  # no champion: the Wilson half-width
    det = first["detectable"]
    assert (det["method"], det["power"], det["alpha"]) == ("Wilson half-width", None, 0.01)
    assert det["difference"] == pytest.approx(wilson_half_width(111, 111, 0.01)) and 0.02 < det["difference"] < 0.04
    assert "No paired comparison: on these n=111 test images the candidate's accuracy is known to within ±" in \
        report_of(first)
    c5, ch5 = scored([True] * 5, [False] * 5, [0, 0, 1, 1, 1])
    tiny = decide(c5, GateConfig(), ch5, "v1", mcnemar([True] * 5, [False] * 5)).to_dict()
    assert tiny["detectable"]["difference"] is None and "cannot detect any accuracy difference" in report_of(tiny)
    diverged = {**metrics(None, {"with_mask": None, "without_mask": None}, loss=None), "diverged": "x"}
    assert decide(diverged, GateConfig()).detectable is None
