"""The face/ folder layout without torch: which files are images, the classes, content-hash splits.

Ingest, the registry and the night's checks need these and nothing else from faceclf.dataset.images, so they
stay importable without torch (~1 s and ~500 MB less for `faceclf ingest`).
"""

from __future__ import annotations

import hashlib
from pathlib import Path, PurePath
from typing import Sequence

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "val", "test")


def has_image_name(path: PurePath) -> bool:
    """True for a visible name with an allowed image extension (an S3 key or a local path; no disk access)."""
    return not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def is_image_file(path: Path) -> bool:
    """True for visible files with an allowed image extension."""
    return has_image_name(path) and path.is_file()


def find_classes(root: Path) -> list[str]:
    """Class names: the sorted names of the visible sub-folders of ``root``."""
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {str(root)!r} does not exist or is not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise ValueError(f"{str(root)!r} holds no class folders (expected e.g. {root}/with_mask/*.jpg)")
    return classes


def list_images(folder: Path) -> list[Path]:
    """All image files below ``folder``, recursively, sorted for a stable order."""
    return sorted(p for p in folder.rglob("*") if is_image_file(p))


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes: the identity of an image across names and nights."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def split_of(sha256: str, fractions: Sequence[float]) -> str:
    """Assign a split from the content hash alone, so it never changes between runs or nights.

    The first 64 bits of the hash, h, read as h / 2**64 in [0, 1), are cut at the cumulative fractions; the
    comparison is exact (an int against a float times 2**64), and a split whose fraction is 0 gets no image:
    what lies above the last cut (fractions may sum to 1 within 1e-6) goes to the last split with a share.
    Before issue 22, h / 2**64 was rounded to a float first, so a prefix within 2**-54 of 1 read as 1.0 and
    landed in test even with test's fraction 0 ((1, 0, 0) put ffff... in test), as did anything above a sum a
    hair below 1; any other image keeps its split (only a prefix within ~2**-53 of a cut can move).
    """
    train, val, test = fractions
    h = int(sha256[:16], 16)
    if h < train * 2**64:
        return "train"
    if h < (train + val) * 2**64:
        return "val"
    for split, share in (("test", test), ("val", val), ("train", train)):
        if share > 0:  # the rest goes to the last split that has a share
            return split
    raise ValueError(f"split fractions {tuple(fractions)} give no split a share (expected three summing to 1)")
