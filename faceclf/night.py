"""The steps of a nightly retraining, as plain functions the Prefect `train` flow wraps one by one.

    ingest -> train -> re-score champion -> gate -> export (if promoted) -> report -> publish
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from faceclf.atomic import write_json_atomic, write_text_atomic
from faceclf.export import ExportReport, export_onnx
from faceclf.gate import Decision
from faceclf.registry import (
    DECISION_FILE,
    MODEL_FILE,
    fetch_champion,
    publish_version,
    set_champion,
    sha256_bytes,
)
from faceclf.report import render_report
from faceclf.score import evaluate_onnx
from faceclf.storage import Store

log = logging.getLogger(__name__)

BUCKET_ENV = "FACECLF_BUCKET"


def resolve_location(bucket: str | None) -> str:
    """Where the night reads and writes: 's3://NAME' for a bucket name, a local folder for a path.

    ``bucket`` defaults to $FACECLF_BUCKET. A value with a '/' (or an existing folder) is a local
    folder with the bucket layout; anything else is an S3 bucket name.
    """
    value = bucket or os.environ.get(BUCKET_ENV)
    if not value:
        raise ValueError(f"no bucket: pass bucket=NAME (or a local folder) or set {BUCKET_ENV}")
    if value.startswith("s3://") or ("/" not in value and not Path(value).is_dir()):
        return value if value.startswith("s3://") else f"s3://{value}"
    return value


@dataclass
class ChampionScore:
    """The champion re-scored on tonight's test set."""

    version: str
    metrics: dict[str, Any]


def rescore_champion(store: Store, test_dir: Path, work_dir: Path) -> ChampionScore | None:
    """Download the champion (sha256-checked) and measure it on ``test_dir``; None before the first promotion."""
    found = fetch_champion(store, work_dir / "champion.onnx")
    if found is None:
        log.info("no champion yet: the gate uses the absolute thresholds only")
        return None
    pointer, path = found
    metrics = evaluate_onnx(path, test_dir)
    log.info("champion %s re-scored on tonight's test set: accuracy %.4f on %d images",
             pointer["version"], metrics["accuracy"], metrics["n"])
    return ChampionScore(pointer["version"], metrics)


def export_candidate(run_dir: Path) -> ExportReport:
    """Export the run's best checkpoint to run_dir/model.onnx (checked and parity-tested)."""
    return export_onnx(run_dir / "checkpoint.pt", run_dir / MODEL_FILE)


def write_night_files(run_dir: Path, decision: Decision, metrics: dict[str, Any], data: dict[str, Any],
                      champion: ChampionScore | None) -> dict[str, Path]:
    """Write decision.json and report.md next to the run's outputs; return every file to publish."""
    write_json_atomic(run_dir / DECISION_FILE, decision.to_dict())
    report = render_report(metrics["version"], metrics["classes"], metrics, decision.to_dict(), data,
                           champion.metrics if champion else None)
    write_text_atomic(run_dir / "report.md", report)
    files = {name: run_dir / name for name in ("checkpoint.pt", "metrics.json", "report.md", DECISION_FILE,
                                               "history.csv", "config.json", "history.png", "confusion_matrix.png")}
    if decision.promote:
        files[MODEL_FILE] = run_dir / MODEL_FILE
    return {k: v for k, v in files.items() if v.is_file()}


def publish(store: Store, version: str, files: dict[str, Path], decision: Decision, metrics: dict[str, Any]) -> dict[str, Any]:
    """Upload the version's files, then (only if promoted) move champion.json to it, last."""
    uris = publish_version(store, version, files)
    pointer = None
    if decision.promote:
        pointer = set_champion(store, version, sha256_bytes(files[MODEL_FILE].read_bytes()), decision.summary(),
                               metrics["test"])
    return {"version": version, "uris": uris, "champion": pointer, "promoted": decision.promote}


def read_json(path: Path) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())
