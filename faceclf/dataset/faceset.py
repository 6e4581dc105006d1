"""FaceSet: the typed, immutable index of a face set — every image's sha256, class, split, path and size.

Ingest builds it from the manifest (no walk of face/, no hashing: ingested files are named by their
sha256); `faceclf train` on a plain folder builds it by hashing each file once (faceclf.dataset.discover).
Every later step takes it instead of looking at face/ again: the class check, the data fingerprint, the
training splits, the champion's test list, the counts in reports.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, overload

import numpy as np

from faceclf.config import RunConfig, auto_image_size, with_overrides
from faceclf.dataset.layout import SPLITS

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FaceImage:
    """One image of the set. ``path`` is POSIX and relative to the FaceSet's root."""

    sha256: str
    label: str      # class name
    split: str      # 'train', 'val' or 'test'
    path: str
    size: int       # bytes
    short_side: int = 0   # pixels of the shorter side, from the file's header (0: not known)


class ImageIndex(Sequence[FaceImage]):
    """An immutable sequence of FaceImages held as columns: a few bytes per image, not a Python object each.

    Why columns: a face set only grows, and every step of a night holds its index. As one FaceImage
    object per image (a dict, five strings, two ints) it took ~2.4 KB of anonymous memory per image
    (measured at 40,000 images), so the index alone grew the training process by ~240 MiB per 100,000
    images. Here an image costs its sha256 (64 bytes), its path's UTF-8 bytes and ~16 bytes of codes and
    sizes; a FaceImage is built when one is asked for.

    It is also opaque to orchestration: Prefect inspects task arguments, recursing into tuples and
    dataclasses (a million-image tuple made every task call take ~45 s, measured), not into a Sequence.
    """

    __slots__ = ("_sha", "_labels", "_label", "_splits", "_split", "_size", "_side", "_paths", "_ends")

    def __init__(self, items: Iterable[FaceImage] = ()) -> None:
        items = list(items)
        self._set_columns([i.sha256 for i in items], [i.label for i in items], [i.split for i in items],
                          [i.path for i in items], [i.size for i in items], [i.short_side for i in items])

    @classmethod
    def from_columns(cls, sha256: Sequence[str], labels: Sequence[str], splits: Sequence[str],
                     paths: Sequence[str], sizes: Sequence[int], short_sides: Sequence[int]) -> ImageIndex:
        """An index from one sequence per FaceImage field (all the same length)."""
        index = cls.__new__(cls)
        index._set_columns(sha256, labels, splits, paths, sizes, short_sides)
        return index

    def _set_columns(self, sha256: Sequence[str], labels: Sequence[str], splits: Sequence[str],
                     paths: Sequence[str], sizes: Sequence[int], short_sides: Sequence[int]) -> None:
        n = len(sha256)
        if not all(len(col) == n for col in (labels, splits, paths, sizes, short_sides)):
            raise ValueError("every column of an ImageIndex must have one entry per image")
        self._sha = np.array(sha256, dtype="S64").reshape(n)          # hex digests, ASCII
        self._labels, self._label = _codes(labels)                     # vocabulary, uint16 (N,)
        self._splits, self._split = _codes(splits)
        self._size = np.array(sizes, dtype=np.int64).reshape(n)
        self._side = np.array(short_sides, dtype=np.int32).reshape(n)
        encoded = [p.encode() for p in paths]
        self._paths = b"".join(encoded)                                # every path's UTF-8, back to back
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64).reshape(n)

    # --- columns (vectorised access for the steps that need every image) -----------------------
    @property
    def sha256s(self) -> np.ndarray:
        """Hex sha256 of every image, bytes dtype S64 (N,)."""
        return self._sha

    def label_names(self) -> tuple[str, ...]:
        """The distinct labels, in code order."""
        return self._labels

    def label_codes(self) -> np.ndarray:
        """uint16 (N,): each image's label as a position in ``label_names()``."""
        return self._label

    def split_mask(self, name: str) -> np.ndarray:
        """bool (N,): which images belong to split ``name``."""
        if name not in self._splits:
            return np.zeros(len(self), dtype=bool)
        return self._split == self._splits.index(name)

    def split_names(self) -> tuple[str, ...]:
        """The distinct splits present."""
        return tuple(self._splits[c] for c in np.unique(self._split))

    @property
    def short_sides(self) -> np.ndarray:
        """int32 (N,): each image's short side in pixels (0: not known)."""
        return self._side

    def take(self, positions: np.ndarray | Sequence[int]) -> ImageIndex:
        """The images at ``positions`` (int indices or a bool mask), in that order."""
        pos = np.arange(len(self))[positions] if isinstance(positions, slice) else np.asarray(positions)
        pos = np.flatnonzero(pos) if pos.dtype == bool else pos.astype(np.int64).reshape(-1)
        out = ImageIndex.__new__(ImageIndex)
        out._sha, out._size, out._side = self._sha[pos], self._size[pos], self._side[pos]
        out._labels, out._label, out._splits, out._split = self._labels, self._label[pos], self._splits, self._split[pos]
        pieces = [self._path_bytes(int(k)) for k in pos]
        out._paths = b"".join(pieces)
        out._ends = np.cumsum([len(b) for b in pieces], dtype=np.int64).reshape(len(pos))
        return out

    def _path_bytes(self, k: int) -> bytes:
        start = int(self._ends[k - 1]) if k else 0
        return self._paths[start:int(self._ends[k])]

    # --- the Sequence protocol -------------------------------------------------------------------
    @overload
    def __getitem__(self, i: int) -> FaceImage: ...
    @overload
    def __getitem__(self, i: slice) -> ImageIndex: ...
    def __getitem__(self, i: int | slice) -> FaceImage | ImageIndex:
        if isinstance(i, slice):
            return self.take(i)
        k = range(len(self))[i]  # IndexError and negative indices as for a tuple
        return FaceImage(self._sha[k].decode(), self._labels[self._label[k]], self._splits[self._split[k]],
                         self._path_bytes(k).decode(), int(self._size[k]), int(self._side[k]))

    def __len__(self) -> int:
        return len(self._sha)

    def __iter__(self) -> Iterator[FaceImage]:
        return (self[k] for k in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ImageIndex):
            return (len(self) == len(other) and np.array_equal(self._sha, other._sha)
                    and self._paths == other._paths and np.array_equal(self._ends, other._ends)
                    and np.array_equal(self._size, other._size) and np.array_equal(self._side, other._side)
                    and [self._labels[c] for c in self._label] == [other._labels[c] for c in other._label]
                    and [self._splits[c] for c in self._split] == [other._splits[c] for c in other._split])
        return isinstance(other, (tuple, list)) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash((self._sha.tobytes(), self._paths))

    def __repr__(self) -> str:
        return f"<{len(self)} images>"


def evenly_spread(n: int, k: int) -> np.ndarray:
    """int64 positions of at most ``k`` of ``n`` items, evenly spread from the first to the last
    (deterministic: the same sample every time, spanning a sorted list's whole range)."""
    if n <= k:
        return np.arange(n, dtype=np.int64)
    return np.linspace(0, n - 1, k).round().astype(np.int64)


def _codes(values: Sequence[str]) -> tuple[tuple[str, ...], np.ndarray]:
    """(sorted distinct values, uint16 code of each value): a column of a few distinct strings."""
    vocab = tuple(sorted(set(values)))
    lookup = {v: k for k, v in enumerate(vocab)}
    return vocab, np.fromiter((lookup[v] for v in values), dtype=np.uint16, count=len(values))


@dataclass(frozen=True)
class FaceSet:
    """The images of a face set, in a stable order (split, class, path), and what was left out on the way."""

    root: Path
    classes: tuple[str, ...]
    images: Sequence[FaceImage]          # an ImageIndex (any sequence given is turned into one)
    duplicates: int = 0                  # exact byte copies dropped
    conflicts: tuple[str, ...] = ()      # sha256 seen under two classes (every copy dropped)
    presplit: bool = True                # the splits came from the folders (or ingest), not from hashing here

    def __post_init__(self) -> None:
        if not isinstance(self.images, ImageIndex):
            object.__setattr__(self, "images", ImageIndex(self.images))
        names = self.images.label_names()
        unknown = sorted({names[c] for c in np.unique(self.images.label_codes())} - set(self.classes))
        if unknown:
            raise ValueError(f"images labelled {unknown}, which are not among the classes {list(self.classes)}")
        bad = sorted(set(self.images.split_names()) - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split(s) {bad}; expected {SPLITS}")

    def split(self, name: str) -> ImageIndex:
        """The images of split ``name``, in the FaceSet's order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.images.take(self.images.split_mask(name))

    def file(self, image: FaceImage) -> Path:
        """Where ``image`` is on disk."""
        return self.root.joinpath(*PurePosixPath(image.path).parts)

    def label_index(self, image: FaceImage) -> int:
        """The class index of ``image`` (classes are sorted names, as in the model's output)."""
        return self.classes.index(image.label)

    def label_indices(self, images: ImageIndex) -> np.ndarray:
        """int64 (N,): the class index of each of ``images`` (images of this FaceSet)."""
        to_class = np.array([self.classes.index(name) for name in images.label_names()], dtype=np.int64)
        return to_class[images.label_codes()] if len(images) else np.zeros(0, dtype=np.int64)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split per class, every class listed: {'train': {'with_mask': 540, ...}, ...}."""
        labels = self.label_indices(self.images)
        return {s: dict(zip(self.classes, np.bincount(labels[self.images.split_mask(s)],
                                                       minlength=len(self.classes)).tolist()))
                for s in SPLITS}

    def class_totals(self) -> dict[str, int]:
        """Images per class over all splits."""
        return {c: sum(per[c] for per in self.counts().values()) for c in self.classes}

    def median_short_side(self, split: str = "train") -> float:
        """The median short side (pixels) of a split's images whose size is known; 0 when none is."""
        sides = self.images.short_sides[self.images.split_mask(split)]
        sides = sides[sides > 0]
        return float(np.median(sides)) if len(sides) else 0.0

    def fingerprint(self) -> str:
        """sha256 over every image's split, class and content hash: equal exactly when the data is."""
        lines = sorted(f"{i.split}/{i.label}/{i.sha256}" for i in self.images)
        return hashlib.sha256("\n".join(lines).encode()).hexdigest()

    def require_every_class(self, names: Iterable[str] = SPLITS) -> None:
        """ValueError naming the class and split when a split lacks a class.

        A split without some class cannot measure (val, test) or learn (train) it, so training stops
        before it starts rather than reporting a meaningless accuracy.
        """
        counts = self.counts()
        for s in names:
            missing = [c for c, n in counts[s].items() if n == 0]
            if missing:
                raise ValueError(f"class {missing[0]!r} has no images in the {s} split (images per class: "
                                 f"{counts[s]}); add more images of that class")

    def write_csv(self, path: Path) -> None:
        """splits.csv: split, class, sha256, path (as the run read it), size — to audit or reuse the split.
        Written row by row, so its memory does not grow with the set (it was one string of every row)."""
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["split", "class", "sha256", "path", "size"])
            w.writerows((i.split, i.label, i.sha256, str(self.file(i)), i.size) for i in self.images)


def ordered(images: Iterable[FaceImage]) -> tuple[FaceImage, ...]:
    """Images in the FaceSet's stable order: split (train, val, test), class, path."""
    return tuple(sorted(images, key=lambda i: (SPLITS.index(i.split), i.label, i.path)))


def from_manifest(rows: Iterable[dict[str, Any]], root: Path, missing: Iterable[str] = ()) -> FaceSet:
    """The FaceSet of an ingested tree from its manifest rows ("ok" rows only; ``missing`` paths left out).

    Classes are those with at least one image. Nothing is read from ``root``: the manifest already
    holds each file's sha256, class, split and size. ``rows`` are read_manifest's (each checked to its one
    legal form, faceclf.dataset.manifest.row_problem, before it was returned) and those ingest adds, so every
    ``path`` is <split>/<class>/<sha256>.<ext> below ``root``.
    """
    gone = set(missing)
    kept = [r for r in rows if r.get("status", "ok") == "ok" and r["path"] not in gone]
    rank = {s: k for k, s in enumerate(SPLITS)}
    kept.sort(key=lambda r: (rank.get(r["split"], len(SPLITS)), r["class"], r["path"]))  # ordered()'s order
    images = ImageIndex.from_columns([r["sha256"] for r in kept], [r["class"] for r in kept],
                                     [r["split"] for r in kept], [r["path"] for r in kept],
                                     [int(r["size"]) for r in kept],
                                     [min(int(r.get("width", 0)), int(r.get("height", 0))) for r in kept])
    return FaceSet(Path(root), images.label_names(), images)


def resolve_image_size(cfg: RunConfig, faceset: FaceSet) -> RunConfig:
    """``cfg`` with image_size "auto" replaced by the size the FaceSet's train images call for (their median
    short side, at most 96, a multiple of the pooling steps); any other image_size as it is."""
    if cfg.data.image_size != "auto":
        return cfg
    median = faceset.median_short_side("train")
    if not median:
        raise ValueError("image_size auto: the sizes of the train images are not known; give a number of pixels")
    size = auto_image_size(median, len(cfg.model.conv_channels))
    log.info("image_size auto: %d px (median short side of the train images %.0f px)", size, median)
    return with_overrides(cfg, image_size=size)
