"""Checkpoints: written atomically, loaded with weights_only (no pickled code runs), the model rebuilt from them."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from faceclf.store.atomic import write_atomic
from faceclf.training.model import FaceCNN, build_model, model_config_from_dict

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict as contiguous CPU tensors, so a checkpoint loads on any machine."""
    return {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """torch.save to a temp file, then os.replace: the previous file stays whole if this dies."""
    write_atomic(path, lambda p: torch.save(payload, p))


def _one_line(e: BaseException) -> str:
    """torch's weights_only refusal spans many lines (with ANSI codes): keep what was refused, on one line."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))
    m = re.search(r"WeightsUnpickler error:\s*(.*?)\s*(?:Please use|Check the documentation|$)", text, re.S)
    return " ".join((m.group(1) if m and m.group(1).strip() else text).split()) or type(e).__name__


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint with weights_only=True (no pickled code runs) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises UnpicklingError/RuntimeError for unsafe or broken files
        raise ValueError(f"checkpoint {str(path)!r} cannot be loaded safely (weights_only): {_one_line(e)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CHECKPOINT_FORMAT:
        found = ckpt.get("format_version") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"checkpoint {str(path)!r} has format {found!r}, expected {CHECKPOINT_FORMAT}")
    return ckpt


def model_from_checkpoint(ckpt: dict[str, Any], device: torch.device | str = "cpu") -> FaceCNN:
    """Rebuild the CNN from the config stored in the checkpoint and load its weights (eval mode)."""
    model = build_model(model_config_from_dict(ckpt["model_config"]))
    model.load_state_dict(ckpt["model_state"])
    return model.to(device).eval()
