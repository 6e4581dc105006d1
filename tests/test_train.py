"""The training loop, checkpoints, resume and the files a run leaves behind."""

from __future__ import annotations

import csv
import json
import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import tiny_config

from faceclf.devtools.sample import generate_sample_faces
from faceclf.training.checkpoint import (
    load_checkpoint,
    model_from_checkpoint,
    save_checkpoint,
)
from faceclf.training.launch import run_training

PLAIN = (dict, list, str, int, float, bool, type(None), torch.Tensor)


def _history(run: Path) -> list[dict[str, str]]:
    with open(run / "history.csv", newline="") as f:
        return list(csv.DictReader(f))


def _only_plain(obj: Any) -> bool:
    if isinstance(obj, dict):
        return all(isinstance(k, str) and _only_plain(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(_only_plain(v) for v in obj)
    return isinstance(obj, PLAIN)


def test_run_folder_holds_every_output(trained_run: Path) -> None:
    names = {p.name for p in trained_run.iterdir()}
    assert {"checkpoint.pt", "last.pt", "history.csv", "config.json", "metrics.json", "splits.csv",
            "history.png", "confusion_matrix.png"} <= names
    for png in ("history.png", "confusion_matrix.png"):
        assert (trained_run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [n for n in names if n.endswith(".tmp")]


def test_metrics_json_has_the_documented_shape(trained_run: Path) -> None:
    m = json.loads((trained_run / "metrics.json").read_text())
    assert m["classes"] == ["with_mask", "without_mask"]
    assert m["device"] == "cpu" and isinstance(m["best_epoch"], int)
    for part in ("val", "test"):
        t = m[part]
        assert set(t) == {"loss", "accuracy", "per_class_accuracy", "confusion_matrix", "n"}
        assert sum(map(sum, t["confusion_matrix"])) == t["n"] > 0
        diag = sum(t["confusion_matrix"][i][i] for i in range(2))
        assert t["accuracy"] == pytest.approx(diag / t["n"])
        assert set(t["per_class_accuracy"]) == set(m["classes"])
    assert m["data"]["duplicates_dropped"] == 3
    assert m["test"]["accuracy"] >= 0.8  # the sample faces are learnable even at 32x32 in 6 epochs


def test_history_has_one_row_per_epoch_and_best_weights_are_kept(trained_run: Path) -> None:
    rows = _history(trained_run)
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_accuracy", "lr", "seconds"]
    assert [int(r["epoch"]) for r in rows] == list(range(len(rows)))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])  # it learns
    best = min(rows, key=lambda r: float(r["val_loss"]))
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    assert ckpt["epoch"] == int(best["epoch"])
    assert ckpt["best_val_loss"] == pytest.approx(float(best["val_loss"]), abs=1e-6)


def test_checkpoint_is_plain_types_and_rebuilds_the_model(trained_run: Path) -> None:
    raw = torch.load(trained_run / "checkpoint.pt", weights_only=True)
    assert _only_plain(raw)
    for key in ("model_state", "model_config", "classes", "mean", "std", "image_size", "epoch",
                "best_val_loss", "metrics", "format_version", "version"):
        assert key in raw
    assert set(raw["metrics"]) == {"val", "test"}
    model = model_from_checkpoint(raw)
    x = torch.randn(2, 3, raw["image_size"], raw["image_size"])
    assert model(x).shape == (2, 2)
    saved_cfg = json.loads((trained_run / "config.json").read_text())
    assert saved_cfg["model"] == raw["model_config"]


def test_pickled_code_in_a_checkpoint_is_refused(tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):  # would run on unpickling without weights_only
            return (print, ("pwned",))

    torch.save({"format_version": 1, "x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="cannot be loaded safely"):
        load_checkpoint(tmp_path / "evil.pt")


def test_failed_checkpoint_write_leaves_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, {"format_version": 1, "v": 1})

    with pytest.raises(TypeError, match="cannot pickle"):  # dies mid-write: a lock cannot be saved
        save_checkpoint(path, {"format_version": 1, "v": threading.Lock()})
    assert load_checkpoint(path)["v"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]


def test_same_seed_same_run(faces: Path, tmp_path: Path) -> None:
    run_training(faces, tmp_path / "a", tiny_config(epochs=2))
    run_training(faces, tmp_path / "b", tiny_config(epochs=2))
    strip = lambda rows: [(r["train_loss"], r["val_loss"], r["val_accuracy"]) for r in rows]  # noqa: E731
    assert strip(_history(tmp_path / "a")) == strip(_history(tmp_path / "b"))


def _kill_after_epoch(faces: Path, run: Path, epoch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a 4-epoch training that dies right after writing last.pt for ``epoch``."""
    import faceclf.training.fit as T

    real_save = T.save_checkpoint

    def save_then_die(path, payload):  # noqa: ANN001 - same signature as save_checkpoint
        real_save(path, payload)
        if Path(path).name == "last.pt" and payload["epoch"] == epoch:
            raise KeyboardInterrupt("killed")

    with monkeypatch.context() as m:
        m.setattr(T, "save_checkpoint", save_then_die)
        with pytest.raises(KeyboardInterrupt):
            run_training(faces, run, tiny_config(epochs=4))


def test_resume_reaches_the_uninterrupted_result(faces: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_training(faces, tmp_path / "full", tiny_config(epochs=4))
    _kill_after_epoch(faces, tmp_path / "killed", epoch=1, monkeypatch=monkeypatch)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["epoch"] == 1
    assert not (tmp_path / "killed" / "metrics.json").exists()

    run_training(faces, tmp_path / "killed", resume=True)

    full = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    resumed = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    key = lambda h: [(r["epoch"], r["train_loss"], r["val_loss"]) for r in h]  # noqa: E731
    assert key(resumed["history"]) == key(full["history"]) and len(full["history"]) == 4
    for k, v in full["model_state"].items():
        torch.testing.assert_close(resumed["model_state"][k], v, rtol=0, atol=0)
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text())["test"] == \
        json.loads((tmp_path / "full" / "metrics.json").read_text())["test"]


def test_resume_without_a_run_is_a_clear_error(faces: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        run_training(faces, tmp_path / "never", resume=True)


def test_early_stopping_ends_a_run_that_stopped_improving(faces: Path, tmp_path: Path) -> None:
    cfg = tiny_config(epochs=10)
    cfg.training.learning_rate = 0.0  # nothing improves after the first epoch ...
    cfg.model.batch_norm = False   # ... not even batch-norm running statistics
    cfg.training.patience = 2
    run_training(faces, tmp_path / "run", cfg)
    assert len(_history(tmp_path / "run")) == 3  # epoch 0 is best; epochs 1 and 2 exhaust patience


def test_three_classes_train_and_evaluate(tmp_path: Path) -> None:
    generate_sample_faces(tmp_path / "data", per_class=40, size=48, seed=3,
                          classes=("with_mask", "with_sunglasses", "without_mask"))
    m = run_training(tmp_path / "data", tmp_path / "run", tiny_config(epochs=3))
    assert m["classes"] == ["with_mask", "with_sunglasses", "without_mask"]
    assert len(m["test"]["confusion_matrix"]) == 3 and all(len(r) == 3 for r in m["test"]["confusion_matrix"])
    assert math.isfinite(m["test"]["loss"])


def test_balanced_class_weights_are_n_over_k_times_n_c() -> None:
    from faceclf.config import TrainConfig
    from faceclf.training.loop import make_trainer

    cpu = torch.device("cpu")
    labels = torch.tensor([0] * 30 + [1] * 10)
    assert make_trainer(tiny_config(class_weighting="none"), 1, cpu).loss_weight(labels) is None  # plain NLL
    balanced = make_trainer(tiny_config(class_weighting="balanced"), 1, cpu)
    assert balanced.loss_weight(labels).tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])
    assert balanced.loss_weight(torch.tensor([0, 1, 1, 0])).tolist() == [1.0, 1.0]  # balanced set: weights 1
    auto = make_trainer(tiny_config(class_weighting="auto"), 1, cpu)       # the default
    assert auto.loss_weight(labels).tolist() == pytest.approx([40 / (2 * 30), 40 / (2 * 10)])  # 3:1 > 2: weighted
    assert auto.loss_weight(torch.tensor([0] * 20 + [1] * 10)) is None      # 2:1, not over the ratio: plain NLL
    three = tiny_config(class_weighting="balanced")
    three.model.num_classes = 3
    w = make_trainer(three, 1, cpu).loss_weight(torch.tensor([0, 0, 1]))  # class 2 has no image
    assert w.tolist() == pytest.approx([3 / (3 * 2), 3 / (3 * 1), 3 / 3]) and torch.isfinite(w).all()
    with pytest.raises(ValueError, match="class_weighting must be one of"):
        TrainConfig(class_weighting="inverse")


def test_balanced_class_weighting_trains_on_an_imbalanced_set(faces: Path, tmp_path: Path) -> None:
    from benchmarks.imbalance_bench import imbalanced_tree
    from faceclf.dataset.discover import discover

    counts = imbalanced_tree(discover(faces, (0.8, 0.1, 0.1)), tmp_path / "data", "without_mask", keep=4)
    assert counts["train"]["without_mask"] * 3 < counts["train"]["with_mask"]
    losses = {}
    for weighting in ("none", "balanced"):
        m = run_training(tmp_path / "data", tmp_path / weighting, tiny_config(epochs=2, class_weighting=weighting))
        assert json.loads((tmp_path / weighting / "config.json").read_text())["training"]["class_weighting"] == weighting
        assert load_checkpoint(tmp_path / weighting / "checkpoint.pt")["train_config"]["class_weighting"] == weighting
        assert math.isfinite(m["test"]["loss"]) and m["data"]["counts"]["train"] == sum(counts["train"].values())
        losses[weighting] = [float(r["train_loss"]) for r in _history(tmp_path / weighting)]
    assert all(math.isfinite(v) for v in losses["balanced"])
    assert losses["balanced"] != losses["none"]  # the weights reached the loss


def test_auto_image_size_is_the_median_short_side_at_most_96(faces: Path, tmp_path: Path) -> None:
    from faceclf.config import auto_image_size

    assert [auto_image_size(m, 4) for m in (320, 96, 95, 64, 50, 10)] == [96, 96, 80, 64, 48, 16]
    assert auto_image_size(50, 2) == 48 and auto_image_size(30, 2) == 28
    cfg = tiny_config(epochs=1)
    cfg.data.image_size = "auto"
    metrics = run_training(faces, tmp_path / "run", cfg)  # the sample faces are 48 px: no upsampling to 96
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["image_size"] == saved["model"]["image_size"] == 48 and metrics["test"]["n"] > 0
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["image_size"] == 48
