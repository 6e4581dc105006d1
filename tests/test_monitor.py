"""The champion watched between nights: the label-free accuracy estimate of every scoring run (its maths by
property, a real run's predictions.json, reruns and resumes, the registry's estimate.json, `models list`, the
night's report)."""

from __future__ import annotations

import csv
import json
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import onnx_accuracy
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import faceclf.serving.stream as stream
from faceclf.cli import main
from faceclf.config import MonitorConfig, ScoreConfig
from faceclf.nightly.report import calibration_lines, champion_estimate_lines, render_report
from faceclf.nightly.stats import Z95
from faceclf.serving.monitor import BINS, MICRO, Tally, accuracy_se, estimate, share_se, shares, summarize
from faceclf.serving.onnx_model import load_onnx_model
from faceclf.serving.stream import score_images
from faceclf.store import registry
from faceclf.store.objects import LocalStore

CPU = ScoreConfig(device="cpu", part_rows=8, batch_size=4)
SETTINGS = settings(deadline=None, max_examples=80)
CLASSES = ["a", "b", "c"]
VERSION = "20261201T020000Z-abcdef"


@st.composite
def probabilities(draw: st.DrawFn, max_n: int = 120) -> np.ndarray:
    """(n, 3) rows of probabilities rounded to millionths, as the CSV holds them (rows summing to ~1)."""
    n = draw(st.integers(0, max_n))
    raw = draw(arrays(np.float64, (n, len(CLASSES)), elements=st.floats(1e-3, 1.0)))
    return np.round(raw / raw.sum(axis=1, keepdims=True), 6) if n else raw


def csv_rows(probs: np.ndarray) -> list[dict[str, str]]:
    """The rows the scorer writes for ``probs`` (text, 6 decimals), one error row between each."""
    rows = []
    for p in probs:
        rows.append({"predicted_class": CLASSES[int(p.argmax())], "error": "",
                     **{f"p_{c}": "%.6f" % v for c, v in zip(CLASSES, p)}})
        rows.append({"predicted_class": "", "error": "cannot decode image", **{f"p_{c}": "" for c in CLASSES}})
    return rows


def tally_of(probs: np.ndarray, pieces: list[int] = ()) -> Tally:
    """A tally fed ``probs`` cut at ``pieces`` (row positions)."""
    tally = Tally(CLASSES)
    for part in np.split(probs, sorted(pieces)):
        tally.add_probs(part)
    return tally


def figures(t: Tally) -> tuple:
    return t.counts, t.histogram, t.sum_p, t.sum_pq, t.unreadable


@given(probabilities())
@SETTINGS
def test_the_estimate_is_a_mean_probability_inside_its_interval_inside_0_1(probs: np.ndarray) -> None:
    tally = tally_of(probs)
    found = estimate(tally.sum_p, tally.sum_pq, tally.n)
    if not len(probs):
        assert found is None and summarize(tally, None, MonitorConfig())["interval"] is None
        return
    value, low, high = found
    assert 0.0 <= low <= value <= high <= 1.0
    best = probs.max(axis=1)
    assert value == pytest.approx(best.mean(), abs=1e-9)
    half = 1.959963984540054 * math.sqrt(float(np.sum(best * (1 - best)))) / len(best)  # Poisson-binomial sd
    assert high == pytest.approx(min(1.0, value + half), abs=1e-9) and low == pytest.approx(max(0.0, value - half),
                                                                                            abs=1e-9)
    assert sum(shares(tally.counts).values()) == pytest.approx(1.0) and sum(tally.histogram) == tally.n == len(probs)


@given(probabilities(), st.lists(st.integers(0, 120), max_size=5))
@SETTINGS
def test_fed_in_pieces_or_at_once_or_as_csv_rows_the_figures_are_the_same(probs: np.ndarray, cuts: list[int]) -> None:
    whole = tally_of(probs)
    assert figures(tally_of(probs, [min(c, len(probs)) for c in cuts])) == figures(whole)
    rows = Tally(CLASSES)
    for row in csv_rows(probs):
        rows.add_row(row)
    assert figures(rows) == figures(whole)  # millionths: exact, whatever the order or the pieces


@given(probabilities(), st.floats(0.0, 1.0), st.lists(st.floats(0.0, 1.0), min_size=3, max_size=3),
       st.floats(0.0, 1.0), st.floats(0.0, 1.0), st.integers(1, 150))
@SETTINGS
def test_alarms_are_raised_exactly_when_a_threshold_is_crossed(probs: np.ndarray, test_accuracy: float,
                                                                weights: list[float], drop: float, shift: float,
                                                                min_images: int) -> None:
    total = sum(weights) or 1.0
    reference = {"test_accuracy": test_accuracy, "test_n": 111,
                 "predicted_shares": {c: w / total if sum(weights) else 1 / 3 for c, w in zip(CLASSES, weights)}}
    cfg = MonitorConfig(accuracy_drop=drop, class_shift=shift, min_images=min_images)
    s = summarize(tally_of(probs), reference, cfg)
    armed = s["n"] >= min_images
    # past the bar and past its own noise: both sides' sampling errors (the test set's 111 images too)
    expected_drop = armed and s["accuracy_drop"] > drop and \
        s["accuracy_drop"] > Z95 * accuracy_se(tuple(s["interval"]), reference)
    expected_classes = [c for c, moved in s["share_shift"].items() if armed and abs(moved) > shift and abs(moved) >
                        Z95 * share_se(s["predicted_shares"][c], reference["predicted_shares"][c], s["n"], 111)]
    assert sum("below the test accuracy" in a for a in s["alarms"]) == expected_drop
    assert [a.split("'")[1] for a in s["alarms"] if a.startswith("class ")] == expected_classes
    assert len(s["alarms"]) == expected_drop + len(expected_classes)
    if s["n"]:
        assert s["accuracy_drop"] == test_accuracy - s["estimated_accuracy"]
        assert all(s["share_shift"][c] == s["predicted_shares"][c] - reference["predicted_shares"][c] for c in CLASSES)
    assert any("fewer than min_images" in n for n in s["notes"]) == (not armed)


def test_rows_that_are_not_predictions_are_counted_as_unreadable_not_as_images() -> None:
    tally = Tally(CLASSES)
    for bad in ({"predicted_class": "z", "p_a": "0.5"}, {"predicted_class": "a", "p_a": "nan"},
                {"predicted_class": "a", "p_a": "1.5"}, {"predicted_class": "a", "p_a": "x"},
                {"predicted_class": "a", "p_a": "inf"}):
        tally.add_row({"error": "", **bad})
    tally.add_row({"error": "", "predicted_class": "a", "p_a": "1.000000"})
    assert (tally.n, tally.unreadable, tally.histogram[BINS - 1], tally.sum_p, tally.sum_pq) == (1, 5, 1, MICRO, 0)
    assert "5 rows without an error" in " ".join(summarize(tally, None, MonitorConfig())["notes"])


# --- a real scoring run ---------------------------------------------------------------------------------------

def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


MONITOR_PROPS = ("temperature", "test_accuracy", "test_n", "test_predicted_shares")


def with_reference(onnx_model: Path, folder: Path, **props: str) -> Path:
    """A copy of ``onnx_model`` carrying ``props`` as the monitor's metadata (none: a model exported before them)."""
    import onnx

    proto = onnx.load(str(onnx_model))
    meta = {p.key: p.value for p in proto.metadata_props if p.key not in MONITOR_PROPS} | props
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, meta)
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(proto, str(folder / "model.onnx"))
    return folder / "model.onnx"


def test_a_scoring_run_records_its_estimate_and_it_holds_the_accuracy_measured_with_labels(
        onnx_model: Path, faces: Path, tmp_path: Path) -> None:
    summary = score_images(onnx_model, [faces], tmp_path / "out", CPU)
    block = json.loads((tmp_path / "out" / "predictions.json").read_text())["monitor"]
    rows = [r for r in read_csv(tmp_path / "out" / "predictions.csv") if not r["error"]]
    assert block == summary.monitor and block["n"] == summary.scored == len(rows) > 0
    counts = {c: sum(r["predicted_class"] == c for r in rows) for c in block["predicted_shares"]}
    assert block["predicted_shares"] == {c: k / len(rows) for c, k in counts.items()}
    best = [max(float(r[k]) for k in r if k.startswith("p_")) for r in rows]
    assert block["estimated_accuracy"] == pytest.approx(np.mean(best), abs=1e-9) == block["mean_confidence"]
    histogram = block["confidence_histogram"]
    assert sum(histogram["counts"]) == len(rows) and histogram["edges"] == [k / 10 for k in range(11)]
    assert block["reference"] == load_onnx_model(onnx_model, "cpu").reference
    low, high = block["interval"]
    assert low <= onnx_accuracy(onnx_model, faces) <= high, block

    older = with_reference(onnx_model, tmp_path / "older")  # exported before the monitor's props: no reference
    block = score_images(older, [faces], tmp_path / "older-out", CPU).monitor
    assert block["reference"] is None and block["alarms"] == [] and block["accuracy_drop"] is None
    assert block["share_shift"] == {} and block["temperature"] is None and block["n"] == len(rows)
    assert "no test reference" in block["notes"][0] and "not temperature-calibrated" in block["notes"][1]


def test_on_faces_of_another_look_the_estimate_falls_and_an_alarm_is_raised(onnx_model: Path, tmp_path: Path) -> None:
    """The champion was trained on colour faces; grey ones of the same generator are a set it was not trained for:
    its confidences fall with its accuracy, and the estimate falls past the bar, significantly, against the
    model's own test accuracy (its real reference, from the export)."""
    from PIL import Image, ImageOps

    from faceclf.devtools.sample import generate_sample_faces

    generate_sample_faces(tmp_path / "colour", per_class=40, size=48, seed=77)
    for path in sorted((tmp_path / "colour").rglob("*.*")):
        grey = tmp_path / "grey" / path.parent.name / f"{path.stem}.png"
        grey.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.grayscale(Image.open(path)).convert("RGB").save(grey)
    own = score_images(onnx_model, [tmp_path / "colour"], tmp_path / "own", CPU).monitor
    shifted = score_images(onnx_model, [tmp_path / "grey"], tmp_path / "shifted", CPU).monitor
    test_accuracy = shifted["reference"]["test_accuracy"]
    assert own["alarms"] == [], own["alarms"]  # its own kind of image: no alarm
    assert shifted["estimated_accuracy"] < min(own["estimated_accuracy"], test_accuracy) - 0.1
    assert any("below the test accuracy" in a for a in shifted["alarms"]), shifted
    truth = onnx_accuracy(onnx_model, tmp_path / "grey")
    assert truth < onnx_accuracy(onnx_model, tmp_path / "colour")  # the accuracy fell too


def test_an_incremental_rerun_and_a_resumed_run_give_the_same_monitor_block(
        onnx_model: Path, faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = score_images(onnx_model, [faces], tmp_path / "out", CPU).monitor
    again = score_images(onnx_model, [faces], tmp_path / "out", CPU, incremental=True)
    assert again.reused == again.images and again.monitor == first  # every row read back from the CSV's text

    real = stream.progress

    def killed(rows, **kwargs):  # the run dies after 20 rows: two parts of 8 are on disk
        for i, row in enumerate(real(rows, **kwargs)):
            if i == 20:
                raise RuntimeError("killed")
            yield row

    monkeypatch.setattr(stream, "progress", killed)
    with pytest.raises(RuntimeError, match="killed"):
        score_images(onnx_model, [faces], tmp_path / "resumed", CPU)
    monkeypatch.setattr(stream, "progress", real)
    resumed = score_images(onnx_model, [faces], tmp_path / "resumed", CPU)
    assert resumed.resumed == 16 and resumed.monitor == first


def test_the_models_own_test_figures_raise_alarms_past_the_thresholds(onnx_model: Path, faces: Path, tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    model = with_reference(onnx_model, tmp_path / "ref", temperature="1.5", test_accuracy="1.0", test_n="111",
                           test_predicted_shares=json.dumps({"with_mask": 1.0, "without_mask": 0.0}))
    loaded = load_onnx_model(model, "cpu")
    assert loaded.temperature == 1.5 and loaded.reference == {
        "test_accuracy": 1.0, "test_n": 111, "predicted_shares": {"with_mask": 1.0, "without_mask": 0.0}}
    with caplog.at_level(logging.INFO, logger="faceclf.serving.stream"):
        s = score_images(model, [faces], tmp_path / "out", CPU, monitor=MonitorConfig(accuracy_drop=0.0,
                                                                                       class_shift=0.2))
    block = s.monitor
    assert block["reference"]["test_accuracy"] == 1.0 and block["temperature"] == 1.5
    assert block["accuracy_drop"] == pytest.approx(1.0 - block["estimated_accuracy"])
    assert len(block["alarms"]) == 3, block["alarms"]  # the drop, and both classes moved by about a half
    assert "below the test accuracy 1.0000" in block["alarms"][0] and "'without_mask'" in block["alarms"][2]
    line = next(r.getMessage() for r in caplog.records if "estimated accuracy" in r.getMessage())
    assert "vs test 1.0000" in line and "ALARM" in line

    few = score_images(model, sorted(faces.rglob("*.png"))[:5], tmp_path / "few", CPU)
    assert few.monitor["n"] == 5 and few.monitor["alarms"] == []
    assert "only 5 scored images, fewer than min_images 50" in few.monitor["notes"][0]


@pytest.mark.parametrize("props", [{"test_accuracy": "high", "test_n": "111", "test_predicted_shares": "{}"},
                                   {"test_accuracy": "0.9", "test_n": "111", "test_predicted_shares": "[1, 2]"},
                                   {"test_accuracy": "0.9", "test_n": "111",
                                    "test_predicted_shares": '{"with_mask": 0.9, "cat": 0.1}'},
                                   {"test_accuracy": "0.9", "test_n": "111",
                                    "test_predicted_shares": '{"with_mask": 0.2, "without_mask": 0.2}'},
                                   {"test_accuracy": "1.7", "test_n": "111", "test_predicted_shares": "{}"},
                                   {"test_accuracy": "0.9"}])
def test_malformed_reference_props_are_ignored_with_a_warning(onnx_model: Path, tmp_path: Path, props: dict,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    model = with_reference(onnx_model, tmp_path, temperature="-2", **props)
    with caplog.at_level(logging.WARNING):
        loaded = load_onnx_model(model, "cpu")
    assert loaded.reference is None and loaded.temperature is None
    assert "ignoring its test reference" in caplog.text and "ignoring its temperature" in caplog.text


def test_faceclf_score_prints_the_estimate_in_its_last_line(onnx_model: Path, faces: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    assert main(["score", str(onnx_model), str(faces), "--out", str(tmp_path), "--device", "cpu", "--workers", "2",
                 "--min-images", "7"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("scored ") and "estimated accuracy " in last and " images" in last
    assert json.loads((tmp_path / "predictions.json").read_text())["monitor"]["thresholds"]["min_images"] == 7


# --- the registry, `models list` and the night's report ---------------------------------------------------------

def a_summary(n: int = 400, alarms: tuple[str, ...] = ()) -> dict:
    tally = Tally(["with_mask", "without_mask"])
    tally.add_probs(np.tile([[0.9, 0.1], [0.2, 0.8]], (n // 2, 1)))
    s = summarize(tally, {"test_accuracy": 0.95, "test_n": 111, "predicted_shares": {"with_mask": 0.5,
                                                                                     "without_mask": 0.5}},
                  MonitorConfig())
    return {**s, "alarms": list(alarms)}


def test_record_and_read_an_estimate_and_refuse_a_malformed_one(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    store = LocalStore(tmp_path / "bucket")
    assert registry.read_estimate(store, VERSION) is None
    uri = registry.record_estimate(store, VERSION, a_summary(), "s3://b/to-score/", "2026-12-07T09:12:00Z")
    assert uri.endswith(f"models/face/{VERSION}/estimate.json")
    got = registry.read_estimate(store, VERSION)
    assert got["estimated_accuracy"] == pytest.approx(0.85) and got["n"] == 400 and got["test_accuracy"] == 0.95
    assert (got["source"], got["scored_at"], got["version"], got["alarms"]) == ("s3://b/to-score/",
                                                                                "2026-12-07T09:12:00Z", VERSION, [])
    assert got["accuracy_drop"] == pytest.approx(0.10) and got["interval"][0] < 0.85 < got["interval"][1]
    with pytest.raises(registry.RegistryError):
        registry.record_estimate(store, "../../x", a_summary(), "here", "now")

    key = tmp_path / "bucket" / "models" / "face" / VERSION / "estimate.json"
    for bad in ("not json", json.dumps([1]), json.dumps({**got, "n": "400"}), json.dumps({**got, "n": True}),
                json.dumps({**got, "interval": [0.1, "0.9"]}), json.dumps({**got, "estimated_accuracy": None}),
                json.dumps({**got, "alarms": "ALARM"}), json.dumps({**got, "share_shift": {"a": None}}),
                json.dumps({**got, "test_accuracy": float("nan")}),
                json.dumps({**got, "version": "20261101T020000Z-000000"})):
        key.write_text(bad)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert registry.read_estimate(store, VERSION) is None, bad
        assert "ignoring" in caplog.text


def test_models_list_shows_each_versions_last_estimate(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    local_bucket = tmp_path / "bucket"
    store = LocalStore(local_bucket)
    decision = tmp_path / "decision.json"
    decision.write_text(json.dumps({"promote": True, "candidate_accuracy": 0.95,
                                    "candidate": {"accuracy": {"value": 0.95, "n": 111, "low": 0.89, "high": 0.98}}}))
    older, newer = "20261201T020000Z-aaaaaa", "20261202T020000Z-bbbbbb"
    for version in (older, newer):
        registry.publish_version(store, version, {"decision.json": decision})
    registry.record_estimate(store, older, a_summary(alarms=("estimated accuracy 0.85 is 0.10 below ...",)),
                             "s3://b/p/", "2026-12-01T09:00:00Z")
    assert main(["models", "list", "--bucket", str(local_bucket)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "test accuracy 0.9500 [0.8900, 0.9800] n=111  estimated 0.8500 [" in lines[0]
    assert "on 400 images at 2026-12-01T09:00:00Z  ALARM (1)" in lines[0]
    assert "estimated" not in lines[1]  # no scoring run recorded for it
    assert registry.list_versions(store)[0]["estimate"]["n"] == 400


def test_the_nights_report_says_the_calibration_and_the_champion_between_nights(tmp_path: Path) -> None:
    calibration = {"temperature": 1.84, "bins": 15, "val": {"ece_before": 0.09, "ece_after": 0.02, "n": 120},
                   "test": {"ece_before": 0.081, "ece_after": 0.023, "n": 111}}
    assert calibration_lines(calibration)[0] == ("Calibration: temperature 1.84 fitted on 120 val images; ECE (test) "
                                                 "0.081 -> 0.023")
    assert calibration_lines(None) == [] and champion_estimate_lines(None) == []
    store = LocalStore(tmp_path)
    registry.record_estimate(store, VERSION, a_summary(alarms=("class 'with_mask' moved",)), "s3://b/p/",
                             "2026-12-07T09:12:00Z")
    text = "\n".join(champion_estimate_lines(registry.read_estimate(store, VERSION)))
    assert "## The champion between nights" in text and f"Champion {VERSION}'s last scoring run (s3://b/p/, " in text
    assert "estimated accuracy 85.00% [" in text and "on 400 scored images" in text
    assert "against 95.00% on its test set" in text
    assert "- class 'with_mask' moved" in text

    test = {"loss": 0.1, "accuracy": 0.95, "n": 111, "confusion_matrix": [[50, 3], [3, 55]]}
    decision = {"promote": True, "reasons": [], "gate": {}, "candidate": None}
    report = render_report(VERSION, ["with_mask", "without_mask"], {"test": test, "calibration": calibration},
                           decision, {"new": 3}, champion_estimate=registry.read_estimate(store, VERSION))
    assert "Calibration: temperature 1.84" in report and report.index("## The champion between nights") > report.index(
        "## Confusion matrix")
