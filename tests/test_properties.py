"""Property-based tests (hypothesis) of the small maths the gate and the split stand on (issue 22): the Wilson
interval, the exact McNemar test, the content-hash split, evenly_spread, and the promotion gate's decision."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from faceclf.config import GateConfig
from faceclf.dataset.faceset import evenly_spread
from faceclf.dataset.layout import SPLITS, split_of
from faceclf.nightly.gate import decide, gate_failures
from faceclf.nightly.stats import binom_cdf, compare_classes, mcnemar, wilson
from test_gate import CLASSES, compared, scored

FEW = settings(deadline=None, max_examples=60)
MANY = settings(deadline=None, max_examples=150)


# --- Wilson interval ---

@st.composite
def counts(draw: st.DrawFn, max_n: int = 3000) -> tuple[int, int]:
    """(k, n) with 0 <= k <= n, 1 <= n <= max_n."""
    n = draw(st.integers(1, max_n))
    return draw(st.integers(0, n)), n


def width(k: int, n: int) -> float:
    low, high = wilson(k, n)
    return high - low


@MANY
@given(counts())
def test_wilson_contains_p_inside_0_1_and_is_exact_at_the_edges(kn: tuple[int, int]) -> None:
    """0 <= low <= k/n <= high <= 1, low is exactly 0 at k = 0 and high exactly 1 at k = n."""
    k, n = kn
    low, high = wilson(k, n)
    assert 0.0 <= low <= k / n <= high <= 1.0
    assert (low == 0.0) if k == 0 else (low > 0.0)
    assert (high == 1.0) if k == n else (high < 1.0)


def test_wilson_of_n_over_n_is_exactly_1_and_of_nothing_is_none() -> None:
    """Regression: wilson(n, n)'s high was 1 - 1e-16 for 119 of n = 1..399 (a negative error bar); n = 0 -> None."""
    assert [n for n in range(1, 400) if wilson(n, n)[1] != 1.0] == []
    assert [n for n in range(1, 400) if wilson(0, n)[0] != 0.0] == []
    assert wilson(0, 0) is None


@MANY
@given(counts())
def test_wilson_is_symmetric_in_successes_and_failures(kn: tuple[int, int]) -> None:
    """wilson(n - k, n) == (1 - high, 1 - low) of wilson(k, n)."""
    k, n = kn
    low, high = wilson(k, n)
    assert wilson(n - k, n) == (pytest.approx(1 - high, abs=1e-12), pytest.approx(1 - low, abs=1e-12))


@MANY
@given(counts(max_n=1000))
def test_wilson_narrows_as_n_grows_at_fixed_p(kn: tuple[int, int]) -> None:
    """Four times the images at the same proportion never gives a wider interval."""
    k, n = kn
    assert width(k, n) >= width(4 * k, 4 * n)


@MANY
@given(counts())
def test_wilson_bounds_rise_with_successes(kn: tuple[int, int]) -> None:
    """At fixed n, one more success never lowers either bound."""
    k, n = kn
    assume(k < n)
    (low, high), (low1, high1) = wilson(k, n), wilson(k + 1, n)
    assert low <= low1 and high <= high1


# --- McNemar and the binomial ---

pairs = st.lists(st.tuples(st.booleans(), st.booleans()), max_size=300)


def p_of(b: int, c: int) -> float:
    """McNemar p-value of b candidate-only and c champion-only images (no concordant ones)."""
    return mcnemar([True] * b + [False] * c, [False] * b + [True] * c).p_value


@MANY
@given(pairs)
def test_mcnemar_is_symmetric_and_its_counts_add_up(outcomes: list[tuple[bool, bool]]) -> None:
    """Swapping the models swaps the discordant counts and keeps the p-value; the four counts sum to n."""
    cand, champ = [a for a, _ in outcomes], [b for _, b in outcomes]
    m, swapped = mcnemar(cand, champ), mcnemar(champ, cand)
    assert (swapped.candidate_only, swapped.champion_only) == (m.champion_only, m.candidate_only)
    assert (swapped.both, swapped.neither, swapped.p_value) == (m.both, m.neither, m.p_value)
    assert m.n == len(outcomes) and min(m.candidate_only, m.champion_only, m.both, m.neither) >= 0
    assert 0.0 <= m.p_value <= 1.0
    assert m.both == sum(a and b for a, b in outcomes) and m.candidate_only == sum(a and not b for a, b in outcomes)


@MANY
@given(st.lists(st.booleans(), max_size=300))
def test_identical_outcomes_are_never_significant(right: list[bool]) -> None:
    """A model compared with itself has no discordant images and p = 1."""
    m = mcnemar(right, list(right))
    assert m.discordant == 0 and m.p_value == 1.0


@MANY
@given(st.integers(0, 150), st.integers(0, 150), st.integers(0, 100), st.integers(0, 100), st.randoms())
def test_mcnemar_p_depends_only_on_the_discordant_counts(b: int, c: int, both: int, neither: int,
                                                         rnd: random.Random) -> None:
    """Concordant images and the order of the images do not move the p-value."""
    rows = [(True, False)] * b + [(False, True)] * c + [(True, True)] * both + [(False, False)] * neither
    rnd.shuffle(rows)
    m = mcnemar([a for a, _ in rows], [x for _, x in rows])
    assert (m.candidate_only, m.champion_only, m.both, m.neither) == (b, c, both, neither)
    assert m.p_value == p_of(b, c)


@MANY
@given(st.integers(1, 200), st.data())
def test_mcnemar_p_falls_as_the_split_of_discordant_images_gets_more_lopsided(m: int, data: st.DataObject) -> None:
    """With b + c fixed, moving one discordant image from the smaller side to the larger never raises p."""
    b = data.draw(st.integers(m // 2, m - 1))  # b >= c, or (m odd) one short of it: then the two are mirrors
    assert p_of(b + 1, m - b - 1) <= p_of(b, m - b)


def test_mcnemar_rejects_outcomes_of_different_lengths() -> None:
    """Unpaired outcome lists raise a ValueError naming both lengths."""
    with pytest.raises(ValueError, match="3 vs 2"):
        mcnemar([True, False, True], [True, False])


@MANY
@given(st.integers(0, 80), st.data())
def test_binom_cdf_equals_the_direct_sum_of_the_pmf(n: int, data: st.DataObject) -> None:
    """binom_cdf(k, n) is the correctly rounded sum of C(n, i) / 2**n over i <= k (0 below 0, 1 from n on)."""
    k = data.draw(st.integers(-3, n + 3))
    exact = sum((Fraction(math.comb(n, i), 2 ** n) for i in range(0, min(k, n) + 1)), Fraction(0))
    assert binom_cdf(k, n) == float(exact)


# --- content-hash split ---

@st.composite
def fractions(draw: st.DrawFn) -> tuple[float, float, float]:
    """(train, val, test), each >= 0, summing to 1 up to float rounding: weights or drawn floats."""
    if draw(st.booleans()):
        w = draw(st.tuples(*[st.integers(0, 20)] * 3).filter(lambda t: sum(t) > 0))
        return w[0] / sum(w), w[1] / sum(w), w[2] / sum(w)
    train = draw(st.floats(0.0, 1.0))
    val = draw(st.floats(0.0, 1.0 - train))
    return train, val, 1.0 - train - val


def prefix_hash(prefix: int) -> str:
    """A sha256 hex digest whose first 64 bits are ``prefix``."""
    return f"{prefix:016x}" + "0" * 48


hex_digests = st.text("0123456789abcdef", min_size=64, max_size=64)


@MANY
@given(hex_digests, fractions(), st.text("0123456789abcdef", min_size=48, max_size=48))
def test_split_of_is_deterministic_and_reads_only_the_first_64_bits(sha: str, f: tuple[float, float, float],
                                                                    tail: str) -> None:
    """The same hash always gets the same split, one of train/val/test, whatever its last 192 bits."""
    split = split_of(sha, f)
    assert split in SPLITS and split == split_of(sha, f) == split_of(sha[:16] + tail, f)


@FEW
@given(fractions(), st.integers(1, 3000))
def test_split_of_follows_the_fractions_on_evenly_spread_hashes(f: tuple[float, float, float], n: int) -> None:
    """Over n evenly spaced 64-bit prefixes each split holds fraction * n images, within 1.

    Split s gets the prefixes in [cut_before, cut_after) * 2**64; with prefixes i * 2**64 // n that is
    ceil(cut_after * n) - ceil(cut_before * n) of them, less than 1 away from share * n; 1e-9 covers the
    float rounding of the cumulative cuts (about n * 2**-52)."""
    got = [split_of(prefix_hash(i * 2 ** 64 // n), f) for i in range(n)]
    for split, share in zip(SPLITS, f):
        assert abs(got.count(split) - share * n) <= 1 + 1e-9, (split, share, got.count(split))


@MANY
@given(st.integers(0, 2), st.integers(1, 20), st.integers(1, 20), st.floats(0.0, 1e-6),
       st.lists(st.integers(0, 2 ** 64 - 1), min_size=1, max_size=50))
def test_a_split_with_fraction_0_gets_no_image(zero: int, a: int, b: int, short: float, prefixes: list[int]) -> None:
    """Not even a prefix next to 2**64, nor one above a sum a hair (<= 1e-6, which config allows) below 1."""
    shares = [a / (a + b) * (1 - short), b / (a + b) * (1 - short)]
    shares.insert(zero, 0.0)
    f = (shares[0], shares[1], shares[2])
    for prefix in [*prefixes, 0, 2 ** 64 - 1, 2 ** 64 - 2 ** 10]:
        assert split_of(prefix_hash(prefix), f) != SPLITS[zero], (prefix, f)


# --- evenly_spread ---

@MANY
@given(st.integers(0, 100_000), st.integers(0, 3000))
def test_evenly_spread_picks_min_n_k_sorted_distinct_positions_first_to_last(n: int, k: int) -> None:
    """min(n, k) strictly increasing int64 positions in [0, n), from 0 to n - 1 when k >= 2, each nearest its ideal."""
    pos = evenly_spread(n, k)
    assert pos.dtype == np.int64 and len(pos) == min(n, k)
    assert (np.diff(pos) > 0).all() and (len(pos) == 0 or (pos[0] >= 0 and pos[-1] < n))
    assert np.array_equal(pos, evenly_spread(n, k))
    if n >= 1 and k >= 2:
        assert pos[0] == 0 and pos[-1] == n - 1
    if n >= 1 and k == 1:
        assert pos.tolist() == [0]
    if n > k >= 2:  # evenly: each position is the nearest integer to its share of the way from 0 to n - 1
        ideal = np.arange(k) * (n - 1) / (k - 1)
        assert np.abs(pos - ideal).max() <= 0.5 + 1e-9 and np.ptp(np.diff(pos)) <= 1


# --- the promotion gate ---

gate_configs = st.builds(GateConfig, min_accuracy=st.floats(0.0, 1.0), min_class_accuracy=st.floats(0.0, 1.0),
                         tolerance=st.floats(0.0, 1.0), alpha=st.floats(0.0, 1.0, exclude_min=True, exclude_max=True),
                         class_tolerance=st.floats(0.0, 1.0), require_improvement=st.booleans())
PERMUTATIONS = 300  # per-class p-values in the gate properties: enough to resolve 1/301, and quick
# (candidate right, champion right, true class) per test image
images = st.lists(st.tuples(st.booleans(), st.booleans(), st.integers(0, 1)), min_size=1, max_size=200)


def worse(reasons: list[str]) -> list[str]:
    """The reasons that say the candidate is worse than the champion."""
    return [r for r in reasons if "worse" in r]


@MANY
@given(images, gate_configs)
def test_a_candidate_identical_to_the_champion_is_never_worse(rows: list[tuple[bool, bool, int]],
                                                              cfg: GateConfig) -> None:
    """Same per-image outcomes as the champion: no 'worse' reason, whatever the tolerances (>= 0)."""
    right, labels = [r for r, _, _ in rows], [y for _, _, y in rows]
    cand, champ = scored(right, right, labels)
    d = decide(cand, cfg, champ, "v1", *compared(right, right, labels, PERMUTATIONS))
    assert worse(d.reasons) == [], d.reasons


@MANY
@given(images, gate_configs)
def test_require_improvement_never_promotes_a_copy_of_the_champion(rows: list[tuple[bool, bool, int]],
                                                                   cfg: GateConfig) -> None:
    """With require_improvement, a candidate identical to the champion is rejected as not better."""
    right, labels = [r for r, _, _ in rows], [y for _, _, y in rows]
    cand, champ = scored(right, right, labels)
    d = decide(cand, replace(cfg, require_improvement=True), champ, "v1", *compared(right, right, labels, PERMUTATIONS))
    assert not d.promote and any("not significantly better" in r or "not better than the stale champion" in r
                                 or "below the minimum" in r for r in d.reasons), d.reasons


@MANY
@given(images, gate_configs, st.data())
def test_a_candidate_right_wherever_the_champion_is_right_is_never_worse(rows: list[tuple[bool, bool, int]],
                                                                         cfg: GateConfig, data: st.DataObject) -> None:
    """Dominating the champion image by image: no 'worse' reason; promoted when it clears the absolute bars
    (and, where the champion itself fails them, is better on the images they disagree on: a stale champion)."""
    champ_right, labels = [c for _, c, _ in rows], [y for _, _, y in rows]
    cand_right = [a or c for a, c, _ in rows]
    cand, champ = scored(cand_right, champ_right, labels)
    assume(len(set(labels)) == 2)  # a one-class test set is rejected for that, not for being worse
    per_class = min(cand["per_class_accuracy"].values())
    bars = replace(cfg, min_accuracy=data.draw(st.floats(0.0, cand["accuracy"])),
                   min_class_accuracy=data.draw(st.floats(0.0, per_class)), require_improvement=False)
    assert gate_failures(cand, bars.min_accuracy, bars.min_class_accuracy) == []
    paired, classes = compared(cand_right, champ_right, labels, PERMUTATIONS)
    assert worse(decide(cand, cfg, champ, "v1", paired, classes).reasons) == []
    d = decide(cand, bars, champ, "v1", paired, classes)
    stale = gate_failures(champ, bars.min_accuracy, bars.min_class_accuracy) != []
    better = paired.candidate_only > paired.champion_only
    assert d.promote == (not stale or better) and bool(d.champion_stale) == stale, d.reasons


odd_numbers = st.sampled_from([math.nan, math.inf, None])


@st.composite
def candidate_and_champion(draw: st.DrawFn) -> tuple[dict, dict | None, object]:
    """Scored metrics from drawn outcomes, with numbers sometimes NaN/None, the champion and pairing optional."""
    rows = draw(images)
    cand_right, champ_right, labels = ([r[i] for r in rows] for i in range(3))
    cand, champ = scored(cand_right, champ_right, labels)
    for key in ("accuracy", "loss"):
        if draw(st.booleans()):
            cand[key] = draw(odd_numbers)
        if draw(st.booleans()):
            champ[key] = draw(odd_numbers)
    if draw(st.booleans()):
        cand["per_class_accuracy"]["with_mask"] = draw(odd_numbers)
    if draw(st.integers(0, 9)) == 0:
        cand["diverged"] = "no finite val loss"
    paired = compared(cand_right, champ_right, labels, PERMUTATIONS) if draw(st.booleans()) else (None, None)
    return cand, (champ if draw(st.booleans()) else None), paired


@MANY
@given(candidate_and_champion(), gate_configs)
def test_promote_exactly_when_there_is_no_reason(case: tuple[dict, dict | None, object], cfg: GateConfig) -> None:
    """decide's promote is True iff its reasons are empty, and its summary and why say the same."""
    cand, champ, paired = case
    d = decide(cand, cfg, champ, "v1" if champ else None, *paired)  # type: ignore[arg-type]
    assert d.promote == (d.reasons == [])
    assert d.summary().startswith("promoted" if d.promote else "rejected")
    assert d.why.startswith("Promoted" if d.promote else "Rejected")


@MANY
@given(candidate_and_champion(), gate_configs)
def test_nan_accuracy_never_promotes(case: tuple[dict, dict | None, object], cfg: GateConfig) -> None:
    """A candidate whose accuracy is NaN is rejected, even with every bar at 0 and the tolerances at their widest."""
    cand, champ, paired = case
    cand["accuracy"] = math.nan
    for gate in (cfg, GateConfig(min_accuracy=0.0, min_class_accuracy=0.0, tolerance=1.0, class_tolerance=1.0)):
        d = decide(cand, gate, champ, "v1" if champ else None, *paired)  # type: ignore[arg-type]
        assert not d.promote and d.candidate_accuracy is None


# --- per-class F1, compared by a paired permutation test (issue 23) ---

predictions = st.lists(st.tuples(st.integers(0, 1), st.integers(0, 1), st.integers(0, 1)), min_size=1, max_size=150)


@FEW
@given(predictions)
def test_class_comparison_of_a_model_with_itself_is_never_worse(rows: list[tuple[int, int, int]]) -> None:
    """Identical predictions: equal F1 on every class and p_worse == 1."""
    y, a = [r[0] for r in rows], [r[1] for r in rows]
    for c in compare_classes(CLASSES, y, a, a, PERMUTATIONS):
        assert c.candidate_f1 == c.champion_f1 and c.p_worse == 1.0


@FEW
@given(predictions)
def test_class_comparison_swaps_with_the_models_and_bounds_its_numbers(rows: list[tuple[int, int, int]]) -> None:
    """Swapping candidate and champion swaps every precision, recall and F1; all lie in [0, 1] (or are undefined);
    p_worse lies in (0, 1]; F1 is the harmonic mean of precision and recall where both exist."""
    y, a, b = ([r[i] for r in rows] for i in range(3))
    forward, backward = compare_classes(CLASSES, y, a, b, PERMUTATIONS), compare_classes(CLASSES, y, b, a, PERMUTATIONS)
    for f, r in zip(forward, backward):
        assert (f.candidate_precision, f.candidate_recall, f.candidate_f1) == (r.champion_precision, r.champion_recall,
                                                                              r.champion_f1)
        assert 0 < f.p_worse <= 1
        for prec, rec, f1 in ((f.candidate_precision, f.candidate_recall, f.candidate_f1),
                              (f.champion_precision, f.champion_recall, f.champion_f1)):
            assert all(v is None or 0 <= v <= 1 for v in (prec, rec, f1))
            if prec and rec:
                assert f1 == pytest.approx(2 * prec * rec / (prec + rec))


@FEW
@given(st.integers(20, 200), st.integers(10, 200), st.integers(0, 1), st.data())
def test_a_model_calling_everything_one_class_never_vetoes_a_better_one(n0: int, n1: int, favourite: int,
                                                                         data: st.DataObject) -> None:
    """A champion that predicts one class for all images (perfect recall there) never blocks a candidate that
    beats its overall accuracy by a margin on both classes (>= 0.9 recall on each): no per-class reason."""
    labels = [0] * n0 + [1] * n1
    champ_right = [y == favourite for y in labels]
    misses = data.draw(st.sets(st.integers(0, n0 + n1 - 1), max_size=min(n0, n1) // 10))
    cand_right = [i not in misses for i in range(n0 + n1)]
    cand, champ = scored(cand_right, champ_right, labels)
    assume(min(cand["per_class_accuracy"].values()) >= 0.9)
    d = decide(cand, GateConfig(min_accuracy=0.0, min_class_accuracy=0.0), champ, "v1",
               *compared(cand_right, champ_right, labels, PERMUTATIONS))
    assert not [r for r in d.reasons if r.startswith("class ")], d.reasons


# --- issue 24: the one legal form of an ingested image's path (manifest rows from the bucket) ---

CLASS_NAMES = st.text(st.characters(categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=70)
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)
FRACTIONS = st.sampled_from([(0.8, 0.1, 0.1), (1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.5, 0.0)])
DEST = "/srv/faceclf/face"


def _inside_dest(rel: str) -> bool:
    """local_path(DEST, rel) is a file three levels below DEST (it raises ValueError for any other rel)."""
    import os
    from pathlib import Path

    from faceclf.dataset.tree import local_path

    path = local_path(Path(DEST), rel)
    return os.path.normpath(path) == str(path) and len(path.relative_to(DEST).parts) == 3


@MANY
@given(CLASS_NAMES, HEX64, st.sampled_from(["JPEG", "PNG", "WEBP"]), FRACTIONS)
def test_every_path_ingest_writes_has_the_legal_form(cls: str, sha: str, fmt: str,
                                                     fractions: tuple[float, float, float]) -> None:
    """For a legal class, image_path's path parses back to its parts, stays three levels inside dest, and the
    manifest row ingest writes for it is legal; an illegal class is refused in every row and path."""
    from faceclf.config import IngestConfig
    from faceclf.dataset.checks import Checked
    from faceclf.dataset.layout import class_problem, parse_image_path
    from faceclf.dataset.manifest import manifest_row, row_problem
    from faceclf.dataset.tree import image_path
    from faceclf.store.objects import ObjectInfo

    rel = image_path(sha, cls, fmt, split_of(sha, IngestConfig(split_fractions=fractions).split_fractions))
    row = manifest_row(ObjectInfo(f"incoming/{cls}/x", "e", 10), cls, Checked(b"", sha, fmt, 40, 40), rel, "now")
    if class_problem(cls) is None:
        assert parse_image_path(rel) == (split_of(sha, fractions), cls, sha, rel.rsplit(".", 1)[1])
        assert row_problem(row) is None and _inside_dest(rel)
        assert "/" not in cls and "\\" not in cls and cls not in (".", "..") and len(cls.encode()) <= 255
    else:
        assert row_problem(row)
        with pytest.raises(ValueError):
            parse_image_path(rel)


@MANY
@given(HEX64, st.sampled_from(SPLITS), st.sampled_from(["with_mask", "a b", "train"]), st.text(max_size=12),
       st.sampled_from(["/", "../", "/..", "\\..\\"]), st.integers(0, 3))
def test_a_slash_or_dotdot_in_the_class_is_always_refused(sha: str, split: str, cls: str, junk: str, sep: str,
                                                          where: int) -> None:
    """A class holding '/' (or a '..' part, or a backslash) never parses, whatever surrounds it."""
    from faceclf.dataset.layout import parse_image_path

    bad = [cls + sep + junk, junk + sep + cls, sep + cls, cls + sep][where]
    with pytest.raises(ValueError):
        parse_image_path(f"{split}/{bad}/{sha}.jpg")
    with pytest.raises(ValueError):
        _inside_dest(f"{split}/{bad}/{sha}.jpg")


@MANY
@given(st.one_of(st.text(max_size=90),
                 st.tuples(st.sampled_from([*SPLITS, "..", ".", ""]), st.text(max_size=8) | st.just(".."),
                           HEX64 | st.text("0123456789abcdefABCDEF./", max_size=66),
                           st.sampled_from(["jpg", "png", "webp", "gif", "", "jpg/..", "png\n"]))
                 .map(lambda t: f"{t[0]}/{t[1]}/{t[2]}.{t[3]}")))
def test_any_accepted_path_stays_three_levels_inside_dest(rel: str) -> None:
    """Whatever text a manifest row holds as its path: parse_image_path accepts it only in the legal form, and
    then it names a file exactly <split>/<class>/<file> below dest (no '..', no absolute, no extra level)."""
    from faceclf.dataset.layout import FILE_EXTENSIONS, legal_class, parse_image_path

    try:
        split, cls, sha, ext = parse_image_path(rel)
    except ValueError as e:
        assert repr(rel) in str(e)
        return
    assert rel == f"{split}/{cls}/{sha}.{ext}" and split in SPLITS and ext in FILE_EXTENSIONS.values()
    assert legal_class(cls) == cls and int(sha, 16) >= 0 and sha == sha.lower() and len(sha) == 64
    assert _inside_dest(rel)


# --- power of the exact McNemar test: the smallest difference a test set detects (issue 25) ---

from faceclf.nightly.stats import (  # noqa: E402
    POWER_TOL,
    critical_counts,
    discordant_share,
    mcnemar_power,
    min_detectable_difference,
)

POWER_SIZES = st.integers(1, 400)
SHARES = st.floats(0.0, 0.9)
ALPHAS = st.floats(1e-3, 0.5)
POWERS = st.floats(0.05, 0.99)


def at_most(a: float | None, b: float | None) -> bool:
    """a <= b among detectable differences, None (nothing detectable) being the largest; up to POWER_TOL."""
    return b is None or (a is not None and a <= b + POWER_TOL)


@FEW
@given(POWER_SIZES, st.data(), SHARES, ALPHAS, POWERS)
def test_min_detectable_difference_shrinks_with_twice_the_images(n: int, data: st.DataObject, share: float,
                                                                 alpha: float, power: float) -> None:
    """Two to four times the images never detect less (one more image may: the exact test's sawtooth, see
    test_gate.test_the_exact_test_is_not_monotone_in_n_at_the_edge)."""
    more = data.draw(st.integers(2 * n, 4 * n))
    assert at_most(min_detectable_difference(more, share, alpha, power),
                   min_detectable_difference(n, share, alpha, power))


@FEW
@given(POWER_SIZES, SHARES, ALPHAS, POWERS, POWERS)
def test_min_detectable_difference_grows_with_the_power_asked(n: int, share: float, alpha: float, p1: float,
                                                              p2: float) -> None:
    low, high = sorted((p1, p2))
    assert at_most(min_detectable_difference(n, share, alpha, low), min_detectable_difference(n, share, alpha, high))


@FEW
@given(POWER_SIZES, SHARES, ALPHAS, ALPHAS, POWERS)
def test_min_detectable_difference_shrinks_as_alpha_grows(n: int, share: float, a1: float, a2: float,
                                                          power: float) -> None:
    strict, loose = sorted((a1, a2))
    assert at_most(min_detectable_difference(n, share, loose, power),
                   min_detectable_difference(n, share, strict, power))


@MANY
@given(POWER_SIZES, SHARES, ALPHAS, POWERS)
def test_min_detectable_difference_is_the_smallest_with_the_power_asked(n: int, share: float, alpha: float,
                                                                        power: float) -> None:
    """In (0, 1 - share] (1 - share: the better model right on every image the churn leaves), with at least the
    power asked (exactly computed), and POWER_TOL less has less; None exactly when even the largest possible
    difference falls short."""
    found = min_detectable_difference(n, share, alpha, power)
    if found is None:
        assert mcnemar_power(n, share, 1.0 - share, alpha) < power
        return
    assert 0.0 < found <= 1.0 - share
    assert mcnemar_power(n, share, found, alpha) >= power
    assert found <= POWER_TOL or mcnemar_power(n, share, found - POWER_TOL, alpha) < power


@MANY
@given(st.integers(1, 600), st.floats(1e-6, 0.999))
def test_critical_counts_reject_exactly_where_the_gates_mcnemar_does(d: int, alpha: float) -> None:
    """The critical count c of d discordant images: c against d - c is significant by mcnemar, c + 1 is not."""
    k = int(critical_counts(alpha, 1024)[d])
    assert k < 0 or p_of(d - k, k) < alpha
    assert k + 1 > d - k - 1 or p_of(d - k - 1, k + 1) >= alpha


@MANY
@given(st.integers(1, 100_000), st.data())
def test_discordant_share_is_the_observed_share_at_least_the_floor(n: int, data: st.DataObject) -> None:
    k = data.draw(st.integers(0, n))
    share = discordant_share(k, n)
    assert share >= k / n and share >= wilson(0, n)[1] and share == max(k / n, wilson(0, n)[1]) and share <= 1.0
