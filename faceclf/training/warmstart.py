"""Warm start: begin training from a published model's weights (the champion's, or any checkpoint) instead of
a random initialisation. Only a model of the same classes and the same architecture can be continued."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Sequence

import torch

from faceclf.config import ModelConfig
from faceclf.store.objects import Store
from faceclf.store.registry import VERSION_RE, verify_bytes, version_key
from faceclf.training.checkpoint import load_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"


def fetch_checkpoint(store: Store, version: str, dest: Path) -> Path:
    """Download ``version``'s checkpoint.pt to ``dest``, refused unless its sha256 is the one recorded
    when the version was published."""
    data = store.get_bytes(version_key(version, CHECKPOINT_FILE))
    verify_bytes(store, version, CHECKPOINT_FILE, data)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def resolve_init(source: str, store: Store | None, run_dir: Path) -> Path:
    """A checkpoint file for ``source``: a path to a checkpoint, or a model version of the registry
    (downloaded into run_dir/init.pt)."""
    path = Path(source)
    if path.is_file():
        return path
    if VERSION_RE.fullmatch(source):
        if store is None:
            raise ValueError(f"--init-from {source!r} names a model version: pass --bucket (or set FACECLF_BUCKET)")
        return fetch_checkpoint(store, source, run_dir / "init.pt")
    raise FileNotFoundError(f"--init-from {source!r} is neither a checkpoint file nor a model version "
                            "(like 20261124T020000Z-3fa2c1)")


def incompatibility(ckpt: dict[str, Any], classes: Sequence[str], model: ModelConfig) -> str | None:
    """Why the checkpoint's weights cannot start this run (classes or architecture differ), or None."""
    if list(ckpt["classes"]) != list(classes):
        return f"its classes {list(ckpt['classes'])} differ from the data's {list(classes)}"
    theirs = ModelConfig(**ckpt["model_config"])
    diff = [f"{f.name} {getattr(theirs, f.name)} vs {getattr(model, f.name)}" for f in dataclasses.fields(ModelConfig)
            if f.name != "dropout" and getattr(theirs, f.name) != getattr(model, f.name)]
    return f"its architecture differs ({'; '.join(diff)})" if diff else None


def init_weights(path: Path, classes: Sequence[str], model: ModelConfig) -> dict[str, torch.Tensor]:
    """The model weights of checkpoint ``path`` (loaded safely), after checking they fit this run;
    ValueError naming the difference otherwise."""
    ckpt = load_checkpoint(path)
    problem = incompatibility(ckpt, classes, model)
    if problem:
        raise ValueError(f"cannot warm-start from {path} (model {ckpt.get('version')}): {problem}; "
                         "train from scratch instead")
    log.info("warm start from %s (model %s, epoch %s)", path, ckpt.get("version"), ckpt.get("epoch"))
    return ckpt["model_state"]
