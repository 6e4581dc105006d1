"""Finding, splitting, decoding and augmenting face images.

Images are decoded and resized once per run into a uint8 tensor (N, 3, S, S) held in memory;
augmentation then works on batched tensors, so no epoch pays for JPEG decoding again.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from faceclf.dataset.layout import (  # re-exported: the torch-free part of the data layout
    SPLITS,
    find_classes,
    list_images,
    sha256_file,
    split_of,
)
from faceclf.progress import progress

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class ImageRecord:
    """One image file with its class index and content hash."""

    path: Path
    label: int
    sha256: str


@dataclass
class DatasetSplits:
    """Records per split plus what was dropped on the way (and why)."""

    classes: list[str]
    train: list[ImageRecord]
    val: list[ImageRecord]
    test: list[ImageRecord]
    presplit: bool
    duplicates: int = 0                                  # exact byte copies dropped
    conflicts: list[str] = field(default_factory=list)   # sha256 seen under two classes, all copies dropped

    def split(self, name: str) -> list[ImageRecord]:
        """Records of split ``name`` ('train', 'val' or 'test')."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return getattr(self, name)

    def counts(self) -> dict[str, dict[str, int]]:
        """Images per split per class, e.g. {'train': {'with_mask': 540, ...}, ...}."""
        return {
            s: {c: sum(r.label == i for r in self.split(s)) for i, c in enumerate(self.classes)}
            for s in SPLITS
        }


def is_presplit(root: Path) -> bool:
    """True when ``root`` already holds train/, val/ and test/ folders."""
    return all((root / s).is_dir() for s in SPLITS)


def _hash_all(paths: list[Path], workers: int) -> list[str]:
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(progress(pool.map(sha256_file, paths), total=len(paths), desc="hash", unit="img", leave=False))


def _records_for(root: Path, classes: list[str], workers: int) -> list[ImageRecord]:
    """Hash every image below root/<class>/ and return records in a stable order."""
    paths: list[Path] = []
    labels: list[int] = []
    for i, name in enumerate(classes):
        found = list_images(root / name) if (root / name).is_dir() else []
        paths += found
        labels += [i] * len(found)
    hashes = _hash_all(paths, workers)
    return [ImageRecord(p, y, h) for p, y, h in zip(paths, labels, hashes)]


def deduplicate(records: list[ImageRecord], classes: list[str]) -> tuple[list[ImageRecord], int, list[str]]:
    """Keep one record per content hash; drop every copy of a hash labelled with two classes.

    Returns (kept, duplicates dropped, conflicting hashes). A conflict is dropped whole because
    either label may be the wrong one, and training on both teaches nothing.
    """
    by_hash: dict[str, list[ImageRecord]] = {}
    for r in records:
        by_hash.setdefault(r.sha256, []).append(r)
    kept: list[ImageRecord] = []
    duplicates = 0
    conflicts: list[str] = []
    for sha, group in by_hash.items():
        if len({r.label for r in group}) > 1:
            conflicts.append(sha)
            names = ", ".join(f"{r.path} ({classes[r.label]})" for r in group)
            log.warning("same image under two classes, all copies dropped: %s", names)
            continue
        kept.append(group[0])
        duplicates += len(group) - 1
    return kept, duplicates, conflicts


def discover(root: str | os.PathLike[str], fractions: Sequence[float], workers: int = 4) -> DatasetSplits:
    """Find the images under ``root`` and assign each to train/val/test.

    ``root`` is either a folder of class folders (split here: duplicates dropped by sha256, then
    each image placed by its hash) or a tree with train/ val/ test/ that is used as it is.
    """
    root = Path(root)
    if is_presplit(root):
        classes = find_classes(root / "train")
        parts, dup, conflicts = {}, 0, []
        for s in SPLITS:
            extra = set(find_classes(root / s)) - set(classes) if any((root / s).iterdir()) else set()
            if extra:
                raise ValueError(f"{root / s} has class folders {sorted(extra)} that train/ does not have")
            parts[s], n_dup, conf = deduplicate(_records_for(root / s, classes, workers), classes)
            dup, conflicts = dup + n_dup, conflicts + conf
        seen = {r.sha256 for r in parts["train"]}
        leaked = sum(r.sha256 in seen for r in parts["val"] + parts["test"])
        if leaked:
            log.warning("%d val/test images are byte-identical to train images in %s (used as given)", leaked, root)
        splits = DatasetSplits(classes, parts["train"], parts["val"], parts["test"], True, dup, conflicts)
    else:
        classes = find_classes(root)
        records, dup, conflicts = deduplicate(_records_for(root, classes, workers), classes)
        parts = {s: [] for s in SPLITS}
        for r in records:
            parts[split_of(r.sha256, fractions)].append(r)
        splits = DatasetSplits(classes, parts["train"], parts["val"], parts["test"], False, dup, conflicts)
    log.info("classes %s; images per split %s; %d duplicates dropped", classes, splits.counts(), splits.duplicates)
    return splits


def require_every_class(splits: DatasetSplits, names: Iterable[str] = SPLITS) -> None:
    """Raise ValueError naming the class and split when a split lacks a class.

    A split without some class cannot measure (val, test) or learn (train) it, so training stops
    before it starts rather than reporting a meaningless accuracy.
    """
    counts = splits.counts()
    for s in names:
        missing = [c for c, n in counts[s].items() if n == 0]
        if missing:
            raise ValueError(
                f"class {missing[0]!r} has no images in the {s} split (images per class: {counts[s]}); "
                "add more images of that class"
            )


def load_image(path: str | os.PathLike[str], size: int) -> np.ndarray:
    """Decode one image to RGB, apply its EXIF orientation and resize it to (size, size).

    Returns uint8 (size, size, 3). Grayscale, RGBA, palette and CMYK images become RGB. Raises
    ValueError with the reason when the file is not a decodable image or claims more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (checked from the header, before any pixel is decoded).
    """
    try:
        with Image.open(path) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise ValueError(f"image too large (decompression bomb guard): {img.width}x{img.height} "
                                 f"pixels is over the limit of {limit}")
            img.draft("RGB", (size, size))  # JPEG: let libjpeg downscale by DCT (big photos decode ~8x faster)
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.array(img, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)
    except Image.DecompressionBombError as e:  # PIL's own guard at twice the limit, raised by open()
        raise ValueError(f"image too large (decompression bomb guard): {e}") from None
    except (OSError, SyntaxError) as e:  # PIL raises these for unreadable files
        raise ValueError(f"cannot decode image: {e}") from None


def try_load_image(path: Path, size: int) -> np.ndarray | str:
    """``load_image``, but a file that does not decode gives its reason (a str) instead of raising."""
    try:
        return load_image(path, size)
    except ValueError as e:
        return str(e)


def decode_images(paths: Sequence[Path], size: int, workers: int = 4, desc: str = "decode") -> tuple[torch.Tensor, list[int], list[tuple[Path, str]]]:
    """Decode and resize many images in parallel threads.

    Returns (images uint8 (N_ok, 3, size, size), indices of ``paths`` that decoded,
    [(path, reason)] for those that did not).
    """
    with ThreadPoolExecutor(max(1, workers)) as pool:
        results = list(progress(pool.map(lambda p: try_load_image(p, size), paths), total=len(paths), desc=desc, unit="img", leave=False))
    ok = [i for i, r in enumerate(results) if not isinstance(r, str)]
    failed = [(Path(paths[i]), r) for i, r in enumerate(results) if isinstance(r, str)]
    for p, reason in failed:
        log.warning("skipped %s: %s", p, reason)
    if ok:
        stacked = np.stack([results[i] for i in ok])  # (N, S, S, 3)
        images = torch.from_numpy(stacked).permute(0, 3, 1, 2).contiguous()  # (N, 3, S, S)
    else:
        images = torch.empty((0, 3, size, size), dtype=torch.uint8)
    return images, ok, failed


@dataclass
class TensorSplit:
    """A decoded split: uint8 images (N, 3, S, S), int64 labels (N,), and the records behind them."""

    images: torch.Tensor
    labels: torch.Tensor
    records: list[ImageRecord]
    rejected: list[tuple[Path, str]]


def load_split(records: list[ImageRecord], size: int, workers: int = 4, desc: str = "decode") -> TensorSplit:
    """Decode the images of one split once, dropping (and reporting) files that do not decode."""
    images, ok, rejected = decode_images([r.path for r in records], size, workers, desc)
    kept = [records[i] for i in ok]
    labels = torch.tensor([r.label for r in kept], dtype=torch.int64)
    return TensorSplit(images, labels, kept, rejected)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 or [0, 1] float (B, 3, H, W) -> float32 normalised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    if x.dtype == torch.uint8:  # (u8 / 255 - m) / s as one scale and one shift, in place on the float copy
        return x.float().mul_(1.0 / (255.0 * s)).sub_(m / s)
    return (x - m) / s


def rotation_grid(cos: torch.Tensor, sin: torch.Tensor, sx: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Sampling grid (B, H, W, 2) of a per-image rotation (cos, sin: (B,)) and mirror (sx = -1 flips).

    Equals ``F.affine_grid`` of [[cos*sx, -sin, 0], [sin*sx, cos, 0]] (align_corners=False), built by
    broadcasting instead of a (B, H*W, 3) x (3, 2) batched matmul: ~9x faster on CPU.
    """
    xs = (torch.arange(width, dtype=cos.dtype, device=cos.device) * 2 + 1) / width - 1   # pixel centres in [-1, 1]
    ys = (torch.arange(height, dtype=cos.dtype, device=cos.device) * 2 + 1) / height - 1
    x, y = xs.view(1, 1, width), ys.view(1, height, 1)
    c, s, f = cos.view(-1, 1, 1), sin.view(-1, 1, 1), sx.view(-1, 1, 1)
    return torch.stack((c * f * x - s * y, s * f * x + c * y), dim=-1)


def augment(x: torch.Tensor, generator: torch.Generator, max_rotation_deg: float, hflip_prob: float) -> torch.Tensor:
    """Random horizontal flips and small rotations, drawn per image, on a float batch (B, 3, H, W).

    One grid_sample call rotates the whole batch, each image by its own angle; reflection padding
    avoids black corners the model could learn as a cue. Bilinear weights sum to 1, so normalising
    before or after augmenting gives the same batch.
    """
    b, _, h, w = x.shape
    # Draws come from a CPU generator whatever the device, so a seed gives the same augmentation everywhere.
    flip = (torch.rand(b, generator=generator) < hflip_prob).to(x.device)  # (B,)
    angle = ((torch.rand(b, generator=generator) * 2 - 1) * math.radians(max_rotation_deg)).to(x.device, x.dtype)
    sx = torch.where(flip, -1.0, 1.0).to(x.dtype)  # a flip is x -> -x in the sampling grid
    grid = rotation_grid(torch.cos(angle), torch.sin(angle), sx, h, w)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
