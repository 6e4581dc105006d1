"""The custom CNN: conv + ReLU + max-pool blocks, fully connected layers with dropout, LogSoftmax."""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from faceclf.config import ModelConfig


class FaceCNN(nn.Module):
    """Small CNN for face crops. Input (B, 3, S, S) normalised float; output (B, C) log-probabilities."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        blocks: list[nn.Module] = []
        c_in = cfg.in_channels
        for c_out in cfg.conv_channels:
            blocks += [
                nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=not cfg.batch_norm),
                nn.BatchNorm2d(c_out) if cfg.batch_norm else nn.Identity(),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),  # halves H and W
            ]
            c_in = c_out
        self.features = nn.Sequential(*blocks)
        side = cfg.image_size // 2 ** len(cfg.conv_channels)
        self.classifier = nn.Sequential(
            nn.Flatten(),                              # (B, C_last * side * side)
            nn.Dropout(cfg.dropout),
            nn.Linear(c_in * side * side, cfg.fc_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.fc_hidden, cfg.num_classes),
            nn.LogSoftmax(dim=1),                      # trained with NLLLoss
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build_model(cfg: ModelConfig) -> FaceCNN:
    """Build the CNN from its config (the same config stored in checkpoints)."""
    return FaceCNN(cfg)


def model_config_from_dict(d: dict) -> ModelConfig:
    """ModelConfig from a checkpoint's plain dict, refusing unknown fields."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"checkpoint model_config has unknown fields {sorted(unknown)}")
    return ModelConfig(**d)
