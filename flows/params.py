"""The flows' parameters: one pydantic model per concern, derived from faceclf.config's dataclasses.

Each model has the fields of its config dataclass with the same defaults and help texts, so the Prefect UI shows
one form per concern (data, model, training, gate, drift, night, quantization; scoring) and no parameter is
listed by hand. A group left out keeps every default; a group given replaces that group, its fields left out
keeping theirs:

    prefect deployment run train/face --param gate='{"min_accuracy": 0.95}' --param training='{"epochs": 5}'

A misspelt field is refused by name (extra="forbid"); a value out of range by the config's own check when the
flow builds it. Parameters of the flat form the flows had before (``min_accuracy``, ``drift_size_ks``...) fail
the run with the new place of each (``refuse_old_parameters``).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, create_model

from faceclf.config import (
    DataConfig,
    DriftConfig,
    GateConfig,
    Int8Config,
    ModelConfig,
    MonitorConfig,
    NightConfig,
    RunConfig,
    ScoreConfig,
    TrainConfig,
    WatchConfig,
    with_overrides,
)

# Fields that are no flow parameter: the model's shape follows the data, and a night's warm start is its own
# rule (night.warm_start), not a checkpoint named by hand.
NOT_PARAMETERS: dict[type, tuple[str, ...]] = {ModelConfig: ("num_classes", "image_size", "in_channels"),
                                               TrainConfig: ("init_from",)}


def params_model(config: type, name: str) -> type[BaseModel]:
    """A pydantic model with the fields of the dataclass ``config`` (types, defaults, help texts as
    descriptions) but those in NOT_PARAMETERS; unknown fields are refused."""
    hints = typing.get_type_hints(config)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        if f.name in NOT_PARAMETERS.get(config, ()):
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        fields[f.name] = (hints[f.name], Field(default, description=f.metadata["help"]))
    return create_model(name, __doc__=config.__doc__, __config__=ConfigDict(extra="forbid"), __module__=__name__,
                        **fields)


DataParams = params_model(DataConfig, "DataParams")
ModelParams = params_model(ModelConfig, "ModelParams")
TrainingParams = params_model(TrainConfig, "TrainingParams")
GateParams = params_model(GateConfig, "GateParams")
DriftParams = params_model(DriftConfig, "DriftParams")
NightParams = params_model(NightConfig, "NightParams")
QuantizationParams = params_model(Int8Config, "QuantizationParams")
ScoringParams = params_model(ScoreConfig, "ScoringParams")
WatchParams = params_model(WatchConfig, "WatchParams")
MonitorParams = params_model(MonitorConfig, "MonitorParams")

TRAIN_GROUPS: dict[str, type[BaseModel]] = {"data": DataParams, "model": ModelParams, "training": TrainingParams,
                                             "gate": GateParams, "drift": DriftParams, "night": NightParams,
                                             "quantization": QuantizationParams}
SCORE_GROUPS: dict[str, type[BaseModel]] = {"scoring": ScoringParams, "monitor": MonitorParams}
WATCH_GROUPS: dict[str, type[BaseModel]] = {"watch": WatchParams}
OLD_PREFIXES = {"drift": "drift_", "quantization": "int8_"}  # the flat names had these prefixes


def config_of(params: BaseModel, config: type) -> Any:
    """The config dataclass ``config`` from its parameter group (validated by the dataclass: ValueError)."""
    return config(**params.model_dump())


def run_config_of(data: BaseModel, model: BaseModel, training: BaseModel) -> RunConfig:
    """The RunConfig the data, model and training groups describe (image_size is both the data's and the
    model's)."""
    return with_overrides(RunConfig(), **data.model_dump(), **model.model_dump(), **training.model_dump())


def new_places(groups: dict[str, type[BaseModel]]) -> dict[str, str]:
    """Each flat parameter name of the old form -> its place now, "group.field"."""
    places: dict[str, str] = {}
    for group, model in groups.items():
        for name in model.model_fields:
            places.setdefault(OLD_PREFIXES.get(group, "") + name, f"{group}.{name}")
            places.setdefault(name, f"{group}.{name}")
    return places


def moved_parameters(old: dict[str, Any], groups: dict[str, type[BaseModel]], flow: str) -> str | None:
    """None when ``old`` is empty; else why the run stops: each old flat parameter and its place now (or that
    the flow has no such parameter), with the override form."""
    if not old:
        return None
    places = new_places(groups)
    lines = [f"{name} is now {places[name]}" if name in places else f"{name} is not a parameter of the {flow} flow"
             for name in sorted(old)]
    example = next((places[n] for n in sorted(old) if n in places), None)
    hint = ""
    if example:
        group, field = example.split(".")
        hint = f"; pass e.g. --param {group}='{{\"{field}\": ...}}'"
    return (f"the {flow} flow takes its settings grouped by concern ({', '.join(groups)}): "
            + "; ".join(lines) + hint)


def refuse_old_parameters(flow: Any, groups: dict[str, type[BaseModel]]) -> Any:
    """``flow`` (a Prefect flow), its function now also taking the old flat parameters by name, only to fail the
    run with ``moved_parameters``' message. Prefect binds a deployment's stored parameters to ``flow.fn`` before
    the flow starts (an unknown name would crash the run with a bare signature mismatch), while the parameter
    schema the UI shows comes from the function as written (``flow.__wrapped__``): so deployed nights that still
    hold the old names get the clear error, and the forms show the groups alone."""
    fn = flow.fn
    signature = inspect.signature(fn)
    old = sorted(set(new_places(groups)) - set(signature.parameters))

    @functools.wraps(fn)
    def with_old_names(*args: Any, **kwargs: Any) -> Any:
        given = {name: kwargs.pop(name) for name in old if name in kwargs}
        moved = moved_parameters({k: v for k, v in given.items() if v is not None}, groups, flow.name)
        if moved:
            raise ValueError(moved)
        return fn(*args, **kwargs)

    with_old_names.__signature__ = signature.replace(parameters=[  # type: ignore[attr-defined]
        *signature.parameters.values(), *(inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
                                          for n in old)])
    flow.fn = with_old_names
    return flow
