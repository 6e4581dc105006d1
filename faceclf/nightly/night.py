"""The steps of a nightly retraining, as plain functions the Prefect `train` flow wraps one by one.

    ingest -> train -> re-score champion -> gate -> export (if promoted) -> report -> publish
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from faceclf.store.atomic import write_json_atomic, write_text_atomic
from faceclf.serving.export import ExportReport, export_onnx
from faceclf.nightly.gate import Decision
from faceclf.dataset.layout import SPLITS, find_classes, list_images
from faceclf.store.registry import (
    DECISION_FILE,
    MODEL_FILE,
    fetch_champion,
    publish_version,
    read_champion,
    set_champion,
    sha256_bytes,
    version_key,
)
from faceclf.nightly.report import render_report
from faceclf.serving.score import evaluate_onnx
from faceclf.store.objects import Store

log = logging.getLogger(__name__)

BUCKET_ENV = "FACECLF_BUCKET"
LOCK_FILE = ".night.lock"          # in face_dir: one night at a time on a machine
NIGHT_FILE = "night.json"          # in a run folder: the night's config and data fingerprint
PUBLISHED_FILE = "published.json"  # in a run folder: written once the version is uploaded (and promoted)


class NightLocked(RuntimeError):
    """Another night is running on the same face/ folder."""


@contextlib.contextmanager
def night_lock(face_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on face_dir for the whole night; refuse at once if another night holds it.

    flock is released by the kernel when the holder dies, so a killed night never leaves a stale lock.
    """
    face_dir.mkdir(parents=True, exist_ok=True)
    with open(face_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "unknown"
            raise NightLocked(f"another night is running on {face_dir} ({holder}); this one did nothing") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)


def images_per_split(face_dir: Path) -> dict[str, dict[str, int]]:
    """Images per split per class in face_dir/{train,val,test}/<class>/ (the ingested tree)."""
    counts: dict[str, dict[str, int]] = {}
    for split in SPLITS:
        folders = sorted((face_dir / split).iterdir()) if (face_dir / split).is_dir() else []
        counts[split] = {d.name: len(list_images(d)) for d in folders if d.is_dir() and not d.name.startswith(".")}
    return counts


def data_classes(face_dir: Path) -> dict[str, int]:
    """Images per class over all splits of the ingested tree."""
    counts: dict[str, int] = {}
    for per_class in images_per_split(face_dir).values():
        for c, n in per_class.items():
            counts[c] = counts.get(c, 0) + n
    return counts


def record_divergence(run_dir: Path, version: str, face_dir: Path, reason: str) -> dict[str, Any]:
    """metrics.json for a run whose training diverged: nothing measured, the reason kept.

    The night then goes on like any rejected one (the gate fails it, the report and decision are
    published, the champion stays), instead of ending as a bare failed flow run.
    """
    classes = find_classes(face_dir / "train")
    per_split = images_per_split(face_dir)

    def unmeasured(split: str) -> dict[str, Any]:
        per_class_n = {c: per_split[split].get(c, 0) for c in classes}
        return {"loss": None, "accuracy": None, "per_class_accuracy": {c: None for c in classes},
                "confusion_matrix": None, "n": sum(per_class_n.values()), "per_class_n": per_class_n,
                "diverged": reason}

    metrics = {"classes": classes, "best_epoch": None, "device": None, "version": version,
               "val": unmeasured("val"), "test": unmeasured("test"),
               "data": {"counts": {s: sum(n.values()) for s, n in per_split.items()}}, "diverged": reason}
    write_json_atomic(run_dir / "metrics.json", metrics)
    log.error("training diverged (%s): the night records a rejected version %s", reason, version)
    return metrics


def champion_classes(store: Store) -> list[str] | None:
    """The classes the champion was trained on (from its metrics.json); None before the first promotion."""
    pointer = read_champion(store)
    if pointer is None:
        return None
    return list(json.loads(store.get_bytes(version_key(pointer["version"], "metrics.json")))["classes"])


def check_classes(face_dir: Path, known: list[str] | None, allow_new_classes: bool = False) -> list[str]:
    """Stop the night before training when there is nothing to train on or the class set changed.

    A class that appears (or vanishes) compared to the champion is an error naming it, unless
    ``allow_new_classes``: a new label should be a decision, not an accident of an upload.
    """
    counts = data_classes(face_dir)
    if not any(counts.values()):
        raise ValueError(f"no images to train on: {face_dir} is empty and nothing new was ingested "
                         "(is incoming/ empty?)")
    present = sorted(c for c, n in counts.items() if n)
    if known is not None and not allow_new_classes:
        new, gone = sorted(set(present) - set(known)), sorted(set(known) - set(present))
        if new:
            raise ValueError(f"new class {new[0]!r} appeared in the data (the champion knows {known}); "
                             "rerun with allow_new_classes=true to train a model with it")
        if gone:
            raise ValueError(f"class {gone[0]!r} of the champion has no images any more (data has {present})")
    return present


def data_fingerprint(face_dir: Path) -> str:
    """sha256 over the sorted relative paths of every image (ingested names are content hashes)."""
    paths = sorted(p.relative_to(face_dir).as_posix() for s in SPLITS if (face_dir / s).is_dir()
                   for p in list_images(face_dir / s))
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()


@dataclass
class PendingRun:
    """A night's run that did not finish publishing: resume or finish it instead of starting over."""

    run_dir: Path
    version: str
    trained: bool  # metrics.json exists: training and test evaluation finished


def start_run(runs_dir: Path, version: str, cfg: dict[str, Any], fingerprint: str) -> Path:
    """Create the run folder and record what the night trains on (for a rerun to recognise it)."""
    run_dir = runs_dir / version
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(run_dir / NIGHT_FILE, {"version": version, "config": cfg, "fingerprint": fingerprint})
    return run_dir


def find_pending_run(runs_dir: Path, cfg: dict[str, Any], fingerprint: str) -> PendingRun | None:
    """The newest run that was not published and was started with the same config on the same data."""
    if not runs_dir.is_dir():
        return None
    for run_dir in sorted((p for p in runs_dir.iterdir() if (p / NIGHT_FILE).is_file()), reverse=True):
        if (run_dir / PUBLISHED_FILE).is_file():
            return None  # the newest night finished; older unfinished ones are stale
        night = read_json(run_dir / NIGHT_FILE)
        if night["config"] == cfg and night["fingerprint"] == fingerprint and (
                (run_dir / "last.pt").is_file() or (run_dir / "metrics.json").is_file()):
            return PendingRun(run_dir, night["version"], (run_dir / "metrics.json").is_file())
        return None
    return None


def mark_published(run_dir: Path, result: dict[str, Any]) -> None:
    """Record that the run's version is uploaded (and promoted if it passed): a rerun starts afresh."""
    write_json_atomic(run_dir / PUBLISHED_FILE, {"version": result["version"], "promoted": result["promoted"]})


def resolve_location(bucket: str | None) -> str:
    """Where the night reads and writes: 's3://NAME' for a bucket name, a local folder for a path.

    ``bucket`` defaults to $FACECLF_BUCKET. A value with a '/' or starting with '.' is a local folder
    with the bucket layout; anything else is an S3 bucket name, even if a folder of that name happens
    to exist in the working directory (bucket names cannot contain '/').
    """
    value = bucket or os.environ.get(BUCKET_ENV)
    if not value:
        raise ValueError(f"no bucket: pass bucket=NAME (or a local folder path) or set {BUCKET_ENV}")
    if value.startswith("s3://"):
        return value
    if "/" in value or value.startswith("."):
        return value
    return f"s3://{value}"


@dataclass
class ChampionScore:
    """The champion re-scored on tonight's test set."""

    version: str
    metrics: dict[str, Any]


def rescore_champion(store: Store, test_dir: Path, work_dir: Path) -> ChampionScore | None:
    """Download the champion (sha256-checked) and measure it on ``test_dir``.

    None before the first promotion, and when the test set has classes the champion does not know
    (a deliberate class change): then the gate uses the absolute thresholds alone.
    """
    found = fetch_champion(store, work_dir / "champion.onnx")
    if found is None:
        log.info("no champion yet: the gate uses the absolute thresholds only")
        return None
    pointer, path = found
    known, present = champion_classes(store) or [], find_classes(test_dir)
    if set(present) - set(known):
        log.warning("champion %s does not know class(es) %s: not comparable, absolute thresholds only",
                    pointer["version"], sorted(set(present) - set(known)))
        return None
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
    pointer = read_champion(store)
    if decision.promote and not (pointer and pointer["version"] == version):  # a rerun promotes once
        pointer = set_champion(store, version, sha256_bytes(files[MODEL_FILE].read_bytes()), decision.summary(),
                               metrics["test"])
    return {"version": version, "uris": uris, "champion": pointer, "promoted": decision.promote}


def read_json(path: Path) -> Any:
    """Load a JSON file."""
    return json.loads(Path(path).read_text())
