"""One small object-store interface over a bucket and a local folder.

Everything that reads or writes the bucket layout (incoming/, datasets/face/, models/face/,
predictions/) goes through a ``Store``, so a user without a bucket runs the same code on a folder.
``open_store`` picks the backend: a local folder here, or S3 (faceclf.store.s3, imported only when
asked for, so boto3 is loaded only for S3). A missing object is a FileNotFoundError in both.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
from abc import ABC, abstractmethod
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path, PurePosixPath
from typing import Iterator

from faceclf.config import LINK_SECONDS
from faceclf.dataset.layout import sha256_file
from faceclf.store.atomic import write_atomic


@dataclass(frozen=True)
class ObjectInfo:
    """A listed object: key relative to the store, ETag (change detector) and size in bytes."""

    key: str
    etag: str
    size: int


class PreconditionFailed(RuntimeError):
    """A conditional write lost: the object changed, appeared or vanished since the writer read it (S3's 412
    PreconditionFailed or 409 ConditionalRequestConflict). Read it again and decide again."""


def safe_key(key: str) -> str:
    """Return ``key`` if it is a plain relative POSIX key, else raise ValueError saying why.

    Refused: empty, absolute, '..' or '.' parts, backslashes, NUL or other control characters,
    parts over 255 bytes. Such keys could write outside a local folder.
    """
    if not key or key.startswith("/"):
        raise ValueError(f"key {key!r} is empty or absolute")
    if "\\" in key or any(ord(c) < 32 or ord(c) == 127 for c in key):
        raise ValueError(f"key {key!r} holds a backslash or control character")
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts[:-1]) or parts[-1] in ("", ".", ".."):
        raise ValueError(f"key {key!r} has an empty, '.' or '..' path part")
    if any(len(p.encode()) > 255 for p in parts):
        raise ValueError(f"key {key[:80]!r}... has a path part over 255 bytes")
    return key


class Store(ABC):
    """Keys are '/'-separated and relative to the store's root (bucket or folder)."""

    @abstractmethod
    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        """Every object whose key starts with ``prefix`` (and sorts after ``start_after``), in key order.

        Lazy: a listing of millions of keys is read page by page, never held whole."""

    def list_stat(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        """``list``, with a cheap change detector as the ETag instead of a content hash: a bucket's listed ETag
        (this default: ``list`` itself), a local file's size and mtime (``stat_etag``), so listing a folder
        reads no file. For what only needs to notice a change (scoring's --incremental, keys of parts)."""
        return self.list(prefix, start_after)

    @abstractmethod
    def get_bytes(self, key: str) -> bytes:
        """The object's content; FileNotFoundError if it does not exist."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes) -> None:
        """Write the whole object at once: readers see the old or the new content, never a mix."""

    @abstractmethod
    def get_versioned(self, key: str) -> tuple[bytes, str]:
        """The object's content and the ETag it had when read (for ``put_if``); FileNotFoundError if absent."""

    @abstractmethod
    def _put_conditional(self, key: str, data: bytes, etag: str | None) -> str:
        """Write ``data`` only if ``key``'s ETag is still ``etag`` (None: only if ``key`` does not exist);
        return the new ETag, or raise PreconditionFailed."""

    def put_if(self, key: str, data: bytes, etag: str | None) -> str:
        """Compare-and-swap: replace ``key`` only if it still has the ETag ``etag`` that was read (None: create it
        only if it does not exist); return the new ETag, or raise PreconditionFailed when another writer came
        first. A write that landed but whose answer was lost (a retried request then fails its own condition) is
        recognised by its content and counts as done."""
        try:
            return self._put_conditional(key, data, etag)
        except PreconditionFailed:
            with contextlib.suppress(FileNotFoundError):
                current, now = self.get_versioned(key)
                if current == data:
                    return now
            raise

    @abstractmethod
    def put_file(self, key: str, path: Path) -> None:
        """Upload a local file as ``key`` (atomically, as put_bytes)."""

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True if ``key`` exists."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove ``key``; a key that is not there is not an error."""

    @abstractmethod
    def uri(self, key: str = "") -> str:
        """Where ``key`` lives, for people and logs: s3://bucket/key or a local path."""

    def link(self, key: str, expires_s: int = LINK_SECONDS) -> str | None:
        """An http(s) URL a browser can fetch ``key`` from (an S3 presigned GET, valid ``expires_s``); None
        for a store no browser can reach (a local folder)."""
        return None

    def download(self, key: str, path: Path) -> None:
        """Copy an object to a local file atomically."""
        data = self.get_bytes(key)
        write_atomic(path, lambda p: p.write_bytes(data))


class LocalStore(Store):
    """A folder used as a bucket: key 'a/b.jpg' is ROOT/a/b.jpg. ETag: sha256 of the content (``list_stat``:
    size and mtime)."""

    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        return self.root.joinpath(*PurePosixPath(safe_key(key)).parts)

    def list(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        for key, entry in self._files(prefix, start_after):
            yield ObjectInfo(key, sha256_file(Path(entry.path)), entry.stat().st_size)

    def list_stat(self, prefix: str = "", start_after: str = "") -> Iterator[ObjectInfo]:
        for key, entry in self._files(prefix, start_after):
            st = entry.stat()  # the one stat of the file; its content is never read
            yield ObjectInfo(key, stat_etag(st), st.st_size)

    def _files(self, prefix: str, start_after: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """(key, DirEntry) of each file under ``prefix`` whose key sorts after ``start_after``, in key order.

        Walks only the folder the prefix names ('incoming/x' -> ROOT/incoming): the rest of the bucket (model
        versions, decoded-image shards) is not listed. As Path.rglob, links to folders are not entered and a
        folder that may not be listed holds nothing; a link to a file is one; '.*.tmp' files (writes under
        way) are left out."""
        if not self.root.is_dir():
            raise FileNotFoundError(f"folder {str(self.root)!r} does not exist")
        parts = PurePosixPath(prefix).parts if prefix.endswith("/") else PurePosixPath(prefix).parts[:-1]
        plain = not prefix.startswith("/") and not {"..", "."} & set(prefix.split("/"))
        folder = self.root.joinpath(*parts) if plain else self.root  # never a walk outside the bucket
        if folder.is_dir():
            yield from _files_in_key_order(str(folder), "".join(f"{p}/" for p in parts) if plain else "",
                                           prefix, start_after)

    def get_bytes(self, key: str) -> bytes:
        path = self._path(key)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return path.read_bytes()

    def put_bytes(self, key: str, data: bytes) -> None:
        write_atomic(self._path(key), lambda p: p.write_bytes(data))

    def put_file(self, key: str, path: Path) -> None:
        write_atomic(self._path(key), lambda p: shutil.copyfile(path, p))  # streamed, not read whole

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get_bytes(key)
        return data, hashlib.sha256(data).hexdigest()

    def _put_conditional(self, key: str, data: bytes, etag: str | None) -> str:
        """Compare and replace under an exclusive flock of the object's folder, which every conditional writer of
        that folder takes: no other conditional write can come between the compare and the replace (the
        replace itself is atomic for readers)."""
        path = self._path(key)
        with _folder_locked(path.parent):
            current = sha256_file(path) if path.is_file() else None
            if current != etag:
                raise PreconditionFailed(f"{path} {'exists' if etag is None else 'changed'} since it was read "
                                         f"(ETag {current or 'none'}, expected {etag or 'none'})")
            write_atomic(path, lambda p: p.write_bytes(data))
        return hashlib.sha256(data).hexdigest()

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        """Remove the file, then the folders it leaves empty (a bucket has no empty folders either)."""
        path = self._path(key)
        path.unlink(missing_ok=True)
        for folder in path.parents:
            if folder == self.root or not folder.is_relative_to(self.root) or any(folder.iterdir()):
                break
            folder.rmdir()

    def download(self, key: str, path: Path) -> None:
        source = self._path(key)
        if not source.is_file():
            raise FileNotFoundError(f"{source} does not exist")
        write_atomic(path, lambda p: shutil.copyfile(source, p))

    def uri(self, key: str = "") -> str:
        return str(self.root / key) if key else str(self.root)  # display only (may be a prefix): not validated


def stat_etag(st: os.stat_result) -> str:
    """A local file's change detector: its size and mtime (ns), in hex: a rewrite changes it, a read does not."""
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def _files_in_key_order(folder: str, rel: str, prefix: str, start_after: str) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """(``rel`` + relative key, DirEntry) of the files below ``folder`` whose key starts with ``prefix`` and
    sorts after ``start_after``, in key (string) order: a folder sorts by its name with '/' appended, so
    'a-c' comes before 'a/b' as S3 lists them. Folders that hold no such key are not walked."""
    try:
        with os.scandir(folder) as it:
            entries = sorted(((e.name + "/" if e.is_dir(follow_symlinks=False) else e.name, e) for e in it),
                             key=itemgetter(0))
    except PermissionError:
        return
    for name, entry in entries:
        key = rel + name
        if name.endswith("/"):
            if _may_hold(key, prefix, start_after):
                yield from _files_in_key_order(entry.path, key, prefix, start_after)
        elif key.startswith(prefix) and key > start_after and not (name.startswith(".") and name.endswith(".tmp")) \
                and _is_file(entry):
            yield key, entry


def _may_hold(folder_key: str, prefix: str, start_after: str) -> bool:
    """Whether a key below ``folder_key`` ('a/b/') can start with ``prefix`` and sort after ``start_after``
    (each such key starts with ``folder_key``, so it is after ``start_after`` unless that is after the folder
    and does not start with it)."""
    return ((folder_key.startswith(prefix) or prefix.startswith(folder_key))
            and (start_after < folder_key or start_after.startswith(folder_key)))


def _is_file(entry: os.DirEntry[str]) -> bool:
    """``entry`` is a file, or a link to one (a broken link or a link loop is not)."""
    try:
        return entry.is_file()
    except OSError:
        return False


@contextlib.contextmanager
def _folder_locked(folder: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``folder`` itself (created if missing): no lock file is left in the bucket
    folder, and the kernel releases it if the holder dies."""
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://BUCKET/KEY-OR-PREFIX' -> ('s3://BUCKET', 'KEY-OR-PREFIX'), the store and the key part."""
    bucket, _, key = url[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{url!r} names no bucket")
    return f"s3://{bucket}", key


BUCKET_ENV = "FACECLF_BUCKET"  # the bucket (name or local folder) when none is given


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


def open_store(location: str | os.PathLike[str], client=None) -> Store:  # noqa: ANN001
    """'s3://BUCKET' -> S3Store; anything else is a local folder."""
    text = str(location)
    if text.startswith("s3://"):
        from faceclf.store.s3 import (
            S3Store,  # here: s3 imports this module, and boto3 is needed only for S3
        )

        bucket = text[len("s3://"):].strip("/")
        if "/" in bucket:
            raise ValueError(f"{text!r}: give the bucket only (s3://BUCKET); the layout below it is fixed")
        return S3Store(bucket, client)
    return LocalStore(text)
