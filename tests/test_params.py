"""The flows' parameters are the config: one model per concern, derived from faceclf.config (flows/params.py)."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prefect.utilities.callables import parameter_schema
from pydantic import ValidationError

from faceclf.config import (
    DriftConfig,
    GateConfig,
    NightConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    is_option,
    with_overrides,
)
from flows.params import (
    NOT_PARAMETERS,
    SCORE_GROUPS,
    TRAIN_GROUPS,
    WATCH_GROUPS,
    GateParams,
    config_of,
    moved_parameters,
    new_places,
    run_config_of,
)

CONFIGS = {"data": "DataConfig", "model": "ModelConfig", "training": "TrainConfig", "gate": "GateConfig",
           "drift": "DriftConfig", "night": "NightConfig", "quantization": "Int8Config", "scoring": "ScoreConfig",
           "monitor": "MonitorConfig", "watch": "WatchConfig"}


def test_every_group_has_its_configs_fields_defaults_and_help_texts() -> None:
    import faceclf.config as config

    for group, model in {**TRAIN_GROUPS, **SCORE_GROUPS, **WATCH_GROUPS}.items():
        cls = getattr(config, CONFIGS[group])
        expected = [f for f in dataclasses.fields(cls) if f.name not in NOT_PARAMETERS.get(cls, ())]
        assert list(model.model_fields) == [f.name for f in expected], group
        for f in expected:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            assert model.model_fields[f.name].default == default, (group, f.name)
            assert model.model_fields[f.name].description == f.metadata["help"] and f.metadata["help"], (group, f.name)
        assert config_of(model(), cls) == cls()  # a group left out: every default


def test_the_defaults_build_the_configs_the_flow_had() -> None:
    p = TRAIN_GROUPS
    # the flow always set image_size in both parts ("auto" until the night resolves it)
    assert run_config_of(p["data"](), p["model"](), p["training"]()) == with_overrides(RunConfig(), image_size="auto")
    assert config_of(p["gate"](), GateConfig) == GateConfig() and config_of(p["night"](), NightConfig) == NightConfig()
    assert config_of(SCORE_GROUPS["scoring"](), ScoreConfig) == ScoreConfig()


def test_a_group_given_in_part_keeps_the_other_defaults_and_refuses_unknown_fields() -> None:
    gate = GateParams.model_validate({"min_accuracy": 0.95})
    assert config_of(gate, GateConfig) == dataclasses.replace(GateConfig(), min_accuracy=0.95)
    with pytest.raises(ValidationError, match="min_accurcy"):
        GateParams.model_validate({"min_accurcy": 0.95})
    cfg = run_config_of(TRAIN_GROUPS["data"].model_validate({"image_size": 32}), TRAIN_GROUPS["model"].model_validate(
        {"conv_channels": [8, 16]}), TRAIN_GROUPS["training"].model_validate({"epochs": 3}))
    assert (cfg.data.image_size, cfg.model.image_size, cfg.model.conv_channels, cfg.training.epochs) == (32, 32, (8, 16), 3)
    with pytest.raises(ValueError, match="min_accuracy must be in"):  # the config's own range check
        config_of(GateParams.model_validate({"min_accuracy": 1.5}), GateConfig)


def test_the_prefect_ui_form_is_grouped_with_help_texts() -> None:
    from flows.score import score
    from flows.train import train

    schema = parameter_schema(train).model_dump()
    assert list(schema["properties"]) == ["bucket", "face_dir", "runs_dir", *TRAIN_GROUPS]  # no old name in the form
    gate = schema["definitions"]["GateParams"]
    assert gate["properties"]["min_accuracy"]["description"].startswith("overall test accuracy")
    assert gate["properties"]["min_accuracy"]["default"] == GateConfig().min_accuracy
    assert list(parameter_schema(score).model_dump()["properties"]) == \
        ["bucket", "source", "version", "output", "incremental", "int8", "scoring", "monitor"]
    from flows.watch import watch

    assert list(parameter_schema(watch).model_dump()["properties"]) == ["bucket", "cache_dir", "watch"]


@given(st.sampled_from(sorted(new_places(TRAIN_GROUPS))))
def test_every_old_flat_name_is_told_its_new_place(name: str) -> None:
    message = moved_parameters({name: 1}, TRAIN_GROUPS, "train")
    group, field = new_places(TRAIN_GROUPS)[name].split(".")
    assert f"{name} is now {group}.{field}" in message and group in TRAIN_GROUPS
    assert field in TRAIN_GROUPS[group].model_fields


def test_the_old_flat_names_map_to_their_groups() -> None:
    places = new_places(TRAIN_GROUPS)
    assert places["min_accuracy"] == "gate.min_accuracy" and places["drift_size_ks"] == "drift.size_ks"
    assert places["fail_on_drift"] == "drift.fail_on_drift" and places["int8_min_agreement"] == "quantization.min_agreement"
    assert places["int8"] == "night.int8" and places["batch_size"] == "training.batch_size"
    assert places["epochs"] == "training.epochs" and places["conv_channels"] == "model.conv_channels"
    assert moved_parameters({}, TRAIN_GROUPS, "train") is None
    assert "colour is not a parameter of the train flow" in moved_parameters({"colour": 1}, TRAIN_GROUPS, "train")
    assert "batch_size is now scoring.batch_size" in moved_parameters({"batch_size": 8}, SCORE_GROUPS, "score")
    assert all(is_option(f) or f.name in NOT_PARAMETERS.get(TrainConfig, ()) for f in dataclasses.fields(TrainConfig))
    assert DriftConfig().size_ks == TRAIN_GROUPS["drift"]().size_ks


def test_a_flow_called_with_old_flat_parameters_fails_naming_the_new_places() -> None:
    from flows.score import score
    from flows.train import train

    # the flows' own bodies, first thing (tests/test_e2e.py sends them to a deployment through a real server)
    with pytest.raises(ValueError, match=r"min_accuracy is now gate\.min_accuracy.*--param gate="):
        train.fn(min_accuracy=0.95)
    with pytest.raises(ValueError, match=r"ray_address is now scoring\.ray_address"):
        score.fn(ray_address="local")
