"""The model registry in a Store: models/face/<version>/ files and the champion.json pointer.

Publishing a night is one idempotent step, in this order: the version's files (and their sha256.json), then
publishing.json (what the rest of the publish needs), then champion.json (if promoted), then latest.json. A night
killed anywhere in it leaves the old champion serving; once publishing.json is written, the next night
(``unfinished_publish`` / ``finish_publish``), on any worker, finishes it before anything else. Versions sort by
time (20261123T021500Z-3fa2c1).

The bucket is shared, so what is read back is input: a version read from champion.json, latest.json, their
history, publishing.json or a listing is used only in its one legal form (``check_version``), and a model or
checkpoint only when its sha256 matches the version's sha256.json (``verify_bytes``; a missing record is an
error). champion.json and latest.json move by compare-and-swap (``swap_pointer``: S3 If-Match / If-None-Match),
so a writer that read a pointer never overwrites a newer one: a person's `models promote` during a night stays.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from faceclf.dataset.layout import SHA256_HEX
from faceclf.store.objects import PreconditionFailed, Store

log = logging.getLogger(__name__)

MODELS_PREFIX = "models/face/"
CHAMPION_KEY = MODELS_PREFIX + "champion.json"
LATEST_KEY = MODELS_PREFIX + "latest.json"   # the last published version (promoted or not) and its data
PUBLISHING_KEY = MODELS_PREFIX + "publishing.json"  # the publish under way (or the last one): a PublishRecord
MODEL_FILE = "model.onnx"
INT8_MODEL_FILE = "model.int8.onnx"   # the optional int8 model (`faceclf export --int8`, night int8=true)
DECISION_FILE = "decision.json"
SHA256_FILE = "sha256.json"   # name -> sha256 of every file of a version, written when it is published
ESTIMATE_FILE = "estimate.json"  # the version's last label-free accuracy estimate, from a scoring run


SWAP_ATTEMPTS = 8        # compare-and-swap rounds before a pointer update gives up (each lost round re-reads)
VERSION_RE = re.compile(r"\d{8}T\d{6}Z-[0-9a-f]{6}")   # faceclf.training.fit.new_version's form, nothing else


class ModelIntegrityError(ValueError):
    """A stored file's sha256 is not the one the registry recorded: tampered with or corrupted (not transient)."""


class RegistryError(ValueError):
    """A registry object read back from the bucket is not in its legal form (a mistaken or hostile writer)."""


def check_version(version: Any, source: str = "the caller") -> str:
    """``version`` if it has the one legal form of a model version (20261123T021500Z-3fa2c1), else RegistryError
    naming where it came from: a version becomes a key, a run folder and a download path."""
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise RegistryError(f"{source} names model version {str(version)[:80]!r}, which is not of the form "
                            "20261123T021500Z-3fa2c1; refusing to use it")
    return version


def version_key(version: str, name: str) -> str:
    """Key of file ``name`` of model ``version`` (a legal version; ``name`` a plain file name)."""
    check_version(version)
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"model file name {name!r} is not a plain name")
    return f"{MODELS_PREFIX}{version}/{name}"


def read_pointer(store: Store, key: str) -> tuple[dict[str, Any] | None, str | None]:
    """A JSON pointer (champion.json, latest.json) and the ETag it was read at; (None, None) when absent."""
    try:
        data, etag = store.get_versioned(key)
    except FileNotFoundError:
        return None, None
    try:
        pointer = json.loads(data)
    except ValueError as e:
        raise RegistryError(f"{store.uri(key)} is not JSON ({e}); fix or remove it") from None
    if not isinstance(pointer, dict):
        raise RegistryError(f"{store.uri(key)} holds {type(pointer).__name__}, not a JSON object")
    return pointer, etag


def swap_pointer(store: Store, key: str,
                 change: Callable[[dict[str, Any] | None], dict[str, Any] | None]) -> dict[str, Any] | None:
    """Read ``key``, let ``change`` compute its new content from what is there (None: leave it), and write it only
    if nobody wrote ``key`` in between (compare-and-swap); a lost race reads again and asks ``change`` again.
    Returns the pointer after: the new one, or the one left in place."""
    for _ in range(SWAP_ATTEMPTS):
        current, etag = read_pointer(store, key)
        new = change(current)
        if new is None:
            return current
        try:
            store.put_if(key, (json.dumps(new, indent=2) + "\n").encode(), etag)
            return new
        except PreconditionFailed as e:
            log.info("%s moved while it was being updated (%s); reading it again", store.uri(key), e)
    raise PreconditionFailed(f"{store.uri(key)} kept changing: {SWAP_ATTEMPTS} compare-and-swap rounds lost")


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def recorded_sha256(store: Store, version: str) -> dict[str, str]:
    """name -> sha256 recorded when ``version`` was published; empty when the version has no sha256.json yet."""
    try:
        sums = json.loads(store.get_bytes(version_key(version, SHA256_FILE)))
    except FileNotFoundError:
        return {}
    if not isinstance(sums, dict) or not all(isinstance(v, str) and SHA256_HEX.fullmatch(v) for v in sums.values()):
        raise ModelIntegrityError(f"{store.uri(version_key(version, SHA256_FILE))} is not a map of file name to "
                                  "64-hex sha256; refusing the version's files")
    return sums


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
    the next night measures what is new against it. Only ever forward (compare-and-swap): a newer version
    recorded by another worker meanwhile stays."""
    latest = {"version": check_version(version), "promoted": promoted, "images": images,
              "data_fingerprint": fingerprint, "published_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}

    def forward(current: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if current and current["version"] >= version else latest

    swap_pointer(store, LATEST_KEY, forward)


def read_latest(store: Store) -> dict[str, Any] | None:
    """What ``write_latest`` recorded last (its version checked); None before the first published version."""
    latest, _ = read_pointer(store, LATEST_KEY)
    if latest is not None:
        check_version(latest.get("version"), store.uri(LATEST_KEY))
    return latest


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
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{store.uri(PUBLISHING_KEY)} is not a publish record ({e}); fix or remove it") from None
    check_version(record.version, store.uri(PUBLISHING_KEY))
    if record.previous_version is not None:
        check_version(record.previous_version, store.uri(PUBLISHING_KEY) + " (previous_version)")
    latest = read_latest(store)
    return None if latest and latest["version"] >= record.version else record


def finish_publish(store: Store, record: PublishRecord) -> dict[str, Any] | None:
    """Move champion.json to the record's version (if promoted and not there yet), then write latest.json;
    return the champion pointer after. Running it again changes nothing (idempotent).

    A champion moved since the night read it (by a person's `faceclf models promote`) is left as it is: the
    night replaces only the champion it was gated against.
    """
    def move(current: dict[str, Any] | None) -> dict[str, Any] | None:
        current_version = current["version"] if current else None
        if not record.promote or current_version == record.version:
            return None
        if current_version != record.previous_version:
            log.warning("not promoting %s: champion.json moved to %s after the night read %s; it stays",
                        record.version, current_version, record.previous_version)
            return None
        return champion_pointer(record.version, record.model_sha256 or "", record.reason, current, record.test,
                                record.classes, record.by)

    pointer = swap_pointer(store, CHAMPION_KEY, move)
    if pointer and pointer["version"] == record.version:
        log.info("champion is now %s (%s; by %s)", record.version, record.reason, record.by)
    write_latest(store, record.version, record.promote, record.images, record.data_fingerprint)
    return pointer


def read_champion(store: Store) -> dict[str, Any] | None:
    """The champion pointer (every version it names checked), or None before the first promotion."""
    pointer, _ = read_pointer(store, CHAMPION_KEY)
    if pointer is not None:
        check_pointer(pointer, store.uri(CHAMPION_KEY))
    return pointer


def check_pointer(pointer: dict[str, Any], source: str) -> None:
    """RegistryError unless every version champion.json names (its own, previous, history) is legal and its
    model_key is its version's model file: each one may become a key or a path."""
    version = check_version(pointer.get("version"), source)
    if pointer.get("previous_version") is not None:
        check_version(pointer["previous_version"], f"{source} (previous_version)")
    history = pointer.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise RegistryError(f"{source}: history is not a list of entries")
    for i, entry in enumerate(history):
        check_version(entry.get("version"), f"{source} (history entry {i})")
    if pointer.get("model_key", version_key(version, MODEL_FILE)) != version_key(version, MODEL_FILE):
        raise RegistryError(f"{source}: model_key {str(pointer['model_key'])[:120]!r} is not the model of version "
                            f"{version} ({version_key(version, MODEL_FILE)})")


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


def champion_pointer(version: str, model_sha256: str, reason: str, previous: dict[str, Any] | None,
                     metrics: dict[str, Any] | None = None, classes: Sequence[str] | None = None,
                     by: str | None = None) -> dict[str, Any]:
    """The champion.json content that makes ``version`` the champion in place of ``previous`` (the pointer it
    replaces, None: there was none); its ``history`` is carried over with one entry added: version, when, why
    and ``by`` whom (default: who())."""
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
    return pointer


def set_champion(store: Store, version: str, model_sha256: str, reason: str,
                 metrics: dict[str, Any] | None = None, classes: Sequence[str] | None = None,
                 by: str | None = None) -> dict[str, Any]:
    """Point champion.json at ``version`` (the last write of a promotion), by compare-and-swap on the pointer it
    replaces (its history carried over); return the new pointer."""
    pointer = swap_pointer(store, CHAMPION_KEY,
                           lambda current: champion_pointer(version, model_sha256, reason, current, metrics, classes, by))
    assert pointer is not None  # the change always writes
    log.info("champion is now %s (%s; by %s)", version, reason, pointer["by"])
    return pointer


def verify_bytes(store: Store, version: str, name: str, data: bytes, expected_sha256: str | None = None,
                 expected_by: str = "the registry") -> None:
    """Refuse the bytes of ``version``'s file ``name`` unless they match every sha256 the registry holds for them.

    Checked against ``expected_sha256`` (named ``expected_by``, e.g. champion.json) and the version's sha256.json;
    with neither there is nothing to check against, and the bytes are refused too (ModelIntegrityError).
    """
    uri = store.uri(version_key(version, name))
    expected = {expected_by: expected_sha256, f"{version}/{SHA256_FILE}": recorded_sha256(store, version).get(name)}
    expected = {source: value for source, value in expected.items() if value}
    if not expected:
        raise ModelIntegrityError(f"{uri} has no recorded sha256 (no {SHA256_FILE} entry for it, and nothing else "
                                  "expects one): it cannot be verified, so it is not used. Republish the version, or "
                                  f"write its {SHA256_FILE} after checking the file by hand")
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


def estimate_record(version: str, summary: dict[str, Any], source: str, scored_at: str) -> dict[str, Any]:
    """estimate.json's content: the key figures of a scoring run's monitor block (faceclf.serving.monitor), where
    the images came from and when they were scored."""
    reference = summary.get("reference") or {}
    return {"version": version, "n": summary["n"], "estimated_accuracy": summary["estimated_accuracy"],
            "interval": summary["interval"], "test_accuracy": reference.get("test_accuracy"),
            "accuracy_drop": summary["accuracy_drop"], "predicted_shares": summary["predicted_shares"],
            "share_shift": summary["share_shift"], "alarms": list(summary["alarms"]),
            "source": source, "scored_at": scored_at}


def record_estimate(store: Store, version: str, summary: dict[str, Any], source: str, scored_at: str) -> str:
    """Write ``version``'s last estimate (models/face/<version>/estimate.json, replacing the one before, in one
    write) from a scoring run's monitor ``summary``; return its URI. ``faceclf models list`` and the night's
    report show it beside the version's test accuracy."""
    key = version_key(check_version(version), ESTIMATE_FILE)
    store.put_bytes(key, (json.dumps(estimate_record(version, summary, source, scored_at), indent=2) + "\n").encode())
    return store.uri(key)


def _is_number(value: Any, optional: bool = False) -> bool:
    """A finite JSON number (not a bool), or None where ``optional``."""
    if value is None:
        return optional
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def estimate_problem(record: Any) -> str | None:
    """Why ``record`` is not an estimate.json as ``record_estimate`` writes it, or None: numbers must be numbers."""
    if not isinstance(record, dict):
        return f"it holds {type(record).__name__}, not a JSON object"
    n, interval = record.get("n"), record.get("interval")
    checks = {
        "version": isinstance(record.get("version"), str),
        "n": isinstance(n, int) and not isinstance(n, bool) and n >= 0,
        "estimated_accuracy": _is_number(record.get("estimated_accuracy"), optional=True),
        "interval": interval is None or (isinstance(interval, list) and len(interval) == 2
                                         and all(_is_number(v) for v in interval)),
        "test_accuracy": _is_number(record.get("test_accuracy"), optional=True),
        "accuracy_drop": _is_number(record.get("accuracy_drop"), optional=True),
        "predicted_shares": isinstance(record.get("predicted_shares"), dict)
                            and all(_is_number(v) for v in record["predicted_shares"].values()),
        "share_shift": isinstance(record.get("share_shift"), dict)
                       and all(_is_number(v) for v in record["share_shift"].values()),
        "alarms": isinstance(record.get("alarms"), list) and all(isinstance(a, str) for a in record["alarms"]),
        "source": isinstance(record.get("source"), str),
        "scored_at": isinstance(record.get("scored_at"), str),
    }
    bad = [name for name, ok in checks.items() if not ok]
    if bad:
        return f"{', '.join(bad)} {'is' if len(bad) == 1 else 'are'} not what record_estimate writes"
    if (record["estimated_accuracy"] is None) != (record["interval"] is None):
        return "estimated_accuracy and interval must be both present or both null"
    return None


def read_estimate(store: Store, version: str) -> dict[str, Any] | None:
    """``version``'s last recorded estimate (estimate.json), or None: when there is none, and (with a warning) when
    it is not what ``record_estimate`` writes (the bucket is shared: it is input)."""
    key = version_key(check_version(version), ESTIMATE_FILE)
    try:
        record = json.loads(store.get_bytes(key))
    except FileNotFoundError:
        return None
    except ValueError as e:  # not JSON, or not UTF-8
        log.warning("ignoring %s: not JSON (%s)", store.uri(key), str(e)[:200])
        return None
    problem = estimate_problem(record)
    if problem is None and record["version"] != version:
        problem = f"it is the estimate of version {record['version'][:80]!r}, not of {version}"
    if problem:
        log.warning("ignoring %s: %s", store.uri(key), problem)
        return None
    return record


def list_versions(store: Store, last: int | None = None) -> list[dict[str, Any]]:
    """Every version (or the ``last`` ones), oldest first: version, files, gate decision, ever champion?, test
    accuracy with its interval and n, champion now?, why the champion it was gated against was stale, its last
    label-free estimate from a scoring run (read_estimate; None without one) (one listing, one decision.json and
    estimate.json read per version)"""
    files: dict[str, list[str]] = {}
    for obj in store.list(MODELS_PREFIX):
        rest = obj.key[len(MODELS_PREFIX):]
        if "/" in rest:
            version, name = rest.split("/", 1)
            if VERSION_RE.fullmatch(version):
                files.setdefault(version, []).append(name)
            elif version not in files.setdefault("", []):  # "" collects the refused folder names, logged once each
                files[""].append(version)
                log.warning("ignoring %s: %r is not a model version's folder name", store.uri(obj.key), version)
    files.pop("", None)
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
            "estimate": read_estimate(store, version) if ESTIMATE_FILE in files[version] else None,
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
    metrics, classes = None, None
    if store.exists(version_key(version, "metrics.json")):
        saved = json.loads(store.get_bytes(version_key(version, "metrics.json")))
        metrics, classes = saved.get("test"), saved.get("classes")
    return set_champion(store, version, sha256_bytes(data), reason, metrics, classes, by)
