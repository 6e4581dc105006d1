"""Warm start: a run begins from a published model's weights, only when classes and architecture match; a night
decides warm or cold from what it knows before training (faceclf.nightly.start)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import FAST, grouped, LENIENT, put_local_faces, tiny_config
from hypothesis import given, settings
from hypothesis import strategies as st
from test_cli import TINY, faceclf

from faceclf.config import ModelConfig
from faceclf.devtools.sample import generate_sample_faces
from faceclf.store import registry
from faceclf.store.objects import open_store
from faceclf.training.checkpoint import load_checkpoint
from faceclf.training.launch import run_training
from faceclf.training.warmstart import incompatibility


def test_incompatibility_names_what_differs(trained_run: Path) -> None:
    ckpt = load_checkpoint(trained_run / "checkpoint.pt")
    same = ModelConfig(**ckpt["model_config"])
    assert incompatibility(ckpt, ckpt["classes"], same) is None
    assert incompatibility(ckpt, ["a", "b", "c"], same) == \
        "its classes ['with_mask', 'without_mask'] differ from the data's ['a', 'b', 'c']"
    wider = ModelConfig(**{**ckpt["model_config"], "conv_channels": (8, 32)})
    assert incompatibility(ckpt, ckpt["classes"], wider) == "its architecture differs (conv_channels (8, 16) vs (8, 32))"


def test_a_warm_start_begins_from_the_given_weights(faces: Path, trained_run: Path, tmp_path: Path) -> None:
    """One warm epoch at a learning rate too small to move anything: the model is the one it started from."""
    cfg = tiny_config(epochs=1)
    cfg.training.learning_rate, cfg.training.init_from = 1e-12, str(trained_run / "checkpoint.pt")
    warm = run_training(faces, tmp_path / "warm", cfg)
    start = load_checkpoint(trained_run / "checkpoint.pt")
    assert warm["test"]["accuracy"] == start["metrics"]["test"]["accuracy"] >= 0.8
    cold = tiny_config(epochs=1)
    cold.training.learning_rate = 1e-12
    assert run_training(faces, tmp_path / "cold", cold)["test"]["accuracy"] < 0.8      # a random start is not
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["training"]["init_from"] == cfg.training.init_from


def test_the_cli_refuses_a_warm_start_from_other_classes_with_its_reason(trained_run: Path, tmp_path: Path) -> None:
    generate_sample_faces(tmp_path / "three", per_class=30, size=48, seed=4,
                          classes=("with_mask", "without_mask", "with_sunglasses"))
    out = faceclf("train", str(tmp_path / "three"), "--out", str(tmp_path / "run"), "--epochs", "1", *TINY,
                  "--init-from", str(trained_run / "checkpoint.pt"), check=False)
    assert out.returncode == 2, out.stderr
    assert "cannot warm-start from" in out.stderr and "its classes ['with_mask', 'without_mask'] differ from the " \
        "data's ['with_mask', 'with_sunglasses', 'without_mask']; train from scratch instead" in out.stderr
    assert not (tmp_path / "run" / "checkpoint.pt").exists()
    wrong = faceclf("train", str(tmp_path / "three"), "--out", str(tmp_path / "run"), "--init-from", "nope.pt",
                    check=False)
    assert wrong.returncode == 2 and "is neither a checkpoint file nor a model version" in wrong.stderr


def test_a_warm_night_fine_tunes_the_champion_and_the_cli_warm_starts_from_a_version(
        prefect_api, tmp_path: Path) -> None:
    from flows.train import train

    bucket = tmp_path / "bucket"

    def add(seed: int, per_class: int) -> None:
        put_local_faces(bucket, tmp_path / f"gen{seed}", per_class, seed)

    params = {"bucket": str(bucket), "face_dir": str(tmp_path / "face"), "runs_dir": str(tmp_path / "runs"),
              **LENIENT, **FAST}
    add(1, 60)
    first = train(**grouped(**{**params, "warm_start": True}))                # no champion yet: from scratch
    assert first["promoted"]
    add(2, 20)
    second = train(**grouped(**{**params, "warm_start": True, "warm_epochs": 2}))
    store = open_store(bucket)
    config = json.loads(store.get_bytes(registry.version_key(second["version"], "config.json")))
    assert config["training"]["init_from"] == first["version"] and config["training"]["epochs"] == 2
    history = store.get_bytes(registry.version_key(second["version"], "history.csv")).decode()
    assert history.count("\n") == 3                                  # a header and two warm epochs
    assert second["test_accuracy"] >= 0.75

    # From the command line: a model version of the registry, its checkpoint sha256-checked.
    night_model = ["--image-size", "32", "--channels", "8", "16", "--batch-size", "16", "--lr", "5e-3"]  # = FAST's
    out = faceclf("train", str(tmp_path / "gen1"), "--out", str(tmp_path / "cli"), "--epochs", "1", *night_model,
                  "--init-from", first["version"], "--bucket", str(bucket))
    assert json.loads(out.stdout)["test"]["accuracy"] >= 0.75
    assert torch.load(tmp_path / "cli" / "init.pt", weights_only=True)["version"] == first["version"]
    data = bytearray(store.get_bytes(registry.version_key(first["version"], "checkpoint.pt")))
    data[-1] ^= 0xFF
    (bucket / registry.version_key(first["version"], "checkpoint.pt")).write_bytes(bytes(data))
    tampered = faceclf("train", str(tmp_path / "gen1"), "--out", str(tmp_path / "cli2"), "--epochs", "1", *night_model,
                       "--init-from", first["version"], "--bucket", str(bucket), check=False)
    assert tampered.returncode == 2 and "refusing to use it" in tampered.stderr


def test_a_warm_night_keeps_the_champions_image_size_when_the_size_is_auto(faces: Path, tmp_path: Path) -> None:
    """image_size auto follows the data's median; a warm start must keep the size the champion's weights fit."""
    from faceclf.config import RunConfig
    from faceclf.dataset.discover import discover
    from faceclf.nightly.night import warm_start
    from faceclf.store.objects import LocalStore
    from faceclf.store.registry import ChampionRef, version_key

    store = LocalStore(tmp_path / "bucket")
    version = "20260101T000000Z-abcdef"
    store.put_bytes(version_key(version, "config.json"), json.dumps({"data": {"image_size": 32}}).encode())
    faceset = discover(faces, (0.8, 0.1, 0.1), 2)                    # 48 px faces: auto alone would say 48
    champion = ChampionRef(version, None, faceset.classes, {"version": version})
    cfg = warm_start(RunConfig(), champion, faceset, 3, store)
    assert (cfg.data.image_size, cfg.model.image_size, cfg.training.init_from, cfg.training.epochs) == (32, 32, version, 3)
    other = ChampionRef(version, None, ("a", "b"), {"version": version})
    assert warm_start(RunConfig(), other, faceset, 3, store).training.init_from is None   # other classes: scratch


# Warm or cold per night (issue 23): faceclf.nightly.start.

def test_warm_start_settings_parse_and_bad_ones_are_named() -> None:
    from faceclf.config import NightConfig, parse_warm_start

    assert [parse_warm_start(v) for v in (True, False, "auto", "TRUE", " false ", "Auto")] == \
        [True, False, "auto", True, False, "auto"]
    assert NightConfig().warm_start == "auto" and NightConfig(warm_start="false").warm_start is False
    for bad in ("maybe", 1, None):
        with pytest.raises(ValueError, match=f"warm_start must be auto, true or false, got {bad!r}"):
            parse_warm_start(bad)
    with pytest.raises(ValueError, match="warm_max_new_share must be in"):
        NightConfig(warm_max_new_share=1.5)


def test_new_share_is_what_the_champion_never_saw() -> None:
    from faceclf.nightly.start import new_share

    assert new_share(110, 100) == pytest.approx(10 / 110) and new_share(400, 100) == pytest.approx(0.75)
    assert new_share(100, 100) == 0.0 and new_share(90, 100) == 0.0            # never negative
    assert new_share(100, None) is None and new_share(100, 0) is None and new_share(0, 10) is None


def test_the_rule_says_warm_or_cold_with_its_reason() -> None:
    from faceclf.nightly.start import choose_start

    def choose(setting="auto", champion="v1", same=True, share=0.1, acc=0.97, stale=()):
        return choose_start(setting, champion, same, share, acc, stale, 5, 0.5)

    warm = choose()
    assert warm.warm and warm.reason == ("10% of tonight's images are new since champion v1 (at most max_new_share "
                                         "50%) and it scores 0.9700 on tonight's test split, above the gate's bars: "
                                         "fine-tuning it for 5 epochs")
    assert warm.to_dict()["new_share"] == 0.1 and warm.summary().startswith("warm: 10% of tonight's images")
    stale = choose(acc=0.609, stale=["accuracy 0.609 is below the minimum 0.9"])
    assert not stale.warm and stale.reason.startswith("champion v1 is below the gate's bars on tonight's test split "
                                                      "(accuracy 0.609 is below the minimum 0.9)")
    assert choose(share=0.72).reason == ("72% of tonight's images are new since champion v1 (more than "
                                         "max_new_share 50%): training from scratch")
    both = choose(share=0.72, acc=0.609, stale=["accuracy 0.609 is below the minimum 0.9"])
    assert both.reason.endswith(" and 72% of tonight's images are new since champion v1 (more than max_new_share "
                                "50%): training from scratch")                # every cause, one sentence
    assert not choose(share=None).warm and "is unknown" in choose(share=None).reason
    assert not choose(acc=None).warm and "could not be scored" in choose(acc=None).reason
    assert choose(champion=None).reason == "no champion yet: training from scratch"
    assert not choose(same=False).warm and "other classes" in choose(same=False).reason
    assert choose("false").reason == "warm_start=false: training from scratch" and not choose(False).warm
    forced = choose(True, share=0.9, stale=["x"])                    # true: warm whatever the figures say
    assert forced.warm and forced.setting == "true" and forced.reason.startswith("warm_start=true: fine-tuning")
    assert not choose(True, champion=None).warm                     # ... but never without a champion


shares = st.floats(0.0, 1.0, allow_nan=False)


@settings(deadline=None, max_examples=200)
@given(shares, shares, shares, st.one_of(st.none(), st.floats(0.0, 1.0)), st.booleans())
def test_the_rule_is_monotonic_in_the_share_of_new_images(a: float, b: float, limit: float, acc: float | None,
                                                          stale: bool) -> None:
    """More new images never turn a cold night warm; a higher limit never turns a warm night cold; in auto, warm
    exactly when the champion was scored, clears the bars and at most ``limit`` of the images are new."""
    from faceclf.nightly.start import choose_start

    low, high = sorted((a, b))
    why = ["accuracy 0.5 is below the minimum 0.9"] if stale else []

    def warm(share: float, max_share: float = limit) -> bool:
        choice = choose_start("auto", "v1", True, share, acc, why, 5, max_share)
        assert choice.reason and "\n" not in choice.reason
        return choice.warm

    assert warm(high) <= warm(low)
    assert warm(low, min(1.0, limit + 0.1)) >= warm(low)
    assert warm(low) == (not stale and acc is not None and low <= limit)


def test_the_night_reads_the_champions_images_and_judges_it_by_the_gates_bars(faces: Path, tmp_path: Path) -> None:
    from faceclf.config import GateConfig, NightConfig
    from faceclf.dataset.discover import discover
    from faceclf.nightly.start import champion_images, night_start
    from faceclf.store.objects import LocalStore
    from faceclf.store.registry import ChampionRef, version_key

    store = LocalStore(tmp_path / "bucket")
    faceset = discover(faces, (0.8, 0.1, 0.1), 2)                    # 120 images
    V1 = "20261101T020000Z-aaaaaa"
    champion = ChampionRef(V1, None, faceset.classes, {"version": V1})
    assert champion_images(store, champion) is None                  # no metrics.json: unknown, so cold
    store.put_bytes(version_key(V1, "metrics.json"),
                    json.dumps({"data": {"counts": {"train": 80, "val": 10, "test": 10}}}).encode())
    assert champion_images(store, champion) == 100
    good = {"accuracy": 0.95, "per_class_accuracy": {"with_mask": 0.95, "without_mask": 0.95}}
    bad = {"accuracy": 0.95, "per_class_accuracy": {"with_mask": 1.0, "without_mask": 0.8}}
    choice = night_start(store, NightConfig(), GateConfig(), champion, faceset, good)
    assert choice.warm and choice.new_share == pytest.approx(20 / 120) and choice.champion_accuracy == 0.95
    cold = night_start(store, NightConfig(), GateConfig(), champion, faceset, bad)
    assert not cold.warm and "class 'without_mask' accuracy 0.8 is below the minimum 0.85" in cold.reason
    assert night_start(store, NightConfig(), GateConfig(min_class_accuracy=0.6), champion, faceset, bad).warm
    assert not night_start(store, NightConfig(warm_max_new_share=0.1), GateConfig(), champion, faceset, good).warm
    nan = {"accuracy": float("nan"), "per_class_accuracy": {}}
    assert "could not be scored" in night_start(store, NightConfig(), GateConfig(), champion, faceset, nan).reason


def test_auto_nights_fine_tune_after_a_small_addition_and_start_cold_when_the_look_shifts(
        prefect_api, tmp_path: Path) -> None:
    """Night 1 (plain faces) has no champion: cold. Night 2 adds 10% more plain faces: the champion clears the bars
    on tonight's test split, so it is fine-tuned. Night 3 adds faces from another camera ('night' look, under half
    the set): the champion misses the bars on tonight's test split, so the night trains from scratch, and says
    why in its log, night.json, report.md and result."""
    from flows.train import train

    bucket, runs = tmp_path / "bucket", tmp_path / "runs"
    store = open_store(bucket)
    params = {"bucket": str(bucket), "face_dir": str(tmp_path / "face"), "runs_dir": str(runs), **LENIENT, **FAST,
              "warm_start": "auto", "warm_epochs": 3}
    put_local_faces(bucket, tmp_path / "gen1", 60, 1)
    first = train(**grouped(**params))
    assert first["promoted"] and first["start"]["reason"] == "no champion yet: training from scratch"

    put_local_faces(bucket, tmp_path / "gen2", 6, 2)                 # +10%, the same look
    second = train(**grouped(**params))
    begin = second["start"]
    assert begin["warm"] and begin["champion"] == first["version"], begin
    assert begin["new_share"] == pytest.approx(12 / 132) and begin["champion_accuracy"] >= LENIENT["min_accuracy"]
    config = json.loads(store.get_bytes(registry.version_key(second["version"], "config.json")))
    assert config["training"]["init_from"] == first["version"] and config["training"]["epochs"] == 3
    assert json.loads((runs / second["version"] / "night.json").read_text())["start"] == begin
    report = store.get_bytes(registry.version_key(second["version"], "report.md")).decode()
    assert f"| training start | warm: {begin['reason']} |" in report

    generate_sample_faces(tmp_path / "gen3", per_class=60, size=48, seed=3, look="night")   # another camera
    for p in sorted((tmp_path / "gen3").rglob("*.*")):
        (bucket / "incoming" / p.parent.name).mkdir(parents=True, exist_ok=True)
        (bucket / "incoming" / p.parent.name / f"night-{p.name}").write_bytes(p.read_bytes())
    third = train(**grouped(**params))
    shifted = third["start"]
    assert not shifted["warm"] and shifted["new_share"] < 0.5, shifted   # the share alone would have said warm
    champion = second["version"] if second["promoted"] else first["version"]
    assert shifted["champion"] == champion and shifted["champion_stale"], shifted
    assert shifted["reason"].startswith(f"champion {champion} is below the gate's bars on tonight's test split ("), \
        shifted
    assert shifted["champion_accuracy"] < begin["champion_accuracy"]
    config = json.loads(store.get_bytes(registry.version_key(third["version"], "config.json")))
    assert config["training"]["init_from"] is None and config["training"]["epochs"] == FAST["epochs"]
    assert json.loads((runs / third["version"] / "night.json").read_text())["start"]["warm"] is False
    print("small addition:", begin["reason"], "\nshifted night:", shifted["reason"])
