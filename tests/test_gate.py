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
    assert decide(GOOD, GateConfig(tolerance=0.03), champion, "v1").promote
    assert decide(metrics(0.97, GOOD["per_class_accuracy"]), GateConfig(), champion, "v1").promote  # a tie passes


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
