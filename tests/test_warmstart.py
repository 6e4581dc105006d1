"""Warm start: a run begins from a published model's weights, only when classes and architecture match."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import FAST, LENIENT, put_local_faces, tiny_config
from test_cli import TINY, faceclf

from faceclf.config import ModelConfig
from faceclf.devtools.sample import generate_sample_faces
from faceclf.store import registry
from faceclf.store.objects import open_store
from faceclf.training.checkpoint import load_checkpoint
from faceclf.training.run import train_run
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
    cfg.train.learning_rate, cfg.train.init_from = 1e-12, str(trained_run / "checkpoint.pt")
    warm = train_run(faces, tmp_path / "warm", cfg)
    start = load_checkpoint(trained_run / "checkpoint.pt")
    assert warm["test"]["accuracy"] == start["metrics"]["test"]["accuracy"] >= 0.8
    cold = tiny_config(epochs=1)
    cold.train.learning_rate = 1e-12
    assert train_run(faces, tmp_path / "cold", cold)["test"]["accuracy"] < 0.8      # a random start is not
    assert json.loads((tmp_path / "warm" / "config.json").read_text())["train"]["init_from"] == cfg.train.init_from


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
    first = train(**{**params, "warm_start": True})                # no champion yet: from scratch
    assert first["promoted"]
    add(2, 20)
    second = train(**{**params, "warm_start": True, "warm_epochs": 2})
    store = open_store(bucket)
    config = json.loads(store.get_bytes(registry.version_key(second["version"], "config.json")))
    assert config["train"]["init_from"] == first["version"] and config["train"]["epochs"] == 2
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
    assert (cfg.data.image_size, cfg.model.image_size, cfg.train.init_from, cfg.train.epochs) == (32, 32, version, 3)
    other = ChampionRef(version, None, ("a", "b"), {"version": version})
    assert warm_start(RunConfig(), other, faceset, 3, store).train.init_from is None   # other classes: scratch
