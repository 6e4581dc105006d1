"""What scoring reads: image keys in sorted order, listed lazily, from a bucket prefix or local paths.

Every source yields ``Item``s in increasing key order (Python string order, which is S3's UTF-8 byte
order). Sorted order is what lets a killed run resume after its last written key, and an incremental run
merge its previous predictions with tonight's listing, both without holding either in memory.
"""

from __future__ import annotations

import heapq
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from faceclf.dataset.layout import IMAGE_EXTENSIONS, has_image_name
from faceclf.store.objects import Store, open_store, parse_s3_url


class NoImages(ValueError):
    """An input holds no image files: nothing to score is a mistake worth stopping for, not "0 of 0"."""


@dataclass(frozen=True)
class Item:
    """One image to score: its key (S3 key or local path, the CSV's path column) and change detector."""

    key: str
    etag: str   # S3: the object's ETag; local: size and mtime, so --incremental needs no re-read


class Source(ABC):
    """Sorted, lazy items plus a way to read each one's bytes."""

    uri: str

    @abstractmethod
    def items(self, start_after: str = "") -> Iterator[Item]:
        """Items whose key sorts after ``start_after``, in key order."""

    @abstractmethod
    def read(self, item: Item) -> bytes:
        """The image file's bytes."""


class StoreSource(Source):
    """Every image object under a prefix of a bucket (or of a local folder used as one)."""

    def __init__(self, store: Store, prefix: str):
        self.store, self.prefix, self.uri = store, prefix, store.uri(prefix)

    def items(self, start_after: str = "") -> Iterator[Item]:
        for o in self.store.list(self.prefix, start_after):
            if has_image_name(PurePosixPath(o.key)):
                yield Item(o.key, o.etag)

    def read(self, item: Item) -> bytes:
        return self.store.get_bytes(item.key)


def _local_etag(st: os.stat_result) -> str:
    return f"{st.st_size:x}-{st.st_mtime_ns:x}"


def walk_sorted(folder: Path, seen: frozenset[tuple[int, int]] = frozenset()) -> Iterator[Path]:
    """Image files below ``folder`` in the string order of their paths, following symbolic links.

    A directory is sorted by name with '/' appended, so its depth-first walk is in full-path string
    order ('a-c' < 'a/b'). A link back to a directory being walked (a loop) raises ValueError naming it.
    """
    st = folder.stat()
    ident = (st.st_dev, st.st_ino)
    if ident in seen:
        raise ValueError(f"symbolic link loop: {folder} leads back to a folder it is inside")
    seen = seen | {ident}
    with os.scandir(folder) as it:
        entries = [(e.name + "/" if e.is_dir() else e.name, e) for e in it if not e.name.startswith(".")]
    for _, e in sorted(entries, key=lambda t: t[0]):
        path = Path(e.path)
        if e.is_dir():
            yield from walk_sorted(path, seen)
        elif e.is_file() and has_image_name(path):
            yield path


class LocalSource(Source):
    """Image files and folders given on the command line (folders searched recursively, links followed)."""

    def __init__(self, paths: Sequence[str | os.PathLike[str]]):
        self.paths = [Path(p) for p in paths]
        for p in self.paths:
            if not p.exists():
                raise FileNotFoundError(f"input {str(p)!r} does not exist")
        self.uri = ", ".join(str(p) for p in self.paths)

    def _one(self, p: Path) -> Iterator[Item]:
        for f in walk_sorted(p) if p.is_dir() else [p]:
            st = f.stat()
            yield Item(str(f), _local_etag(st))

    def items(self, start_after: str = "") -> Iterator[Item]:
        last = None
        for item in heapq.merge(*(self._one(p) for p in self.paths), key=lambda i: i.key):
            if item.key > start_after and item.key != last:  # a file named twice is scored once
                last = item.key
                yield item

    def read(self, item: Item) -> bytes:
        return Path(item.key).read_bytes()


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
