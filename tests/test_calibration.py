"""Temperature scaling: the small maths (property tests), a fitted T on the real trained run, and the exported
ONNX model carrying it (its probabilities, its metadata)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import faceclf.serving.export as E
from faceclf.config import RunConfig
from faceclf.dataset.discover import discover
from faceclf.dataset.preprocess import Preprocess
from faceclf.dataset.tensors import normalize
from faceclf.serving.onnx_model import CPU_PROVIDER
from faceclf.training.calibrate import (
    ECE_BINS,
    T_MAX,
    T_MIN,
    calibrated,
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
)
from faceclf.training.checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from faceclf.training.evaluate import evaluate_checkpoint
from faceclf.training.loop import predict_split
from faceclf.training.run import finish_run, load_splits

PNG = b"\x89PNG\r\n\x1a\n"


def _logits(seed: int, n: int, classes: int, scale: float = 3.0) -> torch.Tensor:
    """(n, classes) float64 logits ~ N(0, scale^2), reproducible from ``seed``."""
    return torch.randn(n, classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _labels_from(logits: torch.Tensor, temperature: float, seed: int) -> torch.Tensor:
    """(n,) labels drawn from softmax(logits / temperature): the model log_softmax(logits / T) is calibrated."""
    g = torch.Generator().manual_seed(seed + 1)
    return torch.multinomial(torch.softmax(logits / temperature, dim=1), 1, generator=g).squeeze(1)


# --- the small maths ---------------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(0, 300), classes=st.integers(2, 5),
       scale=st.floats(0.01, 30), bins=st.integers(1, 40), as_log=st.booleans())
def test_ece_is_between_0_and_1_for_probs_and_log_probs_alike(seed: int, n: int, classes: int, scale: float,
                                                             bins: int, as_log: bool) -> None:
    log_probs = torch.log_softmax(_logits(seed, n, classes, scale), dim=1)
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    ece = expected_calibration_error(log_probs if as_log else log_probs.exp(), labels, bins)
    assert 0.0 <= ece <= 1.0
    assert ece == pytest.approx(expected_calibration_error(log_probs.exp() if as_log else log_probs, labels, bins))
    binned = reliability_bins(log_probs, labels, bins)
    assert len(binned) == bins and sum(b.count for b in binned) == n
    for b in binned:  # each bin's mean confidence lies in it, its accuracy in [0, 1]
        assert (b.low - 1e-12 <= b.confidence <= b.high + 1e-12 and 0 <= b.accuracy <= 1) if b.count else \
            (math.isnan(b.confidence) and math.isnan(b.accuracy))


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 40)), min_size=1, max_size=8),
       bins=st.integers(1, 30))
def test_confidence_equal_to_accuracy_has_zero_ece(groups: list[tuple[int, int]], bins: int) -> None:
    """Binary groups of n images predicted 'class 0' with confidence k/n, k of them truly class 0: accuracy ==
    confidence in every group, hence in every bin (both are count-weighted means), whatever the binning."""
    rows, labels = [], []
    for n, k in groups:
        k = max(k % (n + 1), (n + 1) // 2)  # confidence k/n >= 0.5: class 0 is the top label
        rows += [[k / n, 1 - k / n]] * n
        labels += [0] * k + [1] * (n - k)
    probs = torch.tensor(rows, dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor(labels), bins) == pytest.approx(0.0, abs=1e-12)


def test_ece_of_a_made_up_case_by_hand() -> None:
    """Two bins used: 2 images at 0.9 (1 right) and 2 at 0.6 (2 right): (2/4)|0.5-0.9| + (2/4)|1-0.6| = 0.4."""
    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6]], dtype=torch.float64)
    assert expected_calibration_error(probs, torch.tensor([0, 0, 0, 1]), bins=10) == pytest.approx(0.4)
    assert expected_calibration_error(torch.zeros(0, 2), torch.zeros(0, dtype=torch.int64)) == 0.0


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 6), temperature=st.floats(0.05, 50))
def test_calibrated_keeps_the_argmax_and_t1_is_identity(seed: int, classes: int, temperature: float) -> None:
    z = _logits(seed, 64, classes)
    log_probs = torch.log_softmax(z, dim=1)
    out = calibrated(log_probs, temperature)
    assert torch.equal(out.argmax(1), log_probs.argmax(1))
    torch.testing.assert_close(out.exp().sum(1), torch.ones(64, dtype=torch.float64))
    torch.testing.assert_close(out, torch.log_softmax(z / temperature, dim=1))  # T applies to log-probs as to logits
    assert torch.equal(calibrated(log_probs, 1.0), log_probs)


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), classes=st.integers(2, 4), temperature=st.floats(0.3, 5.0))
def test_fit_temperature_recovers_a_known_temperature(seed: int, classes: int, temperature: float) -> None:
    """Labels drawn from softmax(z / T0), the model reports log_softmax(z): the NLL's minimum is near T0."""
    z = _logits(seed, 20_000, classes)
    labels = _labels_from(z, temperature, seed)
    fitted = fit_temperature(torch.log_softmax(z, dim=1).float(), labels)
    assert fitted == pytest.approx(temperature, rel=0.08)
    assert fit_temperature(torch.log_softmax(z, dim=1).float(), labels) == fitted  # deterministic


def test_fit_temperature_leaves_the_model_alone_where_the_split_cannot_tell() -> None:
    z = _logits(0, 200, 2)
    lp, right = torch.log_softmax(z, dim=1), z.argmax(1)
    assert fit_temperature(lp[:0], right[:0]) == 1.0                          # no images
    assert fit_temperature(lp, torch.zeros(200, dtype=torch.int64)) == 1.0    # a single class
    assert fit_temperature(lp, right) == 1.0       # all right: the NLL only falls as T -> 0, the bound would choose
    assert fit_temperature(torch.full_like(lp, math.nan), _labels_from(z, 1.0, 0)) == 1.0
    wrong = right.clone()
    wrong[:10] = 1 - wrong[:10]                                              # 10 of 200 wrong: a real optimum
    assert T_MIN < fit_temperature(lp, wrong) < T_MAX


# --- the trained run ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def predicted(trained_run: Path, faces: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The trained run's model on its own val and test splits: split -> (log-probs (N, C), labels (N,)), as
    finish_run saw them (same hash split of the same folder)."""
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    cfg = RunConfig.from_dict({"data": ckpt["data_config"], "model": ckpt["model_config"],
                               "training": ckpt["train_config"]})
    faceset = discover(faces, cfg.data.split_fractions, cfg.data.decode_workers, cfg.data.near_distance)
    loaded = load_splits(faceset, cfg)
    model, preset = model_from_checkpoint(ckpt), Preprocess.from_checkpoint(ckpt)
    return {s: (predict_split(model, loaded[s], preset, torch.device("cpu")), loaded[s].labels) for s in ("val", "test")}


def test_finish_run_records_the_temperature_its_eces_and_the_reliability_diagram(trained_run: Path,
                                                                                  predicted: dict) -> None:
    m = json.loads((trained_run / "metrics.json").read_text())
    cal = m["calibration"]
    assert set(cal) == {"temperature", "bins", "val", "test"} and cal["bins"] == ECE_BINS
    assert T_MIN <= cal["temperature"] <= T_MAX
    (val_lp, val_y), (test_lp, test_y) = predicted["val"], predicted["test"]
    assert cal["temperature"] == pytest.approx(fit_temperature(val_lp, val_y), rel=1e-6)
    t = cal["temperature"]
    for split, (lp, y) in predicted.items():
        got = cal[split]
        assert set(got) == {"ece_before", "ece_after", "n"} and got["n"] == len(y) == m[split]["n"]
        assert all(math.isfinite(got[k]) and 0 <= got[k] <= 1 for k in ("ece_before", "ece_after"))
        assert got["ece_before"] == pytest.approx(expected_calibration_error(lp, y), abs=1e-6)
        assert got["ece_after"] == pytest.approx(expected_calibration_error(calibrated(lp, t), y), abs=1e-6)
    # test figures are the calibrated model's: the same accuracy, its NLL
    nll = float(torch.nn.functional.nll_loss(calibrated(test_lp, t), test_y))
    assert m["test"]["loss"] == pytest.approx(nll, rel=1e-5)
    assert m["test"]["accuracy"] == pytest.approx(float((test_lp.argmax(1) == test_y).double().mean()))
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    assert ckpt["temperature"] == cal["temperature"] and ckpt["calibration"] == cal
    assert ckpt["metrics"]["test"]["loss"] == pytest.approx(nll, rel=1e-5)
    assert (trained_run / "reliability.png").read_bytes()[:8] == PNG
    assert not [w for w in m.get("warnings", []) if "reliability" in w]


def test_finish_run_reports_the_calibrated_model_on_test(trained_run: Path, faces: Path, predicted: dict,
                                                         tmp_path: Path) -> None:
    """finish_run on a copy of the run, its val split with one label flipped (the model's most confident val
    answer now wrong): the NLL has an interior minimum, T != 1, and the test loss is the calibrated model's."""
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    save_checkpoint(tmp_path / "checkpoint.pt", ckpt)
    cfg = RunConfig.from_dict({"data": ckpt["data_config"], "model": ckpt["model_config"],
                               "training": ckpt["train_config"]})
    loaded = load_splits(discover(faces, cfg.data.split_fractions, cfg.data.decode_workers, cfg.data.near_distance), cfg)
    val_lp, val_y = predicted["val"]
    flipped = val_y.clone()
    k = int(val_lp.max(dim=1).values.argmax())
    flipped[k] = 1 - flipped[k]
    loaded["val"] = dataclasses.replace(loaded["val"], labels=flipped)
    metrics, test_lp = finish_run(tmp_path, ckpt["classes"], loaded, 0, "cpu")
    t = metrics["calibration"]["temperature"]
    assert t == pytest.approx(fit_temperature(val_lp, flipped), rel=1e-6) and abs(t - 1) > 0.1
    torch.testing.assert_close(test_lp, predicted["test"][0])  # returned uncalibrated, for the diagram
    nll = float(torch.nn.functional.nll_loss(calibrated(test_lp, t), predicted["test"][1]))
    assert metrics["test"]["loss"] == pytest.approx(nll, rel=1e-5)
    assert metrics["test"]["loss"] != pytest.approx(float(torch.nn.functional.nll_loss(test_lp, predicted["test"][1])))
    assert metrics["val"]["loss"] == pytest.approx(float(torch.nn.functional.nll_loss(val_lp, flipped)), rel=1e-5)
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["temperature"] == t and saved["calibration"] == metrics["calibration"]
    assert saved["metrics"]["test"] == metrics["test"]


def test_calibration_lowers_the_ece_of_an_over_confident_model(predicted: dict) -> None:
    """Labels drawn from the real model's own probabilities (200 draws per image) make it calibrated by
    construction; the same model sharpened x5 (log-probs x 5 before the softmax) is over-confident. T fitted on
    the val draws flattens it back (T ~ 5) and cuts the ECE on val and on test's own draws."""
    def over_confident(split: str, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        log_probs = predicted[split][0].repeat(200, 1).double()                  # (200 N, C)
        labels = torch.multinomial(log_probs.exp(), 1, generator=torch.Generator().manual_seed(seed)).squeeze(1)
        return torch.log_softmax(5 * log_probs, dim=1), labels

    t = fit_temperature(*over_confident("val", 0))
    assert 3.5 < t < 7.0
    for split, seed in (("val", 0), ("test", 1)):
        lp, y = over_confident(split, seed)
        before, after = expected_calibration_error(lp, y), expected_calibration_error(calibrated(lp, t), y)
        assert after < before / 3, (split, t, before, after)


def test_plot_reliability_writes_a_png_and_tolerates_empty_bins(predicted: dict, tmp_path: Path) -> None:
    from faceclf.training.plots import plot_reliability

    lp, y = predicted["test"]
    assert plot_reliability(lp, y, 2.5, tmp_path / "r.png").read_bytes()[:8] == PNG
    assert plot_reliability(lp[:1], y[:1], 1.0, tmp_path / "one.png").read_bytes()[:8] == PNG


# --- the exported model ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def hot_checkpoint(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained run's checkpoint with its temperature set to 2.5 (faceclf's own load/save)."""
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    ckpt["temperature"] = 2.5
    path = tmp_path_factory.mktemp("hot") / "checkpoint.pt"
    save_checkpoint(path, ckpt)
    return path


def test_exported_model_gives_the_calibrated_probabilities_and_carries_its_figures(hot_checkpoint: Path,
                                                                                    tmp_path: Path) -> None:
    report = E.export_onnx(hot_checkpoint, tmp_path / "model.onnx")  # checker and parity pass with T in the graph
    ckpt = load_checkpoint(hot_checkpoint)
    pixels = E.parity_batch(ckpt)                                    # real val images, uint8 (B, S, S, 3)
    session = ort.InferenceSession(str(report.path), providers=[CPU_PROVIDER])
    got = np.exp(session.run(None, {E.INPUT_NAME: pixels.numpy()})[0])  # (B, C) probabilities
    x = pixels.permute(0, 3, 1, 2)
    with torch.no_grad():
        raw = model_from_checkpoint(ckpt)(normalize(x, Preprocess.from_checkpoint(ckpt)))  # (B, C) log-probs
    np.testing.assert_allclose(got, torch.softmax(raw / 2.5, dim=1).numpy(), atol=1e-5)
    assert not np.allclose(got, raw.exp().numpy(), atol=1e-3)     # T=2.5 did reach the graph

    meta = {p.key: p.value for p in onnx.load(str(report.path)).metadata_props}
    test = ckpt["metrics"]["test"]
    assert float(meta["temperature"]) == 2.5
    assert float(meta["test_accuracy"]) == test["accuracy"] and int(meta["test_n"]) == test["n"]
    shares = json.loads(meta["test_predicted_shares"])
    predicted_as = np.asarray(test["confusion_matrix"]).sum(axis=0)  # rows true, columns predicted
    assert shares == pytest.approx({c: predicted_as[i] / test["n"] for i, c in enumerate(ckpt["classes"])})
    assert sum(shares.values()) == pytest.approx(1.0)


def test_metadata_of_a_checkpoint_without_test_metrics_or_temperature(trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    del ckpt["temperature"], ckpt["metrics"]  # a checkpoint from before calibration, without test figures
    proto = onnx.ModelProto()
    E.add_metadata(proto, ckpt, "v", "0" * 64)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["temperature"] == "1.0"
    assert not {"test_accuracy", "test_n", "test_predicted_shares"} & set(meta)
    pixels = E.parity_batch(ckpt)
    with torch.no_grad():  # T = 1: the graph's output is the model's own
        torch.testing.assert_close(E.pixel_model(ckpt)(pixels),
                                   model_from_checkpoint(ckpt)(normalize(pixels.permute(0, 3, 1, 2),
                                                                           Preprocess.from_checkpoint(ckpt))))


def test_evaluate_reports_the_model_as_exported(hot_checkpoint: Path, trained_run: Path, faces: Path,
                                                predicted: dict) -> None:
    hot = evaluate_checkpoint(hot_checkpoint, faces, "test", "cpu")
    lp, y = predicted["test"]
    assert hot["loss"] == pytest.approx(float(torch.nn.functional.nll_loss(calibrated(lp, 2.5), y)), rel=1e-5)
    plain = evaluate_checkpoint(trained_run / "checkpoint.pt", faces, "test", "cpu")
    assert (hot["accuracy"], hot["confusion_matrix"]) == (plain["accuracy"], plain["confusion_matrix"])
    assert plain == json.loads((trained_run / "metrics.json").read_text())["test"]
