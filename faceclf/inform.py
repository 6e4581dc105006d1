"""Steps that only inform never fail a night.

A night's deciding steps (ingest, train, evaluate, gate, export, moving the registry) may fail it. Its
informing steps (plots, Prefect artifacts, presigned links, notifications, the drift section) may not: a
model the night earned is published whatever a plot does. ``Warnings.attempt`` runs such a step; a failure
becomes one line, logged as a warning and kept for the top of report.md, and the night goes on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Warnings:
    """The failures of a night's informing steps, in the order they happened (each message once)."""

    def __init__(self, items: Iterable[str] = ()) -> None:
        self.items: list[str] = list(dict.fromkeys(items))

    def add(self, message: str) -> None:
        """Keep ``message`` (once) and log it as a warning."""
        if message not in self.items:
            self.items.append(message)
            log.warning("%s; the night goes on (this step only informs)", message)

    def attempt(self, what: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None when it raised: then '<what> failed: <Error>: <message>' is kept.

        Only Exception is caught: a KeyboardInterrupt or a killed process still ends the night.
        """
        try:
            return fn(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - an informing step never decides a night's outcome
            self.add(f"{what} failed: {type(err).__name__}: {err}")
            return None


def with_warnings(report_md: str, warnings: Iterable[str]) -> str:
    """``report_md`` with a warnings block right under its title (its first line); unchanged without warnings."""
    items = list(warnings)
    if not items:
        return report_md
    title, _, body = report_md.partition("\n")
    block = [f"> **Warning:** {len(items)} step(s) that only inform failed; the night went on without them.",
             *[f"> - {w}" for w in items]]
    return "\n".join([title, "", *block, body])
