"""A night's run folder and its state: started, published, or left unfinished for a rerun to resume."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faceclf.store.atomic import write_json_atomic

NIGHT_FILE = "night.json"          # in a run folder: the night's config and data fingerprint
PUBLISHED_FILE = "published.json"  # in a run folder: written once the version is uploaded (and promoted)


@dataclass(frozen=True)
class NightRun:
    """Tonight's run: its folder and model version; ``resume`` when it continues an unfinished run,
    ``trained`` when that run had already finished training and test evaluation (metrics.json exists)."""

    run_dir: Path
    version: str
    resume: bool = False
    trained: bool = False


def start_run(runs_dir: Path, version: str, cfg: dict[str, Any], fingerprint: str,
              start: dict[str, Any] | None = None) -> NightRun:
    """Create the run folder and record what the night trains on (for a rerun to recognise it) and ``start``:
    how its training starts, warm or cold, and why (faceclf.nightly.start.StartChoice.to_dict())."""
    run_dir = runs_dir / version
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / NIGHT_FILE, {"version": version, "config": cfg, "fingerprint": fingerprint,
                                             **({"start": start} if start is not None else {})})
    return NightRun(run_dir, version)


def find_pending_run(runs_dir: Path, cfg: dict[str, Any] | None, fingerprint: str) -> NightRun | None:
    """The newest run that was not published and was started with the same config (``cfg`` None: any config)
    on the same data."""
    if not runs_dir.is_dir():
        return None
    for run_dir in sorted((p for p in runs_dir.iterdir() if (p / NIGHT_FILE).is_file()), reverse=True):
        if (run_dir / PUBLISHED_FILE).is_file():
            return None  # the newest night finished; older unfinished ones are stale
        night = read_json(run_dir / NIGHT_FILE)
        trained = (run_dir / "metrics.json").is_file()
        if cfg in (None, night["config"]) and night["fingerprint"] == fingerprint and ((run_dir / "last.pt").is_file() or trained):
            return NightRun(run_dir, night["version"], resume=True, trained=trained)
        return None
    return None


def mark_published(run_dir: Path, version: str, promoted: bool) -> None:
    """Record that the run's version is uploaded (and promoted if it passed): a rerun starts afresh."""
    write_json_atomic(run_dir / PUBLISHED_FILE, {"version": version, "promoted": promoted})


def read_json(path: Path) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())
