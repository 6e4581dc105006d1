"""A training run is planned once (faceclf.training.plan): every "auto" resolved, saved, then only executed."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from faceclf.config import IMBALANCE_RATIO, RunConfig, with_overrides
from faceclf.dataset.discover import discover
from faceclf.training.plan import CONFIG_FILE, PLAN_FILE, engine_for, plan_run, weighting_for
from conftest import tiny_config
from test_cli import TINY, faceclf


class Counts:
    """The one FaceSet method weighting_for reads."""

    def __init__(self, train: dict[str, int]) -> None:
        self.train = train

    def counts(self) -> dict[str, dict[str, int]]:
        return {"train": self.train}


@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=6))
def test_auto_class_weighting_is_balanced_exactly_when_the_largest_class_outnumbers_the_smallest(counts: list[int]) -> None:
    faceset = Counts({f"c{i}": n for i, n in enumerate(counts)})
    expected = "balanced" if max(counts) > IMBALANCE_RATIO * max(1, min(counts)) else "none"
    assert weighting_for(faceset, "auto") == expected  # type: ignore[arg-type]
    assert weighting_for(faceset, "none") == "none" and weighting_for(faceset, "balanced") == "balanced"  # type: ignore[arg-type]


def test_a_plan_resolves_every_auto_once_and_is_saved_beside_the_outputs(faces: Path, tmp_path: Path) -> None:
    cfg = with_overrides(tiny_config(epochs=1), image_size="auto", device="auto", class_weighting="auto")
    faceset = discover(faces, cfg.data.split_fractions)
    plan = plan_run(faceset, tmp_path / "run", cfg)
    resolved = plan.cfg
    assert resolved.data.image_size == resolved.model.image_size == 48  # the sample faces' short side, /4 blocks
    assert resolved.training.device == "cpu" and resolved.training.class_weighting == "none"
    assert resolved.model.num_classes == len(faceset.classes) == 2 and plan.engine == "process" and plan.workers == 1
    assert plan.fingerprint == faceset.fingerprint() and plan.version and not plan.resume
    assert RunConfig.from_dict(json.loads((tmp_path / "run" / CONFIG_FILE).read_text())) == resolved
    saved = json.loads((tmp_path / "run" / PLAN_FILE).read_text())
    assert saved["fingerprint"] == plan.fingerprint and saved["classes"] == list(faceset.classes)
    assert saved["image_size"] == 48 and saved["engine"] == "process" and saved["counts"] == faceset.counts()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.engine = "ray"  # type: ignore[misc]
    plan.cfg.training.epochs = 99  # a caller's copy: the plan's own config never changes
    assert plan.cfg.training.epochs == 1 and plan.cfg == resolved
    assert cfg.data.image_size == "auto"  # nor does the caller's


def test_engines_follow_the_workers_and_the_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FACECLF_RAY_ADDRESS", raising=False)
    assert engine_for(tiny_config(), resume=False) == "process"
    assert engine_for(with_overrides(tiny_config(), workers=2), resume=False) == "torchrun"
    assert engine_for(with_overrides(tiny_config(), ray_address="local"), resume=False) == "ray"
    with pytest.raises(ValueError, match="--resume is not supported with a Ray address"):
        engine_for(with_overrides(tiny_config(), ray_address="local"), resume=True)
    monkeypatch.setenv("FACECLF_RAY_ADDRESS", "127.0.0.1:6379")
    assert engine_for(tiny_config(), resume=False) == "ray"


def test_faceclf_train_config_replays_a_run(faces: Path, tmp_path: Path) -> None:
    first, replay = tmp_path / "first", tmp_path / "replay"
    faceclf("train", str(faces), "--out", str(first), "--epochs", "2", "--seed", "3", *TINY)
    faceclf("train", str(faces), "--out", str(replay), "--config", str(first / "config.json"))
    assert json.loads((replay / "config.json").read_text()) == json.loads((first / "config.json").read_text())
    def losses(run: Path) -> list[list[str]]:  # history.csv without its wall-clock column
        return [row.split(",")[:-1] for row in (run / "history.csv").read_text().splitlines()]

    assert losses(replay) == losses(first) and len(losses(first)) == 3  # the same run again
    assert (json.loads((replay / "metrics.json").read_text())["test"]
            == json.loads((first / "metrics.json").read_text())["test"])
    both = faceclf("train", str(faces), "--out", str(tmp_path / "x"), "--config", str(first / "config.json"),
                   "--epochs", "5", check=False)
    assert both.returncode != 0 and "leave out --epochs" in both.stderr, both.stderr
    missing = faceclf("train", str(faces), "--out", str(tmp_path / "y"), "--config", str(tmp_path / "no.json"),
                      check=False)
    assert missing.returncode != 0 and "no such file" in missing.stderr, missing.stderr
