"""The custom CNN."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from faceclf.config import ModelConfig
from faceclf.training.model import build_model, model_config_from_dict


@pytest.mark.parametrize("classes", [2, 3])
def test_output_is_log_probabilities(classes: int) -> None:
    model = build_model(ModelConfig(num_classes=classes, image_size=32, conv_channels=(8, 16))).eval()
    out = model(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, classes)
    torch.testing.assert_close(out.exp().sum(1), torch.ones(5))


def test_has_the_seed_building_blocks() -> None:
    kinds = {type(m) for m in build_model(ModelConfig()).modules()}
    assert {nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Linear, nn.Dropout, nn.LogSoftmax} <= kinds


def test_bad_config_names_the_problem() -> None:
    with pytest.raises(ValueError, match="image_size 100 must be a multiple of 16"):
        ModelConfig(image_size=100, conv_channels=(8, 16, 32, 64))
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        ModelConfig(num_classes=1)
    with pytest.raises(ValueError, match="unknown fields"):
        model_config_from_dict({"num_classes": 2, "layers": 9})
