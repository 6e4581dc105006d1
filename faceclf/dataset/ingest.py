"""Ingest new labelled face images from a Store (S3 bucket or local folder) into an ImageFolder tree.

    incoming/<class>/<name>.<jpg|jpeg|png>   read only: never modified or deleted here
      -> list, skip what the manifest or the quarantine log already holds (same key, etag and size),
         refuse bad keys and sizes from the listing, download the rest in parallel, validate in
         memory, hash (sha256), drop exact duplicates, quarantine what is refused (with a reason)
    dest/{train,val,test}/<class>/<sha256>.<jpg|png>   split by content hash: never moves between nights
    datasets/face/manifest.jsonl     one row per ingested object, rewritten whole at the end of a run
    datasets/face/quarantine.jsonl   one row per refused object, this run's rows appended at the end

Manifest rows have ``status`` "ok" (the image file at ``path``), "duplicate" (the same bytes as the
"ok" row whose key is ``duplicate_of``; ``split``/``path`` are that row's) or "conflict" (see below).
Duplicate rows exist so that a duplicate object is not downloaded again every night; count images with
``status == "ok"`` only.

Conflicts: the same bytes labelled with two classes (in one run or across nights) cannot both be right,
so NEITHER is trained on. The newcomer is quarantined (reason "conflict: ..."), every manifest row with
that sha256 becomes ``status: "conflict"`` and its file is removed from dest; later objects with those
bytes are quarantined too. Nothing is lost: the objects stay under incoming/. To settle a conflict,
delete the wrongly labelled object and the sha's rows from the manifest and quarantine log.

Downloads that fail (network, object deleted meanwhile) are reported as ``failed`` and retried the next
night; they are not quarantined, because the object itself may be fine. Run one ingest at a time per
bucket: the manifest is read at the start and rewritten at the end.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Callable, Iterable, Iterator, TypeVar

from PIL import Image

from faceclf.store.atomic import write_atomic
from faceclf.config import SPLIT_FRACTIONS, check_split_fractions
from faceclf.dataset.layout import SPLITS, split_of
from faceclf.progress import progress
from faceclf.store.objects import ObjectInfo, Store, safe_key

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Defaults, in one place.
# ---------------------------------------------------------------------------------------------
WORKERS = 16                          # download threads; <= the S3 client's 32 pooled connections
MAX_WORKERS = 32                      # storage.DEFAULT_POOL: more threads would wait for a connection
MAX_BYTES = 25 * 2**20                # larger objects are refused from the listing, never downloaded
MIN_SIDE = 32                         # smaller images hold too little face to learn from
MAX_SIDE = 16384                      # longest side accepted (after the pixel-count guard below)
MAX_PIXELS = 40_000_000               # decompression-bomb guard, checked from the header before decoding
ALLOWED_FORMATS = ("JPEG", "PNG")     # PIL format names that are decoded at all
EXTENSIONS = (".jpg", ".jpeg", ".png")  # key suffixes accepted under incoming/ (case-insensitive)
MAX_CLASS_CHARS = 64                  # class names become folder names and model labels
MAX_NAME_BYTES = 200                  # object names longer than this are refused

INCOMING = "incoming/"                # fixed bucket layout (see DESIGN.md)
MANIFEST_KEY = "datasets/face/manifest.jsonl"
QUARANTINE_KEY = "datasets/face/quarantine.jsonl"
FORMAT_ALIASES = {"MPO": "JPEG"}      # phone cameras' multi-picture JPEGs open as MPO; the file is a JPEG
FILE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png"}  # decoded format -> extension in dest (else format.lower())

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class IngestConfig:
    """Limits and parallelism of one ingest run."""

    workers: int = WORKERS
    max_bytes: int = MAX_BYTES
    min_side: int = MIN_SIDE
    max_side: int = MAX_SIDE
    max_pixels: int = MAX_PIXELS
    allowed_formats: tuple[str, ...] = ALLOWED_FORMATS
    extensions: tuple[str, ...] = EXTENSIONS
    split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS

    def __post_init__(self) -> None:
        if not 1 <= self.workers <= MAX_WORKERS:
            raise ValueError(f"workers must be in [1, {MAX_WORKERS}] (the S3 connection pool), got {self.workers}")
        for name in ("max_bytes", "min_side", "max_pixels"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_side < self.min_side:
            raise ValueError(f"max_side must be >= min_side ({self.min_side}), got {self.max_side}")
        self.allowed_formats = tuple(f.upper() for f in self.allowed_formats)
        self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)
        if not self.allowed_formats or not self.extensions:
            raise ValueError(f"allowed_formats and extensions must not be empty, got "
                             f"{self.allowed_formats} and {self.extensions}")
        self.split_fractions = check_split_fractions(self.split_fractions)


@dataclass
class IngestReport:
    """What one run did. Counts: listed = new + skipped + duplicates + quarantined + failed."""

    listed: int = 0                   # objects under incoming/ (folder markers 'x/' excluded)
    new: int = 0                      # images written to dest and added to the manifest (one withdrawn
                                      # later in the same run for a conflict still counts; see ``conflicts``)
    skipped: int = 0                  # already in the manifest or the quarantine log (not downloaded)
    duplicates: int = 0               # same bytes and class as an image already held
    quarantined: int = 0              # refused this run (see ``quarantine``)
    failed: int = 0                   # download errors; retried next run (see ``failures``)
    restored: int = 0                 # manifest images missing from dest, downloaded again
    missing: int = 0                  # manifest images missing from dest whose object is gone or changed
    quarantine: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    # one row per content hash that met a conflict this run: sha256, keys, classes, and ``withdrawn``,
    # the dest path removed this run (None when the conflict was known from an earlier night)
    conflicts: list[dict[str, Any]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # "ok" images per class in the manifest
    manifest_rows: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain-types view for JSON."""
        return dataclasses.asdict(self)


class Refused(ValueError):
    """An object that is not ingested; the message is the quarantine reason."""


@dataclass(frozen=True)
class Checked:
    """A downloaded object that is a valid image: its bytes and what they are."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int


# ---------------------------------------------------------------------------------------------
# Manifest and quarantine log
# ---------------------------------------------------------------------------------------------
def _read_jsonl(store: Store, key: str) -> list[dict[str, Any]]:
    """Rows of a JSON-lines object; [] if it does not exist. A bad line stops the run (never rewritten)."""
    try:
        text = store.get_bytes(key).decode("utf-8")
    except FileNotFoundError:
        return []
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{store.uri(key)} line {n} is not valid JSON ({e}); fix or remove that line") from None
        if not isinstance(row, dict) or not {"key", "etag", "size"} <= row.keys():
            raise ValueError(f"{store.uri(key)} line {n} is not an object with key, etag and size: {line[:200]!r}")
        rows.append(row)
    return rows


def _jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows).encode("utf-8")


def read_manifest(store: Store) -> list[dict[str, Any]]:
    """All manifest rows ("ok" images, "duplicate" and "conflict" records), in ingest order."""
    return _read_jsonl(store, MANIFEST_KEY)


def read_quarantine(store: Store) -> list[dict[str, Any]]:
    """All quarantine rows (key, etag, size, reason, at; conflicts also sha256 and class), oldest first."""
    return _read_jsonl(store, QUARANTINE_KEY)


def identity(row: dict[str, Any] | ObjectInfo) -> tuple[str, str, int]:
    """(key, etag, size): what makes an object 'already seen'; a new etag under a key is a new object."""
    if isinstance(row, ObjectInfo):
        return row.key, row.etag, row.size
    return row["key"], row["etag"], int(row["size"])


def class_counts(rows: Iterable[dict[str, Any]]) -> dict[str, int]:
    """Images ("ok" rows) per class, sorted by class name."""
    counts = collections.Counter(r["class"] for r in rows if r.get("status", "ok") == "ok")
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Checks: key and size from the listing, then the downloaded bytes
# ---------------------------------------------------------------------------------------------
def class_of(info: ObjectInfo, cfg: IngestConfig) -> str:
    """The class of a listed object, or Refused saying why its key or size is not acceptable.

    Checked before any download: the key must be exactly incoming/<class>/<name> with an allowed
    extension and safe, visible, not too long parts; the size must be in [1, max_bytes].
    """
    try:
        safe_key(info.key)
    except ValueError as e:
        raise Refused(f"unsafe key: {e}") from None
    parts = info.key[len(INCOMING):].split("/") if info.key.startswith(INCOMING) else []
    if len(parts) != 2:
        raise Refused(f"key {info.key!r} is not {INCOMING}<class>/<name>")
    cls, name = parts
    if cls.startswith(".") or name.startswith("."):
        raise Refused(f"hidden class or file name in key {info.key!r}")
    if len(cls) > MAX_CLASS_CHARS or not cls.strip():
        raise Refused(f"class name {cls[:80]!r} is blank or over {MAX_CLASS_CHARS} characters")
    if len(name.encode()) > MAX_NAME_BYTES:
        raise Refused(f"file name {name[:80]!r}... is over {MAX_NAME_BYTES} bytes")
    if PurePosixPath(name).suffix.lower() not in cfg.extensions:
        raise Refused(f"extension of {name!r} is not one of {', '.join(cfg.extensions)}")
    if info.size == 0:
        raise Refused("empty object (0 bytes)")
    if info.size > cfg.max_bytes:
        raise Refused(f"object of {info.size} bytes is over the {cfg.max_bytes}-byte limit")
    return cls


def check_image(data: bytes, cfg: IngestConfig) -> Checked:
    """Validate image bytes in memory; Refused with the reason if they are not an acceptable image.

    Format and pixel count come from the header, before any pixel is decoded (decompression-bomb
    guard); then a full decode must succeed, which catches truncated and corrupt files.
    """
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
            w, h = img.size
            if fmt not in cfg.allowed_formats:
                raise Refused(f"format {fmt} not allowed ({', '.join(cfg.allowed_formats)})")
            if w * h > cfg.max_pixels:
                raise Refused(f"image {w}x{h} is over the {cfg.max_pixels}-pixel limit (decompression bomb guard)")
            if not (cfg.min_side <= w <= cfg.max_side and cfg.min_side <= h <= cfg.max_side):
                raise Refused(f"image {w}x{h} has a side outside [{cfg.min_side}, {cfg.max_side}] pixels")
            img.load()
    except Refused:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard, raised by open() from the header
        raise Refused(f"image is over the {cfg.max_pixels}-pixel limit (decompression bomb guard): {e}") from None
    except Image.UnidentifiedImageError:
        raise Refused("not an image: cannot identify image file") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any decoder error means a bad file, not a bad night
        raise Refused(f"truncated or corrupt image data: {type(e).__name__}: {e}") from None
    return Checked(data, hashlib.sha256(data).hexdigest(), fmt, w, h)


def fetch_and_check(store: Store, info: ObjectInfo, cfg: IngestConfig) -> Checked | Refused | Exception:
    """Download and validate one object (runs in a worker thread).

    Returns the Checked image, the Refused reason, or the download error (retried next night).
    """
    try:
        data = store.get_bytes(info.key)
    except Exception as e:  # noqa: BLE001 - reported per object; one failed GET must not end the night
        return e
    try:
        return check_image(data, cfg)
    except Refused as e:
        return e


# ---------------------------------------------------------------------------------------------
# Writing images
# ---------------------------------------------------------------------------------------------
def image_path(sha256: str, cls: str, fmt: str, cfg: IngestConfig) -> str:
    """dest-relative POSIX path: <split>/<class>/<sha256>.<ext>; the split depends on the content only."""
    ext = FILE_EXTENSIONS.get(fmt, fmt.lower())
    return f"{split_of(sha256, cfg.split_fractions)}/{cls}/{sha256}.{ext}"


def write_image(dest: Path, rel: str, data: bytes) -> None:
    """Write an image atomically; a file already there with the same size is the same content (its
    name is its sha256), e.g. left by a run killed before the manifest was written."""
    path = dest.joinpath(*PurePosixPath(safe_key(rel)).parts)
    if path.is_file() and path.stat().st_size == len(data):
        return
    write_atomic(path, lambda p: p.write_bytes(data))


def withdraw_conflicts(dest: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Remove from ``dest`` the files of "conflict" rows (unless an "ok" row holds the same path).

    Run every night, not only when a conflict is found: a run killed between removing a file and
    rewriting the manifest, or a tree copied back from a backup, cannot bring a conflicting image
    back into training. The folders of a class left without any "ok" image are removed when empty,
    so training does not find a class with no images. Returns the dest-relative paths removed.
    """
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    held = {r["path"] for r in ok}
    removed = []
    for rel in sorted({r["path"] for r in rows if r.get("status") == "conflict"} - held):
        path = dest.joinpath(*PurePosixPath(safe_key(rel)).parts)
        if path.is_file():
            path.unlink()
            removed.append(rel)
    for cls in {rel.split("/")[1] for rel in removed} - {r["class"] for r in ok}:
        for split in SPLITS:
            with contextlib.suppress(OSError):  # absent, or holds files the manifest does not know
                (dest / split / cls).rmdir()
    return removed


def make_tree(dest: Path, classes: Iterable[str]) -> None:
    """Create dest/<split>/<class>/ for every split and class, even empty ones.

    With all three split folders present ``faceclf.dataset.images.discover`` reads dest as already split
    (instead of taking 'train' and 'val' for class names), and every split has the same class
    folders, so an empty one is reported by name rather than shifting the class indices.
    """
    for split in SPLITS:
        for cls in classes:
            (dest / split / cls).mkdir(parents=True, exist_ok=True)
        (dest / split).mkdir(parents=True, exist_ok=True)


def ordered_map(pool: ThreadPoolExecutor, fn: Callable[[T], R], items: Iterable[T], window: int) -> Iterator[tuple[T, R]]:
    """(item, fn(item)) in input order, with at most ``window`` calls in flight.

    Ordered, so which of two identical objects wins does not depend on download timing; bounded,
    so downloaded bytes do not pile up in memory behind one slow request.
    """
    pending: collections.deque[tuple[T, Future[R]]] = collections.deque()
    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            first, fut = pending.popleft()
            yield first, fut.result()
    while pending:
        first, fut = pending.popleft()
        yield first, fut.result()


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------
def list_incoming(store: Store) -> list[ObjectInfo]:
    """Every object under incoming/ except S3 'folder' markers (keys ending in '/')."""
    return [o for o in store.list(INCOMING) if not o.key.endswith("/")]


def restore_missing(store: Store, dest: Path, rows: list[dict[str, Any]], listed: list[ObjectInfo],
                    pool: ThreadPoolExecutor, cfg: IngestConfig) -> tuple[int, int]:
    """Download again the "ok" manifest images missing from ``dest`` (e.g. a fresh worker).

    A source is any manifest row with the same sha256 whose object is still listed with the same
    etag; the bytes must hash to the sha256. Returns (restored, still missing).
    """
    current = {o.key: o.etag for o in listed}
    by_sha: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for r in rows:
        by_sha[r["sha256"]].append(r)
    where = store.uri(INCOMING.rstrip("/"))
    gone = [r for r in rows if r.get("status", "ok") == "ok"
            and not dest.joinpath(*PurePosixPath(safe_key(r["path"])).parts).is_file()]

    def restore(row: dict[str, Any]) -> bool:
        for src in by_sha[row["sha256"]]:
            if current.get(src["key"]) != src["etag"]:
                continue
            try:
                data = store.get_bytes(src["key"])
            except Exception as e:  # noqa: BLE001 - try the next source; counted as missing if none works
                log.warning("cannot restore %s from %s: %s", row["path"], store.uri(src["key"]), e)
                continue
            if hashlib.sha256(data).hexdigest() == row["sha256"]:
                write_image(dest, row["path"], data)
                return True
        log.warning("cannot restore %s: no object with its content is left under %s", row["path"], where)
        return False

    done = sum(ok for _, ok in ordered_map(pool, restore, gone, cfg.workers * 4))
    return done, len(gone) - done


def triage(listed: list[ObjectInfo], seen: set[tuple[str, str, int]], cfg: IngestConfig,
           report: IngestReport, now: str) -> list[tuple[ObjectInfo, str]]:
    """(object, class) pairs to download; counts the skipped and quarantines bad keys and sizes."""
    todo = []
    for info in listed:
        if identity(info) in seen:
            report.skipped += 1
            continue
        try:
            todo.append((info, class_of(info, cfg)))
        except Refused as e:
            report.quarantine.append(_quarantine_row(info, str(e), now))
    return todo


def ingest(store: Store, dest: str | os.PathLike[str], cfg: IngestConfig | None = None) -> IngestReport:
    """Bring ``dest`` and the manifest up to date with incoming/ (see the module docstring)."""
    cfg = cfg or IngestConfig()
    dest = Path(dest)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = read_manifest(store)
    quarantine_log = read_quarantine(store)
    seen = {identity(r) for r in rows} | {identity(r) for r in quarantine_log}
    owner = {r["sha256"]: r for r in rows if r.get("status", "ok") == "ok"}  # sha -> the row holding the file
    conflicted = {r["sha256"] for r in rows if r.get("status") == "conflict"}
    conflicts: dict[str, str | None] = {}  # sha met in a conflict this run -> dest path withdrawn this run

    listed = list_incoming(store)
    report = IngestReport(listed=len(listed))
    todo = triage(listed, seen, cfg, report, now)
    new_rows: list[dict[str, Any]] = []
    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="ingest") as pool:
        report.restored, report.missing = restore_missing(store, dest, rows, listed, pool, cfg)
        writes: list[Future[None]] = []
        results = ordered_map(pool, lambda t: fetch_and_check(store, t[0], cfg), todo, cfg.workers * 4)
        for (info, cls), result in progress(results, total=len(todo), desc="ingest", unit="img"):
            if isinstance(result, Refused):
                report.quarantine.append(_quarantine_row(info, str(result), now))
            elif not isinstance(result, Checked):
                log.warning("download of %s failed (retried next run): %s", store.uri(info.key), result)
                report.failures.append({"key": info.key, "etag": info.etag, "error": f"{type(result).__name__}: {result}"})
            elif result.sha256 in conflicted or (result.sha256 in owner and owner[result.sha256]["class"] != cls):
                sha = result.sha256
                reason = conflict_reason(sha, [*rows, *new_rows, *quarantine_log, *report.quarantine])
                if sha in conflicted:  # held out on an earlier night or earlier in this run
                    conflicts.setdefault(sha, None)
                else:
                    conflicts[sha] = mark_conflict(rows + new_rows, sha, info.key, cls, now)
                    conflicted.add(sha)
                    del owner[sha]
                report.quarantine.append({**_quarantine_row(info, reason, now), "sha256": sha, "class": cls})
            elif first := owner.get(result.sha256):
                new_rows.append({**_manifest_row(info, cls, result, first["path"], now),
                                 "status": "duplicate", "duplicate_of": first["key"]})
                report.duplicates += 1
            else:
                row = _manifest_row(info, cls, result, image_path(result.sha256, cls, result.format, cfg), now)
                writes.append(pool.submit(write_image, dest, row["path"], result.data))
                owner[result.sha256] = row
                new_rows.append(row)
                report.new += 1
        for w in writes:
            w.result()  # a failed local write (disk full) stops the run before the manifest claims the file

    # Before the manifest is rewritten: should the run die in between, the file is either gone or still
    # "ok" in the manifest, and the next night finds the conflict again.
    for rel in withdraw_conflicts(dest, rows + new_rows):
        log.warning("removed %s from %s: its content is held out of training as a label conflict", rel, dest)
    report.quarantined, report.failed = len(report.quarantine), len(report.failures)
    report.conflicts = [conflict_summary(sha, rows + new_rows, quarantine_log + report.quarantine, path)
                        for sha, path in conflicts.items()]
    if new_rows or any(conflicts.values()):  # new rows, or rows just marked "conflict"
        store.put_bytes(MANIFEST_KEY, _jsonl(rows + new_rows))
    if report.quarantine:
        store.put_bytes(QUARANTINE_KEY, _jsonl(quarantine_log + report.quarantine))
    for q in report.quarantine:
        log.warning("quarantined %r: %s", q["key"], q["reason"])  # repr: a key may hold control characters
    for c in report.conflicts:
        log.warning("conflict: the same image (sha256 %s) is labelled %s under %s; none of it is used for "
                    "training%s", c["sha256"], " and ".join(c["classes"]), c["keys"],
                    f" ({c['withdrawn']} removed from {dest})" if c["withdrawn"] else "")
    report.classes = class_counts(rows + new_rows)
    make_tree(dest, report.classes)
    report.manifest_rows = len(rows) + len(new_rows)
    log.info("ingest %s -> %s: listed %d, new %d, skipped %d, duplicates %d, quarantined %d, failed %d, "
             "restored %d, missing %d; manifest %d rows, images per class %s", store.uri(INCOMING.rstrip("/")), dest,
             report.listed, report.new, report.skipped, report.duplicates, report.quarantined, report.failed,
             report.restored, report.missing, report.manifest_rows, report.classes)
    return report


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


def _manifest_row(info: ObjectInfo, cls: str, img: Checked, path: str, now: str) -> dict[str, Any]:
    return {"key": info.key, "etag": info.etag, "size": info.size, "sha256": img.sha256, "class": cls,
            "split": path.split("/", 1)[0], "path": path, "format": img.format, "width": img.width,
            "height": img.height, "ingested_at": now, "status": "ok"}


def _quarantine_row(info: ObjectInfo, reason: str, now: str) -> dict[str, Any]:
    return {"key": info.key, "etag": info.etag, "size": info.size, "reason": reason, "at": now}
