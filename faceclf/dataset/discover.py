"""A FaceSet from a plain folder (what `faceclf train DATA` is given): every file hashed once, then split.

``DATA`` is either a folder of class folders (split here: exact duplicates dropped by sha256, then each image,
in sha256 order, joins the split of its nearest placed near-duplicate, else goes where its hash says:
faceclf.dataset.placement, the nights' rule) or a tree with train/ val/ test/ that is used as it is (val/test
images with a near-duplicate in train are counted and warned about).

A folder has no memory of earlier runs: adding a near-duplicate of two images that sat in different splits can
join them, and so move one. The bucket's nights keep placement in the manifest and never move an image.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

from PIL import Image

from faceclf.config import NEAR_DISTANCE
from faceclf.dataset.faceset import FaceImage, FaceSet, ordered
from faceclf.dataset.layout import (
    SPLITS,
    find_classes,
    list_images,
    sha256_file,
)
from faceclf.dataset.near import Signature, signature_file
from faceclf.dataset.placement import Placement, twin_counts
from faceclf.progress import progress

log = logging.getLogger(__name__)


def is_presplit(root: Path) -> bool:
    """True when ``root`` already holds train/, val/ and test/ folders."""
    return all((root / s).is_dir() for s in SPLITS)


def hash_images(root: Path, folder: Path, classes: Sequence[str], split: str, workers: int) -> list[FaceImage]:
    """Hash every image below folder/<class>/ (in parallel threads) into FaceImages of ``split``.

    ``split`` is provisional for a folder that is split afterwards by hash.
    """
    found = [(c, p) for c in classes if (folder / c).is_dir() for p in list_images(folder / c)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        hashes = list(progress(pool.map(sha256_file, [p for _, p in found]), total=len(found), desc="hash",
                               unit="img", leave=False))
        sides = list(pool.map(short_side, [p for _, p in found]))
    return [FaceImage(h, c, split, p.relative_to(root).as_posix(), p.stat().st_size, s)
            for (c, p), h, s in zip(found, hashes, sides)]


def short_side(path: Path) -> int:
    """The shorter side of an image file, read from its header (no pixel is decoded); 0 if unreadable."""
    try:
        with Image.open(path) as img:
            return min(img.size)
    except Exception:  # noqa: BLE001 - a bad file is reported when it is decoded; its size is just unknown
        return 0


def signatures(root: Path, images: Sequence[FaceImage], workers: int) -> list[Signature | None]:
    """The perceptual signature of each image (faceclf.dataset.near), in parallel threads; None for a file that
    does not decode (it is reported when training decodes it, and is never anyone's twin)."""
    def sign(image: FaceImage) -> Signature | None:
        try:
            return signature_file(root / image.path)
        except Exception:  # noqa: BLE001 - a bad file is reported by the decoder later; here it has no twin
            return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(progress(pool.map(sign, images), total=len(images), desc="sign", unit="img", leave=False))


def deduplicate(images: list[FaceImage]) -> tuple[list[FaceImage], int, list[str]]:
    """Keep one image per content hash; drop every copy of a hash labelled with two classes.

    Returns (kept, duplicates dropped, conflicting hashes). A conflict is dropped whole because
    either label may be the wrong one, and training on both teaches nothing.
    """
    by_hash: dict[str, list[FaceImage]] = {}
    for i in images:
        by_hash.setdefault(i.sha256, []).append(i)
    kept: list[FaceImage] = []
    duplicates, conflicts = 0, []
    for sha, group in by_hash.items():
        if len({i.label for i in group}) > 1:
            conflicts.append(sha)
            log.warning("same image under two classes, all copies dropped: %s",
                        ", ".join(f"{i.path} ({i.label})" for i in group))
            continue
        kept.append(group[0])
        duplicates += len(group) - 1
    return kept, duplicates, conflicts


def discover(root: str | os.PathLike[str], fractions: Sequence[float], workers: int = 4,
             near_distance: int = NEAR_DISTANCE) -> FaceSet:
    """The FaceSet of ``root``: a tree with train/ val/ test/ as given, or class folders split so that
    near-duplicates (pHashes within ``near_distance`` bits) share a split."""
    root = Path(root)
    faceset = (_presplit(root, workers, near_distance) if is_presplit(root)
               else _split_by_hash(root, fractions, workers, near_distance))
    log.info("classes %s; images per split %s; %d duplicates dropped", list(faceset.classes), faceset.counts(),
             faceset.duplicates)
    return faceset


def _presplit(root: Path, workers: int, near_distance: int) -> FaceSet:
    """train/ val/ test/ each holding class folders: de-duplicated within each split, used as given."""
    classes = find_classes(root / "train")
    images, dup, conflicts = [], 0, []
    for s in SPLITS:
        extra = set(find_classes(root / s)) - set(classes) if any((root / s).iterdir()) else set()
        if extra:
            raise ValueError(f"{root / s} has class folders {sorted(extra)} that train/ does not have")
        kept, n_dup, conf = deduplicate(hash_images(root, root / s, classes, s, workers))
        images, dup, conflicts = images + kept, dup + n_dup, conflicts + conf
    seen = {i.sha256 for i in images if i.split == "train"}
    leaked = sum(i.sha256 in seen for i in images if i.split != "train")
    if leaked:
        log.warning("%d val/test images are byte-identical to train images in %s (used as given)", leaked, root)
    twins = twin_counts(zip([i.split for i in images], signatures(root, images, workers)), near_distance)
    if any(twins.values()):
        log.warning("%d val and %d test images in %s have a near-duplicate in train (used as given: the test "
                    "accuracy partly measures memory)", twins["val"], twins["test"], root)
    return FaceSet(root, tuple(classes), ordered(images), dup, tuple(conflicts), True)


def _split_by_hash(root: Path, fractions: Sequence[float], workers: int, near_distance: int) -> FaceSet:
    """Class folders: duplicates dropped, then each image, in sha256 order, placed with its nearest placed
    near-duplicate, else by its content hash."""
    classes = find_classes(root)
    kept, dup, conflicts = deduplicate(hash_images(root, root, classes, "train", workers))
    kept.sort(key=lambda i: i.sha256)   # an order that does not depend on names or listing
    placement, joined, images = Placement(fractions, near_distance), 0, []
    for image, sig in zip(kept, signatures(root, kept, workers)):
        placed = placement.place(image.sha256, sig)
        joined += placed.twin is not None
        images.append(FaceImage(image.sha256, image.label, placed.split, image.path, image.size, image.short_side))
    if joined:
        log.info("%d images joined the split of a near-duplicate in %s", joined, root)
    return FaceSet(root, tuple(classes), ordered(images), dup, tuple(conflicts), False)
