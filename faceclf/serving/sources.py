"""What scoring reads: image keys in sorted order, listed lazily, from a bucket prefix or local paths.

Every source yields ``Item``s in increasing key order (Python string order, which is S3's UTF-8 byte
order). Sorted order is what lets a killed run resume after its last written key, and an incremental run
merge its previous predictions with tonight's listing, both without holding either in memory.

A local walk follows symbolic links to folders (as torchvision's ImageFolder does) but enters each real
folder once, and a file name that is not UTF-8 gets a printable key (its bytes as \\xNN escapes).
"""

from __future__ import annotations

import heapq
import logging
import os
import stat
from abc import ABC, abstractmethod
from operator import attrgetter
from pathlib import Path, PurePosixPath
from typing import Iterator, NamedTuple, Sequence

from faceclf.dataset.layout import IMAGE_EXTENSIONS, is_image_name
from faceclf.store.objects import Store, open_store, parse_s3_url, stat_etag

log = logging.getLogger(__name__)


class NoImages(ValueError):
    """An input holds no image files: nothing to score is a mistake worth stopping for, not "0 of 0"."""


class Item(NamedTuple):
    """One image to score: its key (S3 key or local path, the CSV's path column) and change detector.

    A NamedTuple, not a frozen dataclass: one is built per image listed, in a quarter of the time (0.3 us).
    """

    key: str
    etag: str   # S3: the object's ETag; local: size and mtime (stat_etag), so --incremental needs no re-read
    size: int | None = None  # bytes, as listed: an object over the limit is never downloaded
    path: str = ""  # a local file's real name where the key had to differ from it (not UTF-8); else ""


class Source(ABC):
    """Sorted, lazy items plus a way to read each one's bytes."""

    uri: str

    @abstractmethod
    def items(self, start_after: str = "") -> Iterator[Item]:
        """Items whose key sorts after ``start_after``, in key order."""

    @abstractmethod
    def read(self, item: Item, max_bytes: int | None = None) -> bytes:
        """The image file's bytes (a local file: at most ``max_bytes + 1`` of them, so a file that grew past
        the limit after listing is never read whole)."""


class StoreSource(Source):
    """Every image object under a prefix of a bucket (or of a local folder used as one)."""

    def __init__(self, store: Store, prefix: str):
        self.store, self.prefix, self.uri = store, prefix, store.uri(prefix)

    def items(self, start_after: str = "") -> Iterator[Item]:
        """Image objects, each with the store's cheap change detector (``Store.list_stat``: a bucket's ETag, a
        local file's size and mtime), so a local folder's images are not read once more to be hashed."""
        for o in self.store.list_stat(self.prefix, start_after):
            if is_image_name(key_name(o.key)):
                yield Item(o.key, o.etag, o.size)

    def read(self, item: Item, max_bytes: int | None = None) -> bytes:
        return self.store.get_bytes(item.key)  # the listed size was checked against the limit before this


def key_name(key: str) -> str:
    """PurePosixPath(key).name without building the path: the last part that is neither empty nor '.'."""
    name = key.rpartition("/")[2]
    return name if name not in ("", ".") else PurePosixPath(key).name


def printable(name: str) -> str:
    """``name`` itself when it is valid UTF-8; else its bytes with each undecodable one as a \\xNN escape.

    On Linux a file name is bytes: os.fsdecode turns a non-UTF-8 byte into a lone surrogate, which no
    UTF-8 CSV can hold (UnicodeEncodeError). The escaped form is printable and keeps the name's order
    among its siblings stable; a name that literally spells the same escapes would share its key.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        pass
    try:
        return os.fsencode(name).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name's bytes gave
        return name.encode("utf-8", "backslashreplace").decode("utf-8")


def walk_sorted(folder: str, visited: set[tuple[int, int]] | None = None,
                inside: frozenset[tuple[int, int]] = frozenset(),
                st: os.stat_result | None = None) -> Iterator[tuple[str, os.DirEntry[str]]]:
    """Image files below ``folder`` in the string order of their (printable) paths, following symbolic links.

    ``folder`` is spelt as str(Path(...)) spells it, and so is each file's path yielded (with its DirEntry,
    whose ``stat()`` follows links as Path.stat does: the one stat a file needs; ``st`` is ``folder``'s).
    A directory is sorted by printable name with '/' appended, so its depth-first walk is in full-path
    string order ('a-c' < 'a/b'). Each real directory (st_dev, st_ino) is walked once, by the first path
    that reaches it in that order: two links to one folder, repeated over 20 levels, list each file once,
    not 2^20 times. A link back to a directory being walked (a loop) raises ValueError naming it.
    """
    visited = set() if visited is None else visited
    st = os.stat(folder) if st is None else st
    ident = (st.st_dev, st.st_ino)
    if ident in inside:
        raise ValueError(f"symbolic link loop: {printable(folder)} leads back to a folder it is inside")
    if ident in visited:
        log.debug("%s: already walked through another path", printable(folder))
        return
    visited.add(ident)
    inside = inside | {ident}
    with os.scandir(folder) as it:
        entries = [(printable(e.name) + "/" if e.is_dir() else printable(e.name), e)
                   for e in it if not e.name.startswith(".")]
    base = "" if folder == "." else folder if folder.endswith("/") else folder + "/"  # as Path joins
    for _, e in sorted(entries, key=lambda t: t[0]):
        if e.is_dir():
            yield from walk_sorted(base + e.name, visited, inside, e.stat())
        elif e.is_file() and is_image_name(e.name):
            yield base + e.name, e


class LocalSource(Source):
    """Image files and folders given on the command line (folders searched recursively, links followed)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"input {str(p)!r} does not exist")
        self.uri = ", ".join(printable(str(p)) for p in self.paths)

    @staticmethod
    def _item(path: str, st: os.stat_result) -> Item:
        key = printable(path)
        return Item(key, stat_etag(st), st.st_size, "" if key == path else path)

    def _one(self, p: Path) -> Iterator[Item]:
        """One input's items: a file as given, a folder's image files walked (one stat each, from its DirEntry)."""
        if not p.is_dir():
            yield self._item(str(p), p.stat())
            return
        for path, entry in walk_sorted(str(p)):
            yield self._item(path, entry.stat())

    def items(self, start_after: str = "") -> Iterator[Item]:
        streams = [self._one(p) for p in self.paths]
        last = None
        for item in streams[0] if len(streams) == 1 else heapq.merge(*streams, key=attrgetter("key")):
            if item.key > start_after and item.key != last:  # a file named twice is scored once
                last = item.key
                yield item

    def read(self, item: Item, max_bytes: int | None = None) -> bytes:
        fd = os.open(item.path or item.key, os.O_RDONLY)  # a folder opens, and its read is IsADirectoryError
        try:
            st = os.fstat(fd)
            # Never more than max_bytes + 1, however the file changed (or a device that never ends).
            limit = None if max_bytes is None else (
                max_bytes + 1 if st.st_size == 0 or st.st_size > max_bytes else st.st_size + 1)
            return read_at_most(fd, limit, st)
        finally:
            os.close(fd)


def read_at_most(fd: int, limit: int | None, st: os.stat_result) -> bytes:
    """Up to ``limit`` bytes of ``fd`` (None: all of it), whose fstat is ``st``.

    A regular file of the size ``st`` gives is read by one os.read of size + 1 (no Python file object, no
    second read to meet its end): 14 -> 9 us CPU a 64 px JPEG, about the syscalls' own cost. Fewer bytes (a
    short read) or more (it grew) read on, in chunks of at most 64 KiB beyond that size, so a size-0 file (a
    device, /proc) never makes os.read allocate ``limit`` bytes (25 MiB) up front.
    """
    size, regular = st.st_size, stat.S_ISREG(st.st_mode)
    chunks, got = [], 0
    while limit is None or got < limit:
        want = size + 1 - got if size and got <= size else 1 << 16
        chunk = os.read(fd, want if limit is None else min(want, limit - got))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
        if regular and got == size:
            break
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def open_source(inputs: Sequence[str | os.PathLike[str]], store: Store | None = None) -> Source:
    """One ``s3://BUCKET/PREFIX`` URL, a prefix of ``store``, or local files and folders."""
    texts = [str(i) for i in inputs]
    if not texts:
        raise ValueError("no input to score")
    if any(t.startswith("s3://") for t in texts):
        if len(texts) > 1:
            raise ValueError("give one s3://BUCKET/PREFIX to score, not several inputs")
        location, prefix = parse_s3_url(texts[0])
        return StoreSource(open_store(location), prefix)
    if store is not None and len(texts) == 1 and not Path(texts[0]).exists():
        return StoreSource(store, texts[0])
    return LocalSource(texts)


def require_images(source: Source) -> None:
    """Raise NoImages naming ``source`` when it holds no image file at all (reads only the first one)."""
    if next(source.items(), None) is None:
        raise NoImages(f"no image files in {source.uri} (looked for {', '.join(IMAGE_EXTENSIONS)})")
