"""The ImageFolder tree ingest writes: dest/{train,val,test}/<class>/<sha256>.<jpg|png|webp>.

A file is named by its content hash and the extension of its decoded format; its split is its nearest
placed twin's, else the hash's (faceclf.dataset.placement), so an image never moves between splits by itself
(only `faceclf resplit` moves one: ``move_image``). Files are written atomically; the
files of label conflicts are withdrawn. A path read back from the manifest is used only in that one legal
form (``faceclf.dataset.layout.parse_image_path``): nothing else below or beside dest is written or removed.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable

from faceclf.dataset.layout import FILE_EXTENSIONS, SPLITS, legal_class, parse_image_path
from faceclf.store.atomic import write_atomic


def image_path(sha256: str, cls: str, fmt: str, split: str) -> str:
    """dest-relative POSIX path: <split>/<class>/<sha256>.<ext> (the split from faceclf.dataset.placement).
    ``fmt`` is a decoded format IngestConfig allows (each has its extension in FILE_EXTENSIONS)."""
    return f"{split}/{cls}/{sha256}.{FILE_EXTENSIONS[fmt]}"


def local_path(dest: Path, rel: str) -> Path:
    """Where a dest-relative POSIX path (a manifest row's ``path``) lies below ``dest``; ValueError unless
    ``rel`` is <split>/<class>/<sha256>.<ext> (``parse_image_path``), so a path from the bucket never
    names a file elsewhere (read_manifest has refused such a row already; this is the last guard)."""
    split, cls, sha256, ext = parse_image_path(rel)
    return dest / split / cls / f"{sha256}.{ext}"


def write_image(dest: Path, rel: str, data: bytes) -> None:
    """Write an image atomically; a file already there with the same size is the same content (its
    name is its sha256), e.g. left by a run killed before the manifest was written."""
    path = local_path(dest, rel)
    if path.is_file() and path.stat().st_size == len(data):
        return
    write_atomic(path, lambda p: p.write_bytes(data))


def withdraw_conflicts(dest: Path, rows: list[dict[str, Any]]) -> list[str]:
    """Remove from ``dest`` the files of "conflict" rows (unless an "ok" row holds the same path).

    Run every night, not only when a conflict is found: a run killed between removing a file and
    rewriting the manifest, or a tree copied back from a backup, cannot bring a conflicting image
    back into training. The folders of a class left without any "ok" image are removed when empty,
    so training does not find a class with no images. Returns the dest-relative paths removed.
    """
    ok = [r for r in rows if r.get("status", "ok") == "ok"]
    held = {r["path"] for r in ok}
    removed = []
    for rel in sorted({r["path"] for r in rows if r.get("status") == "conflict"} - held):
        path = local_path(dest, rel)
        if path.is_file():
            path.unlink()
            removed.append(rel)
    for cls in {parse_image_path(rel).cls for rel in removed} - {r["class"] for r in ok}:
        for split in SPLITS:
            with contextlib.suppress(OSError):  # absent, or holds files the manifest does not know
                (dest / split / cls).rmdir()
    return removed


def make_tree(dest: Path, classes: Iterable[str]) -> None:
    """Create dest/<split>/<class>/ for every split and class, even empty ones.

    With all three split folders present ``faceclf.dataset.discover.discover`` reads dest as already split
    (instead of taking 'train' and 'val' for class names), and every split has the same class
    folders, so an empty one is reported by name rather than shifting the class indices.
    """
    for split in SPLITS:
        for cls in classes:
            (dest / split / legal_class(cls)).mkdir(parents=True, exist_ok=True)
        (dest / split).mkdir(parents=True, exist_ok=True)
