"""Arrivals: how many objects in incoming/ no ingest has taken yet, cheap enough to ask every few minutes.

A night started by data rather than the clock needs one question answered often: have at least N images
arrived that the next ingest would take? The answer is a poll (no queue to set up, and it works on any
S3-compatible endpoint and on a local bucket folder alike):

    list incoming/ (pages of 1,000 keys on S3)   against   what ingest already holds: every (key, ETag, size) of
                                                            manifest.jsonl and quarantine.jsonl, as a sorted
                                                            array of 64-bit hashes cached on the worker's disk
                                                            under the two logs' listed ETags (rebuilt only after
                                                            an ingest changed them)

The listing stops as soon as ``min_new_images`` new objects are counted: a burst of uploads is seen on its
first pages. A quiet bucket costs the whole listing (what one poll costs at 1M keys: README).

``announcement`` decides whether to announce: only with at least ``min_new_images`` new, and only once per
state of the logs: after an announcement, the same unchanged logs are not announced again until
``renotify_after`` seconds have passed (the night it started failed or never ran), so one burst of uploads starts
one night, not one per poll. The last announcement is datasets/face/arrivals.json in the bucket, claimed by
compare-and-swap, so two pollers at once announce once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from faceclf.config import WatchConfig
from faceclf.dataset.manifest import INCOMING, MANIFEST_KEY, QUARANTINE_KEY, identity, read_manifest, read_quarantine
from faceclf.store.atomic import write_atomic
from faceclf.store.objects import ObjectInfo, PreconditionFailed, Store

log = logging.getLogger(__name__)

ARRIVALS_KEY = "datasets/face/arrivals.json"  # the last announcement: when, and the logs' state it was made on
EXAMPLES = 5                                  # new keys named in an announcement (for people reading the event)
CACHE_PREFIX = "seen-"                        # cache files: <cache_dir>/seen-<records tag>.npy


@dataclass(frozen=True)
class Arrivals:
    """One poll of incoming/: new objects counted against the ingest logs, and what it cost."""

    new: int               # objects no ingest has taken (at least this many where ``complete`` is False)
    complete: bool         # False: the listing stopped once ``new`` reached min_new_images
    listed: int            # objects listed (S3: one LIST request per 1,000)
    seconds: float         # the poll's wall time, logs included
    records: str           # change detector of manifest.jsonl + quarantine.jsonl (their listed ETags and sizes)
    examples: list[str] = field(default_factory=list)  # the first new keys

    def to_dict(self) -> dict[str, Any]:
        """Plain types, for the flow's result and the event's payload."""
        return asdict(self)


def identity_hash(key: str, etag: str, size: int) -> int:
    """A 64-bit hash of one (key, ETag, size) identity: 8 bytes an object, so a million fit in 8 MB. A
    collision (odds ~N^2/2^65: 1 in 3.7e7 at 1M objects) could hide one new object from one poll; the night
    would still ingest it."""
    return int.from_bytes(hashlib.blake2b(f"{key}\n{etag}\n{size}".encode(), digest_size=8).digest(), "little")


def identity_hashes(identities: Iterable[tuple[str, str, int]]) -> np.ndarray:
    """Sorted uint64 ``identity_hash`` of each identity: a page of a listing is then checked against them with
    one searchsorted."""
    return np.sort(np.fromiter((identity_hash(*i) for i in identities), dtype=np.uint64))


def records_tag(store: Store) -> str:
    """What changes whenever an ingest writes its logs: the listed ETag and size of manifest.jsonl and
    quarantine.jsonl (one LIST each; a local folder: size and mtime, nothing read)."""
    parts = []
    for key in (MANIFEST_KEY, QUARANTINE_KEY):
        found = [o for o in store.list_stat(key) if o.key == key]
        parts.append(f"{found[0].etag}:{found[0].size}" if found else "-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def ingested_identities(store: Store) -> Iterable[tuple[str, str, int]]:
    """Every (key, ETag, size) ingest holds: manifest rows of any status and every quarantine row (an object
    refused once is not downloaded again, so it is not new)."""
    for row in read_manifest(store):
        yield identity(row)
    for row in read_quarantine(store):
        yield identity(row)


def save_array(path: Path, array: np.ndarray) -> None:
    """``array`` as .npy at exactly ``path`` (np.save given a name would add ".npy" to a temporary one)."""
    with open(path, "wb") as f:
        np.save(f, array, allow_pickle=False)


def seen_hashes(store: Store, cache_dir: Path | None) -> tuple[np.ndarray, str]:
    """(sorted identity hashes of what ingest holds, the logs' tag): from ``cache_dir``/seen-<tag>.npy when an
    earlier poll cached this very state of the logs, else read from the logs (and cached, older files removed)."""
    tag = records_tag(store)
    path = cache_dir / f"{CACHE_PREFIX}{tag}.npy" if cache_dir else None
    if path and path.is_file():
        try:
            return np.load(path, allow_pickle=False), tag
        except (OSError, ValueError) as e:  # a damaged cache file is rebuilt, never trusted
            log.warning("rebuilding %s: %s", path, e)
    seen = identity_hashes(ingested_identities(store))
    if path:
        write_atomic(path, lambda tmp: save_array(tmp, seen))
        for old in path.parent.glob(f"{CACHE_PREFIX}*.npy"):
            if old != path:
                old.unlink(missing_ok=True)
    return seen, tag


def page_of(listing: Iterable[ObjectInfo], size: int) -> Iterable[list[ObjectInfo]]:
    """The listing in lists of ``size`` objects (folder markers, keys ending in /, left out as ingest does)."""
    page: list[ObjectInfo] = []
    for info in listing:
        if info.key.endswith("/"):
            continue
        page.append(info)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def is_new(seen: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Which of ``hashes`` (uint64, any order) are not in the sorted ``seen``: a bool array."""
    if not len(seen):
        return np.ones(len(hashes), dtype=bool)
    at = np.minimum(np.searchsorted(seen, hashes), len(seen) - 1)
    return seen[at] != hashes


def count_new(store: Store, seen: np.ndarray, stop_at: int | None, page: int = 1000) -> tuple[int, int, bool, list[str]]:
    """(new, listed, complete, first new keys) of incoming/ against ``seen``: the listing stops once ``new``
    reaches ``stop_at`` (None: list it all)."""
    new = listed = 0
    examples: list[str] = []
    for objects in page_of(store.list(INCOMING), page):
        fresh = is_new(seen, np.fromiter((identity_hash(*identity(o)) for o in objects), dtype=np.uint64))
        new += int(fresh.sum())
        examples += [o.key for o, f in zip(objects, fresh) if f][:EXAMPLES - len(examples)]
        listed += len(objects)
        if stop_at is not None and new >= stop_at:
            return new, listed, False, examples
    return new, listed, True, examples


def poll(store: Store, cfg: WatchConfig, cache_dir: Path | None = None) -> Arrivals:
    """Count what arrived in incoming/ since the last ingest (stopping at ``cfg.min_new_images``)."""
    t0 = time.perf_counter()
    seen, tag = seen_hashes(store, cache_dir)
    new, listed, complete, examples = count_new(store, seen, max(1, cfg.min_new_images))
    arrivals = Arrivals(new, complete, listed, round(time.perf_counter() - t0, 3), tag, examples)
    log.info("incoming/: %s%d new of %d listed (ingest holds %d) in %.2fs", "" if complete else "at least ", new,
             listed, len(seen), arrivals.seconds)
    return arrivals


def read_state(store: Store) -> tuple[dict[str, Any] | None, str | None]:
    """The last announcement (arrivals.json) and its ETag; (None, None) before the first. It is input: a
    malformed one counts as none (so the worst it can do is one announcement too many), with a warning."""
    try:
        data, etag = store.get_versioned(ARRIVALS_KEY)
    except FileNotFoundError:
        return None, None
    try:
        state = json.loads(data)
        ok = isinstance(state, dict) and isinstance(state.get("records"), str) and \
            isinstance(state.get("announced_at"), (int, float)) and not isinstance(state["announced_at"], bool)
    except ValueError:
        ok = False
    if not ok:
        log.warning("ignoring %s: not an announcement record", store.uri(ARRIVALS_KEY))
        return None, etag
    return state, etag


def announcement(arrivals: Arrivals, state: dict[str, Any] | None, cfg: WatchConfig, now: float) -> str | None:
    """Why these arrivals start a night, or None: at least ``min_new_images`` new, and not already announced on
    the same state of the ingest logs less than ``renotify_after`` seconds ago."""
    if arrivals.new < max(1, cfg.min_new_images):
        return None
    if state and state["records"] == arrivals.records and now - state["announced_at"] < cfg.renotify_after:
        return None
    more = "" if arrivals.complete else "at least "
    again = " again: the night announced before has not ingested them" if state and \
        state["records"] == arrivals.records else ""
    return f"{more}{arrivals.new} new images in incoming/ (min_new_images {cfg.min_new_images}){again}"


def claim(store: Store, arrivals: Arrivals, reason: str, etag: str | None, now: float) -> bool:
    """Record this announcement in arrivals.json by compare-and-swap on the ETag read with the state; False when
    another poller announced first (it then starts the night)."""
    record = {"announced_at": now, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
              "records": arrivals.records, "new": arrivals.new, "reason": reason}
    try:
        store.put_if(ARRIVALS_KEY, json.dumps(record, indent=2).encode(), etag)
    except PreconditionFailed:
        log.info("another poller announced these arrivals first")
        return False
    return True


def release(store: Store, previous: dict[str, Any] | None) -> None:
    """Undo ``claim`` when the announcement could not be sent: put back the record before it (or none), so the
    next poll announces again instead of waiting ``renotify_after``."""
    if previous is None:
        store.delete(ARRIVALS_KEY)
    else:
        store.put_bytes(ARRIVALS_KEY, json.dumps(previous, indent=2).encode())
