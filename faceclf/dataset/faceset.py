"""FaceSet: the typed, immutable index of a face set — every image's sha256, class, split, path and size.

Ingest builds it from the manifest (no walk of face/, no hashing: ingested files are named by their
sha256); `faceclf train` on a plain folder builds it by hashing each file once (faceclf.dataset.discover).
Every later step takes it instead of looking at face/ again: the class check, the data fingerprint, the
training splits, the champion's test list, the counts in reports.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, overload

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
    """An immutable sequence of FaceImages that orchestration does not look inside.

    Prefect inspects task arguments, recursing into tuples and dataclasses: a million-image tuple made
    every task call take ~45 s (measured). A plain Sequence is passed through untouched.
    """

    __slots__ = ("_items",)

    def __init__(self, items: Iterable[FaceImage] = ()) -> None:
        self._items = tuple(items)

    @overload
    def __getitem__(self, i: int) -> FaceImage: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[FaceImage, ...]: ...
    def __getitem__(self, i: int | slice) -> FaceImage | tuple[FaceImage, ...]:
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[FaceImage]:
        return iter(self._items)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ImageIndex):
            return self._items == other._items
        return isinstance(other, tuple) and self._items == other

    def __hash__(self) -> int:
        return hash(self._items)

    def __repr__(self) -> str:
        return f"<{len(self._items)} images>"


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
        unknown = sorted({i.label for i in self.images} - set(self.classes))
        if unknown:
            raise ValueError(f"images labelled {unknown}, which are not among the classes {list(self.classes)}")
        bad = sorted({i.split for i in self.images} - set(SPLITS))
        if bad:
            raise ValueError(f"unknown split(s) {bad}; expected {SPLITS}")

    def split(self, name: str) -> tuple[FaceImage, ...]:
        """The images of split ``name``."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return tuple(i for i in self.images if i.split == name)

    def file(self, image: FaceImage) -> Path:
        """Where ``image`` is on disk."""
        return self.root.joinpath(*PurePosixPath(image.path).parts)

    def label_index(self, image: FaceImage) -> int:
        """The class index of ``image`` (classes are sorted names, as in the model's output)."""
        return self.classes.index(image.label)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split per class, every class listed: {'train': {'with_mask': 540, ...}, ...}."""
        counts = {s: {c: 0 for c in self.classes} for s in SPLITS}
        for i in self.images:
            counts[i.split][i.label] += 1
        return counts

    def class_totals(self) -> dict[str, int]:
        """Images per class over all splits."""
        return {c: sum(per[c] for per in self.counts().values()) for c in self.classes}

    def median_short_side(self, split: str = "train") -> float:
        """The median short side (pixels) of a split's images whose size is known; 0 when none is."""
        sides = sorted(i.short_side for i in self.split(split) if i.short_side)
        if not sides:
            return 0.0
        mid = len(sides) // 2
        return float(sides[mid]) if len(sides) % 2 else (sides[mid - 1] + sides[mid]) / 2

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

    def to_csv(self) -> str:
        """splits.csv: split, class, sha256, path (as the run read it), size — to audit or reuse the split."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["split", "class", "sha256", "path", "size"])
        w.writerows((i.split, i.label, i.sha256, str(self.file(i)), i.size) for i in self.images)
        return buf.getvalue()


def ordered(images: Iterable[FaceImage]) -> tuple[FaceImage, ...]:
    """Images in the FaceSet's stable order: split (train, val, test), class, path."""
    return tuple(sorted(images, key=lambda i: (SPLITS.index(i.split), i.label, i.path)))


def from_manifest(rows: Iterable[dict[str, Any]], root: Path, missing: Iterable[str] = ()) -> FaceSet:
    """The FaceSet of an ingested tree from its manifest rows ("ok" rows only; ``missing`` paths left out).

    Classes are those with at least one image. Nothing is read from ``root``: the manifest already
    holds each file's sha256, class, split and size.
    """
    gone = set(missing)
    images = [FaceImage(r["sha256"], r["class"], r["split"], r["path"], int(r["size"]),
                        min(int(r.get("width", 0)), int(r.get("height", 0))))
              for r in rows if r.get("status", "ok") == "ok" and r["path"] not in gone]
    return FaceSet(Path(root), tuple(sorted({i.label for i in images})), ordered(images))


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
