"""The model registry in a Store: models/face/<version>/ files and the champion.json pointer.

Publishing a night is one idempotent step, in this order: the version's files (and their sha256.json), then
publishing.json (what the rest of the publish needs), then champion.json (if promoted), then latest.json. A night
killed anywhere in it leaves the old champion serving; once publishing.json is written, the next night
(``unfinished_publish`` / ``finish_publish``), on any worker, finishes it before anything else. Versions sort by
time (20261123T021500Z-3fa2c1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from faceclf.store.objects import Store

log = logging.getLogger(__name__)

MODELS_PREFIX = "models/face/"
CHAMPION_KEY = MODELS_PREFIX + "champion.json"
LATEST_KEY = MODELS_PREFIX + "latest.json"   # the last published version (promoted or not) and its data
PUBLISHING_KEY = MODELS_PREFIX + "publishing.json"  # the publish under way (or the last one): a PublishRecord
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"   # the optional int8 model (`faceclf export --int8`, night int8=true)
DECISION_FILE = "decision.json"
SHA256_FILE = "sha256.json"   # name -> sha256 of every file of a version, written when it is published


class ModelIntegrityError(ValueError):
    """A stored file's sha256 is not the one the registry recorded: tampered with or corrupted (not transient)."""


def version_key(version: str, name: str) -> str:
    """Key of file ``name`` of model ``version``."""
    if not version or "/" in version or version.startswith("."):
        raise ValueError(f"model version {version!r} is not a plain name")
    return f"{MODELS_PREFIX}{version}/{name}"


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def recorded_sha256(store: Store, version: str) -> dict[str, str]:
    """name -> sha256 recorded when ``version`` was published; empty for versions published without one."""
    try:
        return dict(json.loads(store.get_bytes(version_key(version, SHA256_FILE))))
    except FileNotFoundError:
        return {}


def publish_version(store: Store, version: str, files: dict[str, Path]) -> dict[str, str]:
    """Upload a version's files (name -> local path); return name -> URI. Does not touch champion.json.

    Records every file's sha256 in <version>/sha256.json (merged with an earlier record, so a retried
    upload is harmless); fetch_model and promote check downloads against it.
    """
    uris, sums = {}, recorded_sha256(store, version)
    for name, path in files.items():
        store.put_file(version_key(version, name), Path(path))
        uris[name] = store.uri(version_key(version, name))
        sums[name] = sha256_bytes(Path(path).read_bytes())
    store.put_bytes(version_key(version, SHA256_FILE), (json.dumps(sums, indent=2, sort_keys=True) + "\n").encode())
    log.info("uploaded model version %s: %s", version, ", ".join(sorted(files)))
    return uris


@dataclass(frozen=True)
class ChampionRef:
    """The champion as a night reads it once: its pointer (champion.json) and the classes it knows."""

    version: str
    model_sha256: str | None
    classes: tuple[str, ...]
    pointer: dict[str, Any]


def write_latest(store: Store, version: str, promoted: bool, images: int, fingerprint: str) -> None:
    """Record the version just published and the data it was trained on (image count, FaceSet fingerprint):
    the next night measures what is new against it."""
    latest = {"version": version, "promoted": promoted, "images": images, "data_fingerprint": fingerprint,
              "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.put_bytes(LATEST_KEY, (json.dumps(latest, indent=2) + "\n").encode())


def read_latest(store: Store) -> dict[str, Any] | None:
    """What ``write_latest`` recorded last; None before the first published version."""
    try:
        return json.loads(store.get_bytes(LATEST_KEY))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class PublishRecord:
    """Everything a publish does after the version's files are up, written (publishing.json) before it does any
    of it: so a rerun on a fresh worker, without the night's run folder, can finish it."""

    version: str
    promote: bool
    model_sha256: str | None      # the promoted model's; None for a rejected candidate
    reason: str                   # the gate's one-line summary (champion.json's history keeps it)
    previous_version: str | None  # the champion the night read at its start: it replaces only that one
    test: dict[str, Any]          # the candidate's test metrics (champion.json's test_accuracy)
    classes: list[str]
    by: str                       # who promoted it: "train flow (gate) on user@host"
    images: int                   # latest.json: the data the version was trained on
    data_fingerprint: str


def begin_publish(store: Store, record: PublishRecord) -> None:
    """Record the publish about to move the pointers (the version's files are all uploaded by now)."""
    store.put_bytes(PUBLISHING_KEY, (json.dumps(asdict(record), indent=2) + "\n").encode())


def unfinished_publish(store: Store) -> PublishRecord | None:
    """The publish a killed night left half done: publishing.json names a version latest.json does not yet
    record; None when every publish finished."""
    try:
        record = PublishRecord(**json.loads(store.get_bytes(PUBLISHING_KEY)))
    except FileNotFoundError:
        return None
    latest = read_latest(store)
    return None if latest and latest["version"] >= record.version else record


def finish_publish(store: Store, record: PublishRecord) -> dict[str, Any] | None:
    """Move champion.json to the record's version (if promoted and not there yet), then write latest.json;
    return the champion pointer after. Running it again changes nothing (idempotent).

    A champion moved since the night read it (by a person's `faceclf models promote`) is left as it is: the
    night replaces only the champion it was gated against.
    """
    current = read_champion(store)
    current_version = current["version"] if current else None
    pointer = current
    if record.promote and current_version != record.version:
        if current_version == record.previous_version:
            pointer = set_champion(store, record.version, record.model_sha256 or "", record.reason, current,
                                   record.test, record.classes, record.by)
        else:
            log.warning("not promoting %s: champion.json moved to %s after the night read %s; it stays",
                        record.version, current_version, record.previous_version)
    write_latest(store, record.version, record.promote, record.images, record.data_fingerprint)
    return pointer


def read_champion(store: Store) -> dict[str, Any] | None:
    """The champion pointer, or None before the first promotion."""
    try:
        return json.loads(store.get_bytes(CHAMPION_KEY))
    except FileNotFoundError:
        return None


def champion_ref(store: Store) -> ChampionRef | None:
    """champion.json read once, with the champion's classes (from the pointer; pointers written before
    it held them: from the version's metrics.json); None before the first promotion."""
    pointer = read_champion(store)
    if pointer is None:
        return None
    classes = pointer.get("classes")
    if classes is None:
        classes = json.loads(store.get_bytes(version_key(pointer["version"], "metrics.json")))["classes"]
    return ChampionRef(pointer["version"], pointer.get("model_sha256"), tuple(classes), pointer)


def who() -> str:
    """user@host of this process: recorded with each promotion in champion.json's history."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = f"uid{os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()}"


def set_champion(store: Store, version: str, model_sha256: str, reason: str, previous: dict[str, Any] | None,
                 metrics: dict[str, Any] | None = None, classes: Sequence[str] | None = None,
                 by: str | None = None) -> dict[str, Any]:
    """Point champion.json at ``version`` (the last write of a promotion); return the new pointer.

    ``previous`` is the champion pointer it replaces, as the caller read it (None: there was none); its
    ``history`` is carried over with one entry added: version, when, why and ``by`` whom (default: who()).
    """
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    by = by or who()
    history = list((previous or {}).get("history", []))
    history.append({"version": version, "promoted_at": now, "reason": reason, "by": by})
    pointer = {
        "version": version,
        "model_key": version_key(version, MODEL_FILE),
        "model_sha256": model_sha256,
        "promoted_at": now,
        "reason": reason,
        "by": by,
        "previous_version": previous["version"] if previous else None,
        "test_accuracy": (metrics or {}).get("accuracy"),
        "classes": list(classes) if classes is not None else None,
        "history": history,
    }
    store.put_bytes(CHAMPION_KEY, (json.dumps(pointer, indent=2) + "\n").encode())
    log.info("champion is now %s (%s; by %s)", version, reason, by)
    return pointer


def verify_bytes(store: Store, version: str, name: str, data: bytes, expected_sha256: str | None = None,
                 expected_by: str = "the registry") -> None:
    """Refuse the bytes of ``version``'s file ``name`` unless they match every sha256 the registry holds for them.

    Checked against ``expected_sha256`` (named ``expected_by``, e.g. champion.json) and the version's sha256.json. A
    version published before sha256.json existed, with nothing expected, is only logged.
    """
    uri = store.uri(version_key(version, name))
    expected = {expected_by: expected_sha256, f"{version}/{SHA256_FILE}": recorded_sha256(store, version).get(name)}
    expected = {source: value for source, value in expected.items() if value}
    if not expected:
        log.warning("%s has no recorded sha256 (published before %s existed); it cannot be verified", uri, SHA256_FILE)
    actual = sha256_bytes(data)
    for source, value in expected.items():
        if actual != value.lower():
            raise ModelIntegrityError(f"{uri} has sha256 {actual}, but {source} expects {value}; refusing to use it")


def fetch_model(store: Store, version: str, dest: Path, expected_sha256: str | None = None,
                expected_by: str = "the registry", name: str = MODEL_FILE) -> Path:
    """Download ``version``'s model.onnx (or its file ``name``, e.g. model.int8.onnx) to ``dest``, refusing it
    if its sha256 is not the recorded one. A file already at ``dest`` with the recorded sha256 is kept instead of
    downloaded again (a night's drift check and its champion re-score share one copy)."""
    if expected_sha256 and dest.is_file() and sha256_bytes(dest.read_bytes()) == expected_sha256:
        return dest
    key = version_key(version, name)
    try:
        data = store.get_bytes(key)
    except FileNotFoundError:
        if name == MODEL_FILE:
            raise
        raise FileNotFoundError(f"model version {version} has no {name} in {store.uri(key)}: train with int8=true "
                                "(or `faceclf export --int8`) to make one") from None
    verify_bytes(store, version, name, data, expected_sha256, expected_by)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(data)
    return dest


def fetch_champion(store: Store, dest: Path, champion: ChampionRef | None = None) -> tuple[dict[str, Any], Path] | None:
    """Download the champion's model (sha256-checked); None when there is no champion.

    ``champion``: the pointer the caller already read (else champion.json is read here).
    """
    pointer = champion.pointer if champion else read_champion(store)
    if pointer is None:
        return None
    return pointer, fetch_model(store, pointer["version"], dest, pointer.get("model_sha256"), "champion.json")


def list_versions(store: Store, last: int | None = None) -> list[dict[str, Any]]:
    """Every version (or the ``last`` ones), oldest first: version, files, gate decision, ever champion?, test
    accuracy with its interval and n, champion now?, why the champion it was gated against was stale (one
    listing, one decision.json read per version)"""
    files: dict[str, list[str]] = {}
    for obj in store.list(MODELS_PREFIX):
        rest = obj.key[len(MODELS_PREFIX):]
        if "/" in rest:
            version, name = rest.split("/", 1)
            files.setdefault(version, []).append(name)
    champion = read_champion(store)
    ever = {h["version"] for h in (champion or {}).get("history", [])} | ({champion["version"]} if champion else set())
    rows = []
    for version in sorted(files)[-last if last else None:]:
        decision = {}
        if DECISION_FILE in files[version]:
            decision = json.loads(store.get_bytes(version_key(version, DECISION_FILE)))
        accuracy = (decision.get("candidate") or {}).get("accuracy") or {}
        rows.append({
            "version": version,
            "champion": bool(champion and champion["version"] == version),
            "gate_passed": decision.get("promote"),
            "promoted": version in ever,
            "test_accuracy": decision.get("candidate_accuracy"),
            "test_low": accuracy.get("low"),
            "test_high": accuracy.get("high"),
            "test_n": accuracy.get("n"),
            "why": decision.get("why"),
            "champion_stale": decision.get("champion_stale") or [],
            "has_model": MODEL_FILE in files[version],
            "files": sorted(files[version]),
        })
    return rows


def promote(store: Store, version: str, reason: str = "manual promote", by: str | None = None) -> dict[str, Any]:
    """Make an existing version the champion (a manual rollback or roll-forward)."""
    key = version_key(version, MODEL_FILE)
    if not store.exists(key):
        known = [r["version"] for r in list_versions(store) if r["has_model"]]
        raise ValueError(f"version {version!r} has no {MODEL_FILE} in {store.uri(MODELS_PREFIX)}; "
                         f"versions with a model: {known or 'none'}")
    data = store.get_bytes(key)
    verify_bytes(store, version, MODEL_FILE, data)  # never bless a model that changed since it was published
    previous = read_champion(store)
    metrics, classes = None, None
    if store.exists(version_key(version, "metrics.json")):
        saved = json.loads(store.get_bytes(version_key(version, "metrics.json")))
        metrics, classes = saved.get("test"), saved.get("classes")
    return set_champion(store, version, sha256_bytes(data), reason, previous, metrics, classes, by)
