"""One night at a time on a face/ folder: an exclusive, non-blocking file lock (filelock) held all night."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

LOCK_FILE = ".night.lock"          # in face_dir; it also says who holds it


class NightLocked(RuntimeError):
    """Another night is running on the same face/ folder."""


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
        path.write_text(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}\n")
        yield
    finally:
        path.write_text("")
        lock.release()
