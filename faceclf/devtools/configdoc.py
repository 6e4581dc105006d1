"""The configuration reference (docs/pages/reference/configuration.md), generated from faceclf.config.

    render() -> markdown: per section of faceclf.config.SECTIONS, its dataclass's docstring, where it is set,
                and one row per field: name, type, default, command-line flag (where it has one), help text

The documentation build writes it into the site (docs/hooks.py), so the page cannot drift from the code: a
field added, renamed or given a new default shows there at the next build. Nothing here is kept by hand.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from typing import Any

from faceclf import config

# Defaults computed on the machine that imports faceclf.config: said as such, with this machine's value.
_MACHINE_DEFAULTS = {"decode_workers": "one per usable core"}


def sections() -> dict[str, tuple[type, str]]:
    """name -> (config dataclass, where it is set), in the reference's order: faceclf.config.SECTIONS."""
    return dict(config.SECTIONS)


def default_of(f: dataclasses.Field) -> Any:
    """The field's default value (a default_factory called), or dataclasses.MISSING."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def format_default(value: Any) -> str:
    """A default as JSON, the form RUN/config.json and flow parameters take (tuples as lists)."""
    if value is dataclasses.MISSING:
        return "required"
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    return json.dumps(config.json_ready(value))


def format_type(hint: Any) -> str:
    """``int | str``, ``tuple[int, ...]``, ``str | None``: as written in faceclf.config."""
    if hint is type(None):
        return "None"
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return " | ".join(format_type(a) for a in typing.get_args(hint))
    if typing.get_origin(hint) is not None:
        args = ", ".join("..." if a is Ellipsis else format_type(a) for a in typing.get_args(hint))
        return f"{typing.get_origin(hint).__name__}[{args}]"
    return getattr(hint, "__name__", str(hint))


def docstring(cls: type) -> str:
    """The dataclass's own docstring (not the signature dataclasses writes when there is none)."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(cls.__name__ + "(") else doc


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (MkDocs' tables: a | in plain text is escaped, see _code)."""
    return " ".join(text.split()).replace("|", "\\|")


def _code(text: str) -> str:
    """Text as a code span in a table cell: MkDocs' tables leave a | between backticks alone."""
    return f"`{' '.join(text.split())}`"


def field_rows(cls: type) -> list[str]:
    """One markdown table row per field of the dataclass ``cls``."""
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _code(format_default(default_of(f)))
        if f.name in _MACHINE_DEFAULTS:
            default += f" ({_MACHINE_DEFAULTS[f.name]} of the machine that built this page)"
        flag = config.option_flag(f)
        rows.append(f"| {_code(f.name)} | {_code(format_type(hints.get(f.name, f.type)))} | {default} | "
                    f"{_code(flag) if flag else ''} | {_cell(f.metadata.get('help') or '')} |")
    return rows


def render() -> str:
    """The configuration reference page, as markdown."""
    lines = [
        "# Configuration reference",
        "",
        "Generated from `faceclf/config.py` when the site is built (`faceclf.devtools.configdoc`), so it lists "
        "exactly what the code has. Defaults are written as JSON, the form `RUN/config.json` and the Prefect flows' "
        "parameters take. A flag is shown where `faceclf` has one; a bool that defaults to true is turned off by "
        "its `--no-` flag.",
        "",
        "A train flow parameter group replaces that group: fields left out keep the defaults below, e.g. "
        "`prefect deployment run train/face --param gate='{\"min_accuracy\": 0.95}' "
        "--param training='{\"epochs\": 5}'`.",
        "",
    ]
    for name, (cls, where) in sections().items():
        lines += [f"## {name}", "", f"`faceclf.config.{cls.__name__}`", ""]
        doc = docstring(cls)
        if doc:
            lines += [doc, ""]
        lines += [f"Set by: {where}", "",
                  "| field | type | default | flag | what it does |",
                  "| --- | --- | --- | --- | --- |",
                  *field_rows(cls), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    print(render())
