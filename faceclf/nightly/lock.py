"""One night at a time: a lease object in the bucket for every worker on every host, and a file lock on the
local face/ folder.

The lease (models/face/lease.json) is created with a conditional write (If-None-Match: *), renewed by
compare-and-swap (If-Match on the ETag of the holder's last write) every third of its term from a background
thread, and taken over only once it has expired, by compare-and-swap again: of two workers that find it
expired, one wins. A holder that dies stops renewing and the lease lapses after ``seconds`` (at once for a
worker on the same host, which sees that the holder's process is gone: a killed night's rerun need not wait); a
holder that
finds its lease taken over (it could not renew in time) knows it lost it (``Lease.ensure`` raises) and must not
publish. `faceclf ingest` and `faceclf models promote` take the same lease, so neither runs during a night.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock, Timeout

from faceclf.config import LEASE_SECONDS
from faceclf.store.objects import PreconditionFailed, Store
from faceclf.store.registry import MODELS_PREFIX, read_pointer, who

log = logging.getLogger(__name__)

LOCK_FILE = ".night.lock"               # in face_dir; it also says who holds it
LEASE_KEY = MODELS_PREFIX + "lease.json"


class NightLocked(RuntimeError):
    """Another night (or ingest, or promote) holds the bucket's lease or the face/ folder's lock."""


class LeaseLost(RuntimeError):
    """This worker's lease was taken over by another (it could not renew in time): it must not publish."""


def _stamp(t: float) -> str:
    """Epoch seconds as an ISO UTC time, for people reading lease.json and refusals."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


@dataclass
class Lease:
    """A lease this worker holds: what it last wrote (``etag``), for how long each renewal extends it."""

    store: Store
    holder: str                       # user@host pid N (purpose) token: unique per acquisition
    purpose: str
    seconds: int
    etag: str = ""
    expires_at: float = 0.0
    lost: threading.Event = field(default_factory=threading.Event)

    def body(self, expires_at: float) -> bytes:
        """lease.json's content: who holds it, why, until when (epoch seconds and readable)."""
        return (json.dumps({"holder": self.holder, "purpose": self.purpose, "host": socket.gethostname(),
                            "pid": os.getpid(), "expires_at": expires_at,
                            "expires": _stamp(expires_at), "written_at": _stamp(time.time())}, indent=2) + "\n").encode()

    def renew(self) -> None:
        """Extend the lease by ``seconds`` from now, by compare-and-swap on this holder's last write; a lost swap
        means another worker took the lease over: marked lost (``ensure`` raises from then on)."""
        expires_at = time.time() + self.seconds
        try:
            self.etag = self.store.put_if(LEASE_KEY, self.body(expires_at), self.etag)
            self.expires_at = expires_at
        except PreconditionFailed:
            self.lost.set()
            log.error("the lease %s was taken over by another worker: this one must not publish",
                      self.store.uri(LEASE_KEY))

    def keep(self, stop: threading.Event) -> None:
        """Renew every third of the term until ``stop``; a store that cannot be reached is retried at the next
        tick, and the lease counts as lost once its term has passed without a renewal."""
        while not stop.wait(self.seconds / 3):
            try:
                self.renew()
            except Exception as e:  # noqa: BLE001 - a transient store failure: try again next tick
                log.warning("could not renew the lease %s: %s", self.store.uri(LEASE_KEY), e)
                if time.time() >= self.expires_at:
                    self.lost.set()
            if self.lost.is_set():
                return

    def ensure(self) -> None:
        """LeaseLost unless this worker still holds the lease (call it before a step that publishes)."""
        if self.lost.is_set() or time.time() >= self.expires_at:
            raise LeaseLost(f"this worker ({self.holder}) no longer holds {self.store.uri(LEASE_KEY)}: another "
                            "worker may be running; nothing was published")

    def release(self) -> None:
        """Mark the lease expired (compare-and-swap: a lease already taken over is left to its new holder)."""
        with contextlib.suppress(PreconditionFailed):
            self.etag = self.store.put_if(LEASE_KEY, self.body(0.0), self.etag)


def process_gone(pid: Any) -> bool:
    """True when no process ``pid`` exists on this host (one we may not signal exists)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def held_by_other(current: dict[str, Any] | None, now: float) -> bool:
    """True when lease.json names a holder whose term has not passed and, if it ran on this host, whose process
    still exists (a missing or malformed lease has lapsed)."""
    current = current or {}
    expires_at = current.get("expires_at")
    if not isinstance(expires_at, (int, float)) or expires_at <= now:
        return False
    return not (current.get("host") == socket.gethostname() and process_gone(current.get("pid")))


def acquire_lease(store: Store, purpose: str, seconds: int = LEASE_SECONDS) -> Lease:
    """Take the bucket's lease for ``purpose``, or NightLocked naming its holder and when it expires."""
    lease = Lease(store, f"{who()} pid {os.getpid()} ({purpose}) {secrets.token_hex(4)}", purpose, seconds)
    expires_at = time.time() + seconds
    try:
        lease.etag = store.put_if(LEASE_KEY, lease.body(expires_at), None)
    except PreconditionFailed:
        current, etag = read_pointer(store, LEASE_KEY)
        if held_by_other(current, time.time()):
            raise NightLocked(f"{store.uri(LEASE_KEY)} is held by {current.get('holder')!r} until "  # type: ignore[union-attr]
                              f"{current.get('expires')} (renewed while it runs); {purpose} did nothing") from None
        try:  # lapsed or released: take it over, unless another worker does so first
            lease.etag = store.put_if(LEASE_KEY, lease.body(expires_at), etag)
        except PreconditionFailed:
            raise NightLocked(f"another worker took {store.uri(LEASE_KEY)} at the same moment; "
                              f"{purpose} did nothing") from None
    lease.expires_at = expires_at
    log.info("holding %s until renewed or released (%s)", store.uri(LEASE_KEY), lease.holder)
    return lease


@contextlib.contextmanager
def bucket_lease(store: Store, purpose: str, seconds: int = LEASE_SECONDS) -> Iterator[Lease]:
    """Hold the bucket's lease for the block (renewed in the background), released at the end however it ends."""
    lease = acquire_lease(store, purpose, seconds)
    stop = threading.Event()
    keeper = threading.Thread(target=lease.keep, args=(stop,), name="faceclf-lease", daemon=True)
    keeper.start()
    try:
        yield lease
    finally:
        stop.set()
        keeper.join()
        try:
            lease.release()
        except Exception as e:  # noqa: BLE001 - it lapses by itself after its term
            log.warning("could not release the lease %s (it lapses by %s): %s", store.uri(LEASE_KEY),
                        _stamp(lease.expires_at), e)


@contextlib.contextmanager
def night_lock(face_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on face_dir for the whole night; refuse at once if another night holds it.

    The lock is the kernel's flock, released when the holder dies, so a killed night never leaves a
    stale lock. The holder writes its pid and start time into the file for the refusal message.
    """
    face_dir.mkdir(parents=True, exist_ok=True)
    path = face_dir / LOCK_FILE
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        holder = path.read_text().strip() if path.is_file() else ""
        raise NightLocked(f"another night is running on {face_dir} ({holder or 'unknown'}); this one did nothing") from None
    try:
        path.write_text(f"pid {os.getpid()} since {_stamp(time.time())}\n")
        yield
    finally:
        path.write_text("")
        lock.release()
