"""Ingest new labelled face images from a Store (S3 bucket or local folder) into an ImageFolder tree.

    incoming/<class>/<name>          read only: never modified or deleted here; any name (the bytes decide)
      -> list, skip what the manifest or the quarantine log already holds (same key, etag and size),
         refuse bad keys and sizes and classes the pipeline does not know from the listing, download the
         rest in parallel, validate in memory (JPEG, PNG or WebP, judged from the bytes), hash (sha256),
         drop exact duplicates, quarantine what is refused (with a reason)
    dest/{train,val,test}/<class>/<sha256>.<jpg|png|webp>   the split of the image's nearest placed twin (pHash),
                                     else by content hash (faceclf.dataset.placement): never moves by itself
    datasets/face/manifest.jsonl     one row per ingested object, rewritten whole at the end of a run
    datasets/face/quarantine.jsonl   one row per refused object, this run's rows appended at the end

One concern per module: ``checks`` (what is accepted, and why not), ``manifest`` (the records in the
bucket: row statuses, duplicates and label conflicts), ``tree`` (the files in dest); this one runs a night.

Known classes: those of the manifest's rows and the champion's. An object of any other class is
quarantined (kind "unknown_class", reason saying how to take it), so one stray upload never reaches the
manifest, where it would stop every later night at the class check; ``allow_new_classes`` takes it, on this
run or a later one (such rows are not 'already seen' then). The very first ingest (no manifest rows, no
champion) takes every class.

Everything read back from the bucket is input: a manifest row is used only in its one legal form
(faceclf.dataset.manifest.row_problem), else the run stops before anything is written or removed.

Downloads that fail (network, object deleted meanwhile) are reported as ``failed`` and retried the next
night; they are not quarantined, because the object itself may be fine. Run one ingest at a time per
bucket: the manifest is read at the start and rewritten at the end.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hashlib
import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

from faceclf.config import IngestConfig
from faceclf.dataset.checks import Checked, Refused, class_of, fetch_and_check
from faceclf.dataset.faceset import FaceSet, from_manifest
from faceclf.dataset.manifest import (
    INCOMING,
    UNKNOWN_CLASS,
    class_counts,
    conflict_reason,
    conflict_summary,
    identity,
    manifest_row,
    mark_conflict,
    quarantine_row,
    read_manifest,
    read_quarantine,
    signature_of_row,
    write_manifest,
    write_quarantine,
)
from faceclf.dataset.near import signature_file, to_hex
from faceclf.dataset.placement import Placement, twin_counts
from faceclf.dataset.tree import (
    image_path,
    local_path,
    make_tree,
    withdraw_conflicts,
    write_image,
)
from faceclf.progress import progress
from faceclf.store.objects import ObjectInfo, Store
from faceclf.store.registry import champion_ref

log = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")
Row = dict[str, Any]


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
    joined_twins: int = 0             # new images placed in the split of a near-duplicate already held
    signed: int = 0                   # manifest images given their perceptual signature this run (older rows)
    # val / test images with a near-duplicate in train (after this run): a leak `faceclf resplit` removes
    twins: dict[str, int] = field(default_factory=lambda: {"val": 0, "test": 0})
    missing: int = 0                  # manifest images missing from dest whose object is gone or changed
    quarantine: list[Row] = field(default_factory=list)
    failures: list[Row] = field(default_factory=list)
    # one row per content hash that met a conflict this run: sha256, keys, classes, and ``withdrawn``,
    # the dest path removed this run (None when the conflict was known from an earlier night)
    conflicts: list[Row] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)  # "ok" images per class in the manifest
    manifest_rows: int = 0
    # the ingested face set, from the manifest (minus the missing files): what every later step takes
    faceset: FaceSet | None = field(default=None, repr=False, compare=False)
    new_sha256: list[str] = field(default_factory=list, repr=False, compare=False)  # this run's new images
    new_keys: list[str] = field(default_factory=list, repr=False, compare=False)    # their objects, in that order

    def to_dict(self) -> dict[str, Any]:
        """Plain-types view for JSON (the counts and rows; not the FaceSet nor the new images' digests)."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name not in ("faceset", "new_sha256", "new_keys")}


@dataclass
class Ledger:
    """One run's records: the manifest and quarantine log as read, and what the run adds to them.

    ``rows`` may be marked "conflict" in place; this run's refusals go to ``report.quarantine``.
    """

    rows: list[Row]                   # the manifest as read at the start
    quarantine_log: list[Row]         # the quarantine log as read at the start
    now: str                          # this run's timestamp, in every row it writes
    report: IngestReport = field(default_factory=IngestReport)
    new_rows: list[Row] = field(default_factory=list)
    owner: dict[str, Row] = field(default_factory=dict)   # sha -> the "ok" row holding the file
    conflicted: set[str] = field(default_factory=set)     # shas held out of training as label conflicts
    conflicts: dict[str, str | None] = field(default_factory=dict)  # sha met in a conflict this run ->
                                                                    # dest path withdrawn this run
    placement: Placement | None = None   # where new images go (set by ``place_from``, before any download)

    @classmethod
    def read(cls, store: Store, now: str) -> Ledger:
        """The manifest, then the quarantine log (a corrupt line in either stops the run)."""
        rows, quarantine_log = read_manifest(store), read_quarantine(store)
        return cls(rows, quarantine_log, now,
                   owner={r["sha256"]: r for r in rows if r.get("status", "ok") == "ok"},
                   conflicted={r["sha256"] for r in rows if r.get("status") == "conflict"})

    def seen(self, known: frozenset[str] | None) -> set[tuple[str, str, int]]:
        """Identities of every object already ingested or refused: not downloaded again. Except an object
        refused only for its class (kind "unknown_class") when that class is now taken: ``known`` holds it,
        or is None (every class taken)."""
        def retried(q: Row) -> bool:
            return q.get("kind") == UNKNOWN_CLASS and (known is None or q.get("class") in known)

        return {identity(r) for r in self.rows} | {identity(q) for q in self.quarantine_log if not retried(q)}

    def manifest(self) -> list[Row]:
        """The manifest as it stands now: the rows read, then this run's."""
        return self.rows + self.new_rows

    def place_from(self, cfg: IngestConfig) -> None:
        """Start placing new images: every "ok" row read, with its signature and split, is a possible twin."""
        self.placement = Placement(cfg.split_fractions, cfg.near_distance)
        for r in self.rows:
            if r.get("status", "ok") == "ok":
                self.placement.add(r["sha256"], signature_of_row(r), r["split"])

    def refuse(self, info: ObjectInfo, reason: str) -> None:
        self.report.quarantine.append(quarantine_row(info, reason, self.now))

    def take(self, info: ObjectInfo, cls: str, img: Checked, cfg: IngestConfig) -> Row | None:
        """Record a valid image as a conflict, a duplicate or a new image; returns the new image's
        "ok" row (its file is still to be written), else None."""
        sha = img.sha256
        if sha in self.conflicted or (sha in self.owner and self.owner[sha]["class"] != cls):
            self.hold_out(info, cls, sha)
            return None
        if first := self.owner.get(sha):
            self.new_rows.append({**manifest_row(info, cls, img, first["path"], self.now),
                                  "status": "duplicate", "duplicate_of": first["key"]})
            self.report.duplicates += 1
            return None
        if self.placement is None:
            raise RuntimeError("Ledger.place_from must run before images are taken")
        placed = self.placement.place(sha, img.signature)
        if placed.twin:
            self.report.joined_twins += 1
            log.info("%s goes to %s: its near-duplicate %s (%d bits apart) is there", info.key, placed.split,
                     placed.twin[:12], placed.distance)
        row = manifest_row(info, cls, img, image_path(sha, cls, img.format, placed.split), self.now)
        self.owner[sha] = row
        self.new_rows.append(row)
        self.report.new += 1
        return row

    def hold_out(self, info: ObjectInfo, cls: str, sha: str) -> None:
        """Quarantine ``info`` labelled ``cls``, whose bytes ``sha`` are held under another class (every row
        holding them becomes "conflict", its file withdrawn at the end of the run) or are held out already."""
        reason = conflict_reason(sha, [*self.rows, *self.new_rows, *self.quarantine_log, *self.report.quarantine])
        if sha in self.conflicted:  # held out on an earlier night or earlier in this run
            self.conflicts.setdefault(sha, None)
        else:
            self.conflicts[sha] = mark_conflict(self.manifest(), sha, info.key, cls, self.now)
            self.conflicted.add(sha)
            del self.owner[sha]
        self.report.quarantine.append({**quarantine_row(info, reason, self.now), "sha256": sha, "class": cls})


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


def restore_missing(store: Store, dest: Path, rows: list[Row], listed: list[ObjectInfo],
                    pool: ThreadPoolExecutor, cfg: IngestConfig) -> tuple[int, list[str]]:
    """Download again the "ok" manifest images missing from ``dest`` (e.g. a fresh worker).

    A source is any manifest row with the same sha256 whose object is still listed with the same
    etag; the bytes must hash to the sha256. Returns (restored, dest paths still missing).
    """
    current = {o.key: o.etag for o in listed}
    by_sha: dict[str, list[Row]] = collections.defaultdict(list)
    for r in rows:
        by_sha[r["sha256"]].append(r)
    where = store.uri(INCOMING.rstrip("/"))
    gone = [r for r in rows if r.get("status", "ok") == "ok" and not local_path(dest, r["path"]).is_file()]

    def restore(row: Row) -> bool:
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

    results = list(ordered_map(pool, restore, gone, cfg.workers * 4))
    return sum(ok for _, ok in results), [row["path"] for row, ok in results if not ok]


def known_classes(rows: list[Row], champion_classes: Sequence[str]) -> frozenset[str] | None:
    """The classes an upload may have: those of the manifest's rows and the champion's; None (any class)
    when there are neither, i.e. the very first ingest. Every row counts, "conflict" ones too: a class whose
    only image was held out as a label conflict was still taken once, and is no stray upload."""
    return frozenset({r["class"] for r in rows} | set(champion_classes)) or None


def unknown_class_reason(cls: str, known: frozenset[str]) -> str:
    """The quarantine reason of an object whose class the pipeline does not know: what to do about it."""
    names = sorted(known)
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return (f"class {cls!r} is not one the pipeline knows (known: {shown}); rerun with allow_new_classes=true "
            "to take it")


def triage(listed: list[ObjectInfo], seen: set[tuple[str, str, int]], known: frozenset[str] | None,
           cfg: IngestConfig, report: IngestReport, now: str) -> list[tuple[ObjectInfo, str]]:
    """(object, class) pairs to download; counts the skipped and quarantines bad keys and sizes, and
    objects of a class not in ``known`` (None: any class is taken)."""
    todo = []
    for info in listed:
        if identity(info) in seen:
            report.skipped += 1
            continue
        try:
            cls = class_of(info, cfg)
        except Refused as e:
            report.quarantine.append(quarantine_row(info, str(e), now))
            continue
        if known is not None and cls not in known:
            report.quarantine.append({**quarantine_row(info, unknown_class_reason(cls, known), now),
                                      "class": cls, "kind": UNKNOWN_CLASS})
            continue
        todo.append((info, cls))
    return todo


def download_new(store: Store, dest: Path, todo: list[tuple[ObjectInfo, str]], ledger: Ledger,
                 pool: ThreadPoolExecutor, cfg: IngestConfig) -> None:
    """Download and check ``todo`` in parallel, record each outcome in listing order, write new images."""
    writes: list[Future[None]] = []
    results = ordered_map(pool, lambda t: fetch_and_check(store, t[0], cfg), todo, cfg.workers * 4)
    for (info, cls), result in progress(results, total=len(todo), desc="ingest", unit="img"):
        if isinstance(result, Refused):
            ledger.refuse(info, str(result))
        elif not isinstance(result, Checked):
            log.warning("download of %s failed (retried next run): %s", store.uri(info.key), result)
            ledger.report.failures.append({"key": info.key, "etag": info.etag,
                                           "error": f"{type(result).__name__}: {result}"})
        elif row := ledger.take(info, cls, result, cfg):
            writes.append(pool.submit(write_image, dest, row["path"], result.data))
    for w in writes:
        w.result()  # a failed local write (disk full) stops the run before the manifest claims the file


def sign_rows(dest: Path, rows: list[Row], pool: ThreadPoolExecutor) -> int:
    """Give every "ok" row without a perceptual signature (written before signatures existed) the one of its
    file in ``dest``, in place; rows whose file is missing stay unsigned (never a twin) until it is restored.
    Returns how many were signed. Done once per row: the signature is then kept in the manifest."""
    todo = [r for r in rows if r.get("status", "ok") == "ok" and "phash" not in r
            and local_path(dest, r["path"]).is_file()]

    def sign(row: Row) -> str | None:
        try:
            sig = signature_file(local_path(dest, row["path"]))
            return to_hex(sig.value) if sig else None   # a flat image has none (and is tried again next night)
        except Exception as e:  # noqa: BLE001 - a file that no longer decodes stays unsigned; training reports it
            log.warning("cannot sign %s: %s", row["path"], e)
            return None

    signed = 0
    for row, sig in progress(zip(todo, pool.map(sign, todo)), total=len(todo), desc="sign", unit="img"):
        if sig is not None:
            row["phash"] = sig
            signed += 1
    return signed


def save(store: Store, dest: Path, ledger: Ledger) -> None:
    """Withdraw conflicting files from dest, then write the manifest and quarantine log if they changed."""
    report = ledger.report
    # Before the manifest is rewritten: should the run die in between, the file is either gone or still
    # "ok" in the manifest, and the next night finds the conflict again.
    for rel in withdraw_conflicts(dest, ledger.manifest()):
        log.warning("removed %s from %s: its content is held out of training as a label conflict", rel, dest)
    report.quarantined, report.failed = len(report.quarantine), len(report.failures)
    report.conflicts = [conflict_summary(sha, ledger.manifest(), ledger.quarantine_log + report.quarantine, path)
                        for sha, path in ledger.conflicts.items()]
    if ledger.new_rows or any(ledger.conflicts.values()) or report.signed:  # new rows, rows just marked
        write_manifest(store, ledger.manifest())                            # "conflict", or just signed
    if report.quarantine:
        write_quarantine(store, ledger.quarantine_log + report.quarantine)


def log_refusals(dest: Path, report: IngestReport) -> None:
    """One warning per object quarantined this run and per conflict met."""
    for q in report.quarantine:
        log.warning("quarantined %r: %s", q["key"], q["reason"])  # repr: a key may hold control characters
    for c in report.conflicts:
        log.warning("conflict: the same image (sha256 %s) is labelled %s under %s; none of it is used for "
                    "training%s", c["sha256"], " and ".join(c["classes"]), c["keys"],
                    f" ({c['withdrawn']} removed from {dest})" if c["withdrawn"] else "")


def ingest(store: Store, dest: str | os.PathLike[str], cfg: IngestConfig | None = None,
           champion_classes: Sequence[str] | None = None) -> IngestReport:
    """Bring ``dest`` and the manifest up to date with incoming/ (see the module docstring).

    ``champion_classes``: the current champion's classes (() before the first promotion), known classes
    with the manifest's; None reads them here from champion.json (unless ``cfg.allow_new_classes``). A
    manifest row not in its legal form stops the run (ValueError naming the line) before any write.
    """
    cfg = cfg or IngestConfig()
    dest = Path(dest)
    ledger = Ledger.read(store, now=datetime.now(timezone.utc).isoformat(timespec="seconds"))
    report = ledger.report
    known = None
    if not cfg.allow_new_classes:
        if champion_classes is None:
            champion = champion_ref(store)
            champion_classes = champion.classes if champion else ()
        known = known_classes(ledger.rows, champion_classes)
    listed = list_incoming(store)
    report.listed = len(listed)
    todo = triage(listed, ledger.seen(known), known, cfg, report, ledger.now)
    with ThreadPoolExecutor(cfg.workers, thread_name_prefix="ingest") as pool:
        report.restored, missing = restore_missing(store, dest, ledger.rows, listed, pool, cfg)
        report.missing = len(missing)
        report.signed = sign_rows(dest, ledger.rows, pool)
        ledger.place_from(cfg)
        download_new(store, dest, todo, ledger, pool, cfg)
    save(store, dest, ledger)
    ok = [r for r in ledger.manifest() if r.get("status", "ok") == "ok"]
    report.twins = twin_counts(((r["split"], signature_of_row(r)) for r in ok), cfg.near_distance)
    log_refusals(dest, report)
    report.classes = class_counts(ledger.manifest())
    make_tree(dest, report.classes)
    report.manifest_rows = len(ledger.manifest())
    report.faceset = from_manifest(ledger.manifest(), dest, missing)
    fresh = [r for r in ledger.new_rows if r.get("status", "ok") == "ok"]
    report.new_sha256, report.new_keys = [r["sha256"] for r in fresh], [r["key"] for r in fresh]
    log.info("ingest %s -> %s: listed %d, new %d (%d joined a near-duplicate's split), skipped %d, duplicates %d, "
             "quarantined %d, failed %d, restored %d, missing %d; manifest %d rows, images per class %s",
             store.uri(INCOMING.rstrip("/")), dest, report.listed, report.new, report.joined_twins, report.skipped,
             report.duplicates, report.quarantined, report.failed, report.restored, report.missing,
             report.manifest_rows, report.classes)
    if report.twins.get("test"):
        log.warning("%d test image(s) have a near-duplicate in train (placed before near-duplicates decided the "
                    "split): the test accuracy partly measures memory; `faceclf resplit` moves them",
                    report.twins["test"])
    return report


def ingest_in_child(location: str, dest: str | os.PathLike[str], cfg: IngestConfig | None = None,
                    champion_classes: Sequence[str] | None = None) -> IngestReport:
    """``ingest`` of the bucket (or local bucket folder) at ``location``, run in a fresh child process.

    Reading and rewriting the manifest costs about 3.5 KB of heap per image (JSON rows as dicts); glibc
    keeps most of it after ingest returns, so a night that ingests in its own process carries it into
    training (measured at 100,000 images: ingest peaked at 670 MiB, training then at 700-750 MiB against
    about 640 in a fresh process). In a child it is handed back when the child exits; only the report and
    its FaceSet (numpy columns) come back. Log records come back too (faceclf.child).
    """
    from faceclf.child import run_in_child

    classes = None if champion_classes is None else tuple(champion_classes)
    return run_in_child(_ingest_location, location, str(dest), cfg, classes, name="faceclf-ingest")


def _ingest_location(location: str, dest: str, cfg: IngestConfig | None,
                     champion_classes: tuple[str, ...] | None) -> IngestReport:
    """The child of ``ingest_in_child``: open the store here (a boto3 client does not travel), ingest."""
    from faceclf.store.objects import open_store

    return ingest(open_store(location), dest, cfg, champion_classes)
