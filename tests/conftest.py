"""Shared fixtures: a tiny generated face set on disk and a small config that trains in seconds."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from faceclf.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from faceclf.sample import generate_sample_faces

REPO = Path(__file__).resolve().parents[1]
SHARED_FACES = REPO.parent / "shared" / "datasets" / "face-mask"


def tiny_config(epochs: int = 4, **train: object) -> RunConfig:
    """32x32 inputs, a 2-block CNN: enough to learn the sample faces in a few CPU seconds."""
    return RunConfig(
        data=DataConfig(image_size=32, decode_workers=2),
        model=ModelConfig(image_size=32, conv_channels=(8, 16), fc_hidden=32, dropout=0.1),
        train=TrainConfig(epochs=epochs, batch_size=16, learning_rate=5e-3, patience=10, **train),
    )


@pytest.fixture(scope="session")
def faces(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Class folders with 60 generated faces each (48x48, JPEG and PNG) plus 3 exact duplicates."""
    root = tmp_path_factory.mktemp("faces")
    generate_sample_faces(root, per_class=60, size=48, seed=1)
    for i, src in enumerate(sorted((root / "with_mask").glob("*.jpg"))[:3]):
        shutil.copy(src, root / "with_mask" / f"copy_{i}.jpg")  # byte-identical: must be dropped
    return root


@pytest.fixture(scope="session")
def trained_run(faces: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished training run on ``faces`` (shared by export/score/evaluate tests; do not modify)."""
    from faceclf.pipeline import train_run

    run = tmp_path_factory.mktemp("run")
    train_run(faces, run, tiny_config(epochs=6))
    return run
