"""Progress bars for long work: shown on a terminal, silent in logs and CI (disable=None)."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm


def progress(*args: Any, **kwargs: Any) -> tqdm:
    """tqdm with faceclf's defaults: off when stderr is not a terminal, sized to the terminal."""
    kwargs.setdefault("disable", None)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(*args, **kwargs)
