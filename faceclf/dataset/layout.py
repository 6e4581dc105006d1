"""The face/ folder layout without torch: which files are images, the classes, content-hash splits, and the
one legal form of a class name and of an ingested image's path (names read from the bucket become folders).

Ingest, the registry and the night's checks need these and nothing else from faceclf.dataset.images, so they
stay importable without torch (~1 s and ~500 MB less for `faceclf ingest`).
"""

from __future__ import annotations

import functools
import hashlib
import re
import unicodedata
from pathlib import Path, PurePath
from typing import NamedTuple, Sequence

from faceclf.config import MAX_CLASS_CHARS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
SPLITS = ("train", "val", "test")
# decoded format -> extension of its file in dest: one for each format IngestConfig.allowed_formats may name
FILE_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}

# A class name is a folder on every worker OS: Linux, macOS and Windows (a CIFS/SMB share of face/ included).
UNSAFE_CLASS_CHARS = frozenset('<>:"/\\|?*')  # Windows refuses these in a name; '/' and '\\' separate folders
MAX_NAME_PART_BYTES = 255  # the longest file or folder name (ext4, APFS, NTFS in UTF-16 units: at least this)
WINDOWS_DEVICES = frozenset({"CON", "PRN", "AUX", "NUL", *(f"{d}{n}" for d in ("COM", "LPT") for n in "123456789")})
# split/class/sha256.ext, as ``faceclf.dataset.tree.image_path`` writes it
SHA256_HEX = re.compile(r"[0-9a-f]{64}")  # a sha256 as faceclf writes it everywhere (names, rows, digests)
_IMAGE_PATH = re.compile(r"(?P<split>[^/]+)/(?P<cls>[^/]+)/(?P<sha256>[0-9a-f]{64})\.(?P<ext>[a-z]+)")


def has_image_name(path: PurePath) -> bool:
    """True for a visible name with an allowed image extension (an S3 key or a local path; no disk access)."""
    return is_image_name(path.name)


def is_image_name(name: str) -> bool:
    """``has_image_name`` of a bare file name, with no PurePath built (a listing of millions asks it per file).

    The extension is PurePath.suffix's: from the last '.', which is neither the first nor the last character.
    """
    dot = name.rfind(".")
    return not name.startswith(".") and 0 < dot < len(name) - 1 and name[dot:].lower() in IMAGE_EXTENSIONS


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


def class_problem(name: str) -> str | None:
    """Why ``name`` cannot be a class (a folder of dest on any worker OS, and a model label); None if it can.

    Refused: blank; over MAX_CLASS_CHARS characters or 255 bytes of UTF-8; hidden ('.x', and so '.' and '..'); leading or trailing
    white space or a trailing '.' (Windows drops those, so 'a.' and 'a' would share a folder); a character
    Windows refuses in a name (<>:"/\\|?*); a control, format, private-use, unassigned or surrogate code point
    (invisible, or not encodable as UTF-8); a name not in Unicode NFC (macOS stores names decomposed, so two
    spellings of 'é' would be one folder there and two elsewhere); a Windows device name (CON, NUL, COM1...,
    with any extension). 'train', 'val' and 'test' are fine: a class folder sits below its split's folder.
    """
    if not isinstance(name, str) or not name.strip():
        return f"class name {name!r} is blank or not text"
    if len(name) > MAX_CLASS_CHARS:
        return f"class name {name[:80]!r} is over {MAX_CLASS_CHARS} characters"
    if name.startswith("."):
        return f"class name {name!r} is hidden (starts with '.')"
    if name != name.strip() or name.endswith("."):
        return f"class name {name!r} starts or ends with white space, or ends with '.'"
    bad = sorted({c for c in name if c in UNSAFE_CLASS_CHARS or unicodedata.category(c)[0] == "C"
                  or unicodedata.category(c) in ("Zl", "Zp")})
    if bad:
        return (f"class name {name!r} holds {', '.join(map(repr, bad))}: not allowed in a folder name on every OS "
                f"(expected no {''.join(sorted(UNSAFE_CLASS_CHARS))}, control or invisible characters)")
    if len(name.encode()) > MAX_NAME_PART_BYTES:
        return f"class name {name!r} is over {MAX_NAME_PART_BYTES} bytes in UTF-8 (the longest folder name)"
    if unicodedata.normalize("NFC", name) != name:
        return f"class name {name!r} is not in Unicode NFC form (expected {unicodedata.normalize('NFC', name)!r})"
    if name.split(".")[0].upper() in WINDOWS_DEVICES:
        return f"class name {name!r} is a Windows device name (CON, PRN, AUX, NUL, COM1-9, LPT1-9)"
    return None


@functools.lru_cache(maxsize=4096)  # a manifest of millions of rows has a handful of classes
def legal_class(name: str) -> str:
    """``name`` if it is a legal class name (see ``class_problem``), else ValueError saying why.

    The one rule for a class, wherever it comes from: an incoming/<class>/ folder or a manifest row.
    """
    if problem := class_problem(name):
        raise ValueError(problem)
    return name


class ImagePath(NamedTuple):
    """The parts of an ingested image's dest-relative path: <split>/<class>/<sha256>.<ext>."""

    split: str
    cls: str
    sha256: str
    ext: str


def parse_image_path(rel: str) -> ImagePath:
    """The parts of ``rel`` if it is exactly <split>/<class>/<sha256>.<ext>, else ValueError saying why.

    split is one of SPLITS, class a legal class (``legal_class``), sha256 64 lowercase hex digits, ext one of
    FILE_EXTENSIONS' values: the only paths ingest writes, so nothing else below dest is ever written or removed.
    """
    m = _IMAGE_PATH.fullmatch(rel) if isinstance(rel, str) else None
    if m is None:
        raise ValueError(f"image path {rel!r} is not <split>/<class>/<sha256 as 64 lowercase hex>.<ext>")
    parts = ImagePath(*m.group("split", "cls", "sha256", "ext"))
    if parts.split not in SPLITS:
        raise ValueError(f"image path {rel!r} has split {parts.split!r}; expected one of {SPLITS}")
    if parts.ext not in FILE_EXTENSIONS.values():
        raise ValueError(f"image path {rel!r} has extension {parts.ext!r}; expected one of "
                         f"{tuple(FILE_EXTENSIONS.values())}")
    try:
        legal_class(parts.cls)
    except ValueError as e:
        raise ValueError(f"image path {rel!r}: {e}") from None
    return parts
