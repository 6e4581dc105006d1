"""Drift on arrival: new images unlike the train split (darker, one class only) are flagged in the report
before training, and fail_on_drift stops the night there (real flow, local bucket, real images)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import FAST, grouped, LENIENT, put_local_faces
from PIL import Image, ImageEnhance

from faceclf.config import DriftConfig
from faceclf.nightly.drift import DriftDetected, DriftReport, flags, ks_statistic
from faceclf.store import registry
from faceclf.store.objects import LocalStore


def test_ks_statistic_and_flags() -> None:
    a = np.arange(100, dtype=float)
    assert ks_statistic(a, a) == 0.0 and ks_statistic(a, a + 1000) == 1.0 and ks_statistic(a, np.array([])) is None
    assert ks_statistic(a, a + 50) == pytest.approx(0.5)
    quiet = DriftReport(10, 100, {"a": {"new": 0.5, "train": 0.5}}, 0.0, 0.1, 0.1, {"new": 120, "train": 118}, 0.9, 0.95)
    assert flags(quiet, DriftConfig()) == []
    loud = DriftReport(10, 100, {"a": {"new": 0.9, "train": 0.5}}, 0.4, 0.5, 0.8, {"new": 40, "train": 118}, 0.5, 0.95)
    got = flags(loud, DriftConfig())
    assert len(got) == 4 and got[0].startswith("class balance moved: 'a' is 90%") and "brightness moved" in got[2]
    assert "the champion gets 50.0% of the new images right against 95.0%" in got[3]


def darken(bucket: Path, seed: int, only: str) -> int:
    """Keep only class ``only`` of the faces put with ``seed``, each at a quarter of its brightness."""
    n = 0
    for p in sorted((bucket / "incoming").rglob(f"s{seed}-*")):
        if p.parent.name != only:
            p.unlink()
            continue
        with Image.open(p) as img:
            dark = ImageEnhance.Brightness(img.convert("RGB")).enhance(0.25)
        dark.save(p, format="PNG" if p.suffix.lower() == ".png" else "JPEG")
        n += 1
    return n


def test_a_drifted_night_is_flagged_and_fail_on_drift_stops_it(prefect_api, tmp_path: Path) -> None:
    from flows.train import train

    bucket = tmp_path / "bucket"
    store = LocalStore(bucket)
    kw = {"bucket": str(bucket), "face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs"),
          **LENIENT, **FAST}
    put_local_faces(bucket, tmp_path / "gen", 60, 1)
    night1 = train(**grouped(**kw))
    assert night1["promoted"]
    drift1 = json.loads(store.get_bytes(registry.version_key(night1["version"], "drift.json")))
    assert drift1["reference_images"] == 0 and drift1["flags"] == []  # the first night has nothing to compare with

    # Night 2: darker faces of one class only. Flagged in the report; the night trains (fail_on_drift off).
    put_local_faces(bucket, tmp_path / "gen2", 30, 2)
    assert darken(bucket, 2, "with_mask") > 0
    night2 = train(**grouped(**kw))
    assert not night2["skipped"]
    report = store.get_bytes(registry.version_key(night2["version"], "report.md")).decode()
    assert "## Drift on arrival" in report and "**moved:** brightness moved" in report
    assert "**moved:** class balance moved: 'with_mask' is 100% of the new images" in report
    drift2 = json.loads(store.get_bytes(registry.version_key(night2["version"], "drift.json")))
    assert drift2["brightness_mean"]["new"] < 0.5 * drift2["brightness_mean"]["train"]
    assert drift2["champion_accuracy_new"] is not None and drift2["new_images"] > 0
    champion = registry.read_champion(store)["version"]

    # Night 3: more of the same with fail_on_drift: stopped before training, nothing published.
    put_local_faces(bucket, tmp_path / "gen3", 30, 3)
    assert darken(bucket, 3, "with_mask") > 0
    with pytest.raises(DriftDetected, match="brightness moved") as stopped:
        train(**grouped(**kw, fail_on_drift=True))
    assert "nothing trained" in str(stopped.value) and "class balance moved" in str(stopped.value)
    assert registry.read_champion(store)["version"] == champion
    assert registry.read_latest(store)["version"] == night2["version"]
