"""The bucket's ingest records: the manifest and the quarantine log (JSON lines), and their rows.

    incoming/<class>/<name>          new labelled images, written by others; ingest only reads them
    datasets/face/manifest.jsonl     one row per ingested object, rewritten whole at the end of a run
    datasets/face/quarantine.jsonl   one row per refused object, this run's rows appended at the end

Manifest rows have ``status`` "ok" (the image file at ``path``), "duplicate" (the same bytes as the
"ok" row whose key is ``duplicate_of``; ``split``/``path`` are that row's) or "conflict" (see below).
Duplicate rows exist so that a duplicate object is not downloaded again every night; count images with
``status == "ok"`` only. An object is 'already seen' when a manifest or quarantine row has its key,
etag and size (see ``identity``).

Conflicts: the same bytes labelled with two classes (in one run or across nights) cannot both be right,
so NEITHER is trained on. The newcomer is quarantined (reason "conflict: ..."), every manifest row with
that sha256 becomes ``status: "conflict"`` and its file is removed from dest; later objects with those
bytes are quarantined too. Nothing is lost: the objects stay under incoming/. To settle a conflict,
delete the wrongly labelled object and the sha's rows from the manifest and quarantine log.

Trust: the bucket is shared, so the records are read back as input. Every manifest row must have its one
legal form (``row_problem``: its ``path`` is exactly <split>/<class>/<sha256>.<ext> of its own split, class
and sha256) before any of it becomes a path; one that does not stops the run before anything is written or
removed, naming the line. Quarantine rows are only ever used as strings (key, class, reason) and their
identity; they are held to plain types. A quarantine row with ``kind`` "unknown_class" is an object refused
only because its class was new; an ingest that allows new classes downloads it again.
"""

from __future__ import annotations

import collections
import json
from typing import TYPE_CHECKING, Any, Callable, Iterable

from faceclf.dataset.layout import FILE_EXTENSIONS, SHA256_HEX, SPLITS, legal_class, parse_image_path
from faceclf.dataset.near import from_hex, to_hex
from faceclf.store.objects import ObjectInfo, Store

if TYPE_CHECKING:
    from faceclf.dataset.checks import Checked

INCOMING = "incoming/"                # fixed bucket layout (see DESIGN.md)
MANIFEST_KEY = "datasets/face/manifest.jsonl"
QUARANTINE_KEY = "datasets/face/quarantine.jsonl"
STATUSES = ("ok", "duplicate", "conflict")
UNKNOWN_CLASS = "unknown_class"       # quarantine row ``kind``: refused only for its new class (retried when allowed)
_FILE_EXTS = frozenset(FILE_EXTENSIONS.values())


# ---------------------------------------------------------------------------------------------
# Reading and writing
# ---------------------------------------------------------------------------------------------
def read_jsonl(store: Store, key: str, problem: Callable[[dict[str, Any]], str | None],
               required: tuple[str, ...] = ("key", "etag", "size"), writer: str = "ingest") -> list[dict[str, Any]]:
    """Rows of a JSON-lines object; [] if it does not exist. A bad line stops the run (never rewritten).

    Every line must be a JSON object with the ``required`` fields (checked first, line by line); then the first
    row for which ``problem`` gives a reason stops the run, naming its line (only ``writer`` writes the object).
    """
    try:
        text = store.get_bytes(key).decode("utf-8")
    except FileNotFoundError:
        return []
    rows, illegal = [], None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{store.uri(key)} line {n} is not valid JSON ({e}); fix or remove that line") from None
        if not isinstance(row, dict) or not set(required) <= row.keys():
            raise ValueError(f"{store.uri(key)} line {n} is not an object with {', '.join(required[:-1])} and "
                             f"{required[-1]}: {line[:200]!r}")
        if illegal is None and (why := problem(row)):
            illegal = n, why
        rows.append(row)
    if illegal:
        raise ValueError(f"{store.uri(key)} line {illegal[0]}: {illegal[1]}. Only {writer} writes this file, so a row "
                         "in any other form means a mistaken or compromised writer; nothing was written or removed. "
                         "Fix or remove that line (or restore the file from a backup)")
    return rows


def identity_problem(row: dict[str, Any]) -> str | None:
    """Why a manifest or quarantine row's identity is not (key: text, etag: text, size: whole bytes); None if it is."""
    if not isinstance(row["key"], str) or not isinstance(row["etag"], str):
        return f"key {row['key']!r} and etag {row['etag']!r} must be text"
    if type(row["size"]) is not int or row["size"] < 0:
        return f"size {row['size']!r} is not a whole number of bytes"
    return None


def row_problem(row: dict[str, Any]) -> str | None:
    """Why a manifest row is not in its one legal form; None if it is.

    status one of STATUSES (absent: "ok"); sha256 64 lowercase hex digits; class a legal class
    (``legal_class``, the rule incoming/<class>/ is held to); split one of SPLITS; path exactly
    f"{split}/{class}/{sha256}.{ext}" with ext one an ingested file has (``parse_image_path``): a path that
    is not that row's own file (e.g. '../../x') would be written, restored or removed outside its place.
    """
    if why := identity_problem(row):
        return why
    if row.get("status", "ok") not in STATUSES:
        return f"status {row.get('status')!r} is not one of {STATUSES}"
    sha, cls, split, path = row.get("sha256"), row.get("class"), row.get("split"), row.get("path")
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        return f"sha256 {sha!r} is not 64 lowercase hex digits"
    if not isinstance(split, str) or split not in SPLITS:
        return f"split {split!r} is not one of {SPLITS}"
    if not isinstance(cls, str):
        return f"class {cls!r} is not text"
    try:
        legal_class(cls)
    except ValueError as e:
        return str(e)
    own = f"{split}/{cls}/{sha}."  # the checks above make this a legal prefix: only the extension is left
    if not isinstance(path, str) or not path.startswith(own) or path[len(own):] not in _FILE_EXTS:
        try:
            parse_image_path(path)  # why it is no image path at all, if it is not
        except ValueError as e:
            return str(e)
        return f"path {path!r} is not {own}<ext> (the row's own split, class and sha256)"
    for k in ("width", "height"):
        if k in row and (type(row[k]) is not int or row[k] < 0):
            return f"{k} {row[k]!r} is not a whole number of pixels"
    if "phash" in row:
        try:
            from_hex(row["phash"])
        except ValueError as e:
            return str(e)
    return None


def quarantine_problem(row: dict[str, Any]) -> str | None:
    """Why a quarantine row is not plain (identity, and text reason/class/sha256/kind where present); None if it is.
    None of its fields becomes a path: they are compared, logged and reported."""
    if why := identity_problem(row):
        return why
    bad = [k for k in ("reason", "class", "sha256", "kind", "at") if k in row and not isinstance(row[k], str)]
    return f"{', '.join(bad)} must be text" if bad else None


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def read_manifest(store: Store) -> list[dict[str, Any]]:
    """All manifest rows ("ok" images, "duplicate" and "conflict" records), in ingest order; ValueError naming
    the line if one is not in its legal form (``row_problem``)."""
    return read_jsonl(store, MANIFEST_KEY, row_problem)


def read_quarantine(store: Store) -> list[dict[str, Any]]:
    """All quarantine rows (key, etag, size, reason, at; conflicts also sha256 and class; unknown classes
    ``kind`` "unknown_class"), oldest first."""
    return read_jsonl(store, QUARANTINE_KEY, quarantine_problem)


def write_manifest(store: Store, rows: Iterable[dict[str, Any]]) -> None:
    """Replace the manifest with ``rows`` (one object, written whole)."""
    store.put_bytes(MANIFEST_KEY, _jsonl(rows))


def write_quarantine(store: Store, rows: Iterable[dict[str, Any]]) -> None:
    """Replace the quarantine log with ``rows``: the rows read at the start, then this run's."""
    store.put_bytes(QUARANTINE_KEY, _jsonl(rows))


# ---------------------------------------------------------------------------------------------
# Rows
# ---------------------------------------------------------------------------------------------
def identity(row: dict[str, Any] | ObjectInfo) -> tuple[str, str, int]:
    """(key, etag, size): what makes an object 'already seen'; a new etag under a key is a new object."""
    if isinstance(row, ObjectInfo):
        return row.key, row.etag, row.size
    return row["key"], row["etag"], int(row["size"])


def class_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Images ("ok" rows) per class, sorted by class name."""
    counts = collections.Counter(r["class"] for r in rows if r.get("status", "ok") == "ok")
    return dict(sorted(counts.items()))


def manifest_row(info: ObjectInfo, cls: str, img: Checked, path: str, now: str) -> dict[str, Any]:
    """The "ok" manifest row of an image written to dest at ``path`` (dest-relative, split first); ``phash``: its
    perceptual signature (faceclf.dataset.near), which places later twins in its split."""
    row = {"key": info.key, "etag": info.etag, "size": info.size, "sha256": img.sha256, "class": cls,
           "split": path.split("/", 1)[0], "path": path, "format": img.format, "width": img.width,
           "height": img.height, "ingested_at": now, "status": "ok"}
    if img.signature is not None:
        row["phash"] = to_hex(img.signature.value)
    return row


def signature_of_row(row: dict[str, Any]) -> int | None:
    """A manifest row's perceptual signature (None: a row written before signatures, not yet backfilled)."""
    return from_hex(row["phash"]) if "phash" in row else None


def quarantine_row(info: ObjectInfo, reason: str, now: str) -> dict[str, Any]:
    """The quarantine row of a refused object (conflicts add sha256 and class)."""
    return {"key": info.key, "etag": info.etag, "size": info.size, "reason": reason, "at": now}


# ---------------------------------------------------------------------------------------------
# Conflicts: the same bytes under two classes
# ---------------------------------------------------------------------------------------------
def conflict_reason(sha256: str, rows: list[dict[str, Any]]) -> str:
    """Quarantine reason for an object whose bytes are already held under another class, or held out as
    a conflict: names up to three of the keys (manifest and quarantine rows) with those bytes, and their class."""
    held = [f"{r['key']} labelled {r['class']}" for r in rows if r.get("sha256") == sha256]
    more = f" and {len(held) - 3} more" if len(held) > 3 else ""
    return f"conflict: same bytes as {', '.join(held[:3])}{more}"


def mark_conflict(rows: list[dict[str, Any]], sha256: str, key: str, cls: str, now: str) -> str | None:
    """Mark every "ok"/"duplicate" row holding ``sha256`` as "conflict" (``key`` labelled ``cls`` has the
    same bytes); return the dest path of the file that must leave dest (None if no row held one)."""
    path = None
    for r in rows:
        if r["sha256"] == sha256 and r.get("status", "ok") in ("ok", "duplicate"):
            if r.get("status", "ok") == "ok":
                path = r["path"]
            r.update(status="conflict", conflict_with=key, conflict_class=cls, conflict_at=now)
    return path


def conflict_summary(sha256: str, rows: list[dict[str, Any]], quarantined: list[dict[str, Any]],
                     withdrawn: str | None) -> dict[str, Any]:
    """One ``IngestReport.conflicts`` entry: every key and class seen with these bytes (manifest and
    quarantine log), and the dest path withdrawn this run."""
    seen = [(r["key"], r["class"]) for r in rows if r["sha256"] == sha256]
    seen += [(q["key"], q["class"]) for q in quarantined if q.get("sha256") == sha256]
    return {"sha256": sha256, "keys": sorted({k for k, _ in seen}), "classes": sorted({c for _, c in seen}),
            "withdrawn": withdrawn}
