"""Near-duplicates: a perceptual signature per image, and an index that finds an image's nearest twin.

Exact duplicates share a sha256; augmented copies of one photo (noise, a resize, a small rotation, a
re-encode) share nothing byte-wise, yet a model trained on one has as good as seen the other. Placed in
different splits they leak: the test set measures memory.

The signature: a grey thumbnail (THUMB_SIDE px on its longer side), its centre (CENTRE_SHARE of each side), and
imagehash's 64-bit pHash of that (the signs of the low-frequency DCT of a 32x32 resize). Two images whose
hashes differ in at most ``distance`` bits are twins (``near_distance`` in faceclf.config, chosen by `python3 -m
benchmarks --only neardup`: how many augmented copies it catches against how many distinct faces it merges).
pHash alone misses rotations (5 degrees moved it ~10 bits on face-mask, as far as distinct faces), so a new image
is also looked up rotated by each of PROBE_DEGREES: one of them undoes a twin's rotation, and the centre crop
keeps the rotation's empty corners out of the hash. Only the upright hash is stored (the manifest's ``phash``).

The index is multi-index hashing: the 64 bits are cut into ``distance + 1`` chunks; two hashes within
``distance`` bits agree exactly on at least one chunk (pigeonhole), so a lookup only compares the entries
that share a chunk with the query, never every pair. Adding and looking up cost what is new.
"""

from __future__ import annotations

import io
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Generic, Hashable, Iterator, Sequence, TypeVar

import numpy as np
from PIL import Image, ImageOps

SIGNATURE_BITS = 64
THUMB_SIDE = 64                        # px, the longer side of the grey thumbnail every hash is taken from
CENTRE_SHARE = 0.7                     # of each side: a 10-degree rotation's empty corners stay outside it
PROBE_DEGREES = tuple(d for d in range(-10, 11) if d)  # a new image is also looked up rotated by each (every
                                       # degree: at 2-degree steps 4-9% of 3-7 degree turns stayed 4 bits off)
CROP_SHARES = (0.63, 0.78)             # ... and at these centre shares: a 5% border crop either way round
                                       # (the crop's centre 70% is the original's 63%; the original's 78% is the
                                       # crop's 70%), and mirrored (training flips faces: a mirror twin is a leak)
PROBE_DISTANCE = 2                     # bits a probe may differ by: each probe is another chance of a false
                                       # twin, so probes match closer than the upright hash (near_distance)
HASH_SIDE, LOW = 32, 8                 # imagehash.phash's: DCT of a 32x32 resize, its 8x8 lowest frequencies
FLAT_RANGE = 2                         # grey levels: a centre spanning no more than this has no signature (a blank or
                                       # one-colour image hashes like every other one: no twin of anything)
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Signature:
    """An image's upright hash (``value``, what the manifest stores) and its probes (rotated, mirrored and
    crop-scaled hashes), with which a new image is also looked up."""

    value: int
    probes: tuple[int, ...]


def thumbnail(img: Image.Image) -> Image.Image:
    """The grey thumbnail of an image, THUMB_SIDE px on its longer side, small images enlarged too (a 48 px face
    and its 72 px resize then hash alike): the same whether ``img`` was fully decoded already (ingest checks every
    pixel) or is a file just opened."""
    grey = img.convert("L")
    scale = THUMB_SIDE / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    return grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)


def centre_box(w: int, h: int, share: float = CENTRE_SHARE) -> tuple[int, int, int, int]:
    """The box (left, top, right, bottom) of the centre ``share`` of each side of a w x h image."""
    return (round(w * (1 - share) / 2), round(h * (1 - share) / 2),
            round(w * (1 + share) / 2), round(h * (1 + share) / 2))


def centre(img: Image.Image, share: float = CENTRE_SHARE) -> Image.Image:
    """The centre ``share`` of each side of an image."""
    return img.crop(centre_box(*img.size, share))


def rotated_centre(img: Image.Image, degrees: float) -> Image.Image:
    """``centre(img.rotate(degrees, BILINEAR))`` in one affine transform that samples only the centre: the same
    pixels (PIL's rotation matrix, shifted to the box) at half the cost."""
    w, h = img.size
    a = -math.radians(degrees)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    left, top, right, bottom = centre_box(w, h)
    m[2] = m[0] * (left - w / 2) + m[1] * (top - h / 2) + w / 2    # output (0, 0) is the box's corner
    m[5] = m[3] * (left - w / 2) + m[4] * (top - h / 2) + h / 2
    return img.transform((right - left, bottom - top), Image.Transform.AFFINE, m, Image.Resampling.BILINEAR)


def views(thumb: Image.Image) -> list[Image.Image]:
    """What is hashed: the upright centre first, then the probes (each rotation's centre, the mirror's, and the
    centres at CROP_SHARES)."""
    rotated = [rotated_centre(thumb, d) for d in PROBE_DEGREES]
    cropped = [centre(thumb, share) for share in CROP_SHARES]
    return [centre(thumb), *rotated, centre(ImageOps.mirror(thumb)), *cropped]


def phashes(images: Sequence[Image.Image]) -> list[int]:
    """imagehash.phash of each grey image, as ints (bits row-major, first bit most significant), in one batch:
    the same bits as imagehash's (checked in tests/test_near.py) at a fraction of its per-call cost."""
    from scipy.fftpack import dct

    pixels = np.stack([np.asarray(i.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.LANCZOS)) for i in images])
    freq = dct(dct(pixels, axis=1), axis=2)[:, :LOW, :LOW]                   # (V, 8, 8), as imagehash: float64
    bits = freq.reshape(len(images), -1) > np.median(freq.reshape(len(images), -1), axis=1, keepdims=True)
    weights = np.uint64(1) << np.arange(LOW * LOW - 1, -1, -1, dtype=np.uint64)  # (64,) first bit highest
    return [int(x) for x in (bits.astype(np.uint64) * weights).sum(axis=1, dtype=np.uint64)]


def flat(img: Image.Image) -> bool:
    """True when a grey image has (next to) no structure: all its pixels within FLAT_RANGE grey levels. Its pHash
    is degenerate (every flat image hashes alike), so it has no signature and is never anyone's twin."""
    lo, hi = img.getextrema()
    return hi - lo <= FLAT_RANGE


def signature_of(img: Image.Image) -> Signature | None:
    """The signature of an image: its upright hash and its probes; None for a flat image (see ``flat``)."""
    thumb = thumbnail(img)
    if flat(centre(thumb)):
        return None
    hashes = phashes(views(thumb))
    return Signature(hashes[0], tuple(hashes[1:]))


def signature_bytes(data: bytes) -> Signature | None:
    """``signature_of`` the image encoded in ``data``."""
    with Image.open(io.BytesIO(data)) as img:
        return signature_of(img)


def signature_file(path: str | os.PathLike[str]) -> Signature | None:
    """``signature_of`` the image file at ``path``."""
    with Image.open(path) as img:
        return signature_of(img)


def lookups(sig: Signature | int, distance: int) -> list[tuple[int, int]]:
    """(hash, bits it may differ by) to look an image up with: its upright hash within ``distance``, and its probes
    within PROBE_DISTANCE (no more than ``distance``); a stored hash (a manifest row's) alone."""
    if isinstance(sig, int):
        return [(sig, distance)]
    return [(sig.value, distance), *((p, min(PROBE_DISTANCE, distance)) for p in sig.probes)]


def to_hex(sig: int) -> str:
    """A signature as the manifest stores it: 16 lowercase hex digits."""
    return f"{sig:016x}"


def from_hex(text: str) -> int:
    """A signature from its 16 hex digits; ValueError for anything else (the manifest is read back as input)."""
    if not isinstance(text, str) or len(text) != SIGNATURE_BITS // 4 or text.strip("0123456789abcdef"):
        raise ValueError(f"signature {text!r} is not {SIGNATURE_BITS // 4} lowercase hex digits")
    return int(text, 16)


def hamming(a: int, b: int) -> int:
    """Bits in which two signatures differ."""
    return (a ^ b).bit_count()


def chunk_masks(distance: int, bits: int = SIGNATURE_BITS) -> list[tuple[int, int]]:
    """(shift, mask) of each of the ``distance + 1`` chunks the signature is cut into (as even as can be)."""
    n = distance + 1
    if not 1 <= n <= bits:
        raise ValueError(f"distance must be in [0, {bits - 1}], got {distance}")
    edges = [round(i * bits / n) for i in range(n + 1)]
    return [(lo, (1 << (hi - lo)) - 1) for lo, hi in zip(edges, edges[1:])]


class NearIndex(Generic[K]):
    """Signatures with a key each; finds those within ``distance`` bits of a query without comparing every pair."""

    def __init__(self, distance: int) -> None:
        self.distance = distance
        self._chunks = chunk_masks(distance)
        self._tables: list[defaultdict[int, list[int]]] = [defaultdict(list) for _ in self._chunks]
        self._sigs = np.zeros(1024, dtype=np.uint64)   # (capacity,): entry i's hash at [i], doubled when full
        self._keys: list[K] = []

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, sig: int, key: K) -> None:
        """Index ``sig`` under ``key`` (a key may be added with several signatures, a signature under several keys)."""
        i = len(self._keys)
        if i == len(self._sigs):
            self._sigs = np.concatenate([self._sigs, np.zeros_like(self._sigs)])
        self._sigs[i] = sig
        self._keys.append(key)
        for table, (shift, mask) in zip(self._tables, self._chunks):
            table[(sig >> shift) & mask].append(i)

    def within(self, sig: int, limit: int | None = None) -> Iterator[tuple[int, K]]:
        """(distance, key) of every entry within ``limit`` (default: the index's ``distance``) bits of ``sig``,
        each once, in the order added.

        Face hashes cluster (at 100,000 generated faces ~240 entries share a chunk with a query, not the ~12 of
        uniform hashes), so the candidates are compared in one numpy step, not one Python call each."""
        buckets = [b for table, (shift, mask) in zip(self._tables, self._chunks)
                   if (b := table.get((sig >> shift) & mask))]
        if not buckets:
            return
        candidates = np.unique(np.concatenate([np.asarray(b, dtype=np.int64) for b in buckets]))  # sorted (M,)
        dist = np.bitwise_count(self._sigs[candidates] ^ np.uint64(sig))                      # (M,) uint8
        near = dist <= (self.distance if limit is None else min(limit, self.distance))
        for i, d in zip(candidates[near].tolist(), dist[near].tolist()):
            yield d, self._keys[i]

    def nearest(self, sig: int, limit: int | None = None) -> tuple[int, K] | None:
        """(distance, key) of the closest entry within ``limit`` (default ``distance``) bits (the earliest added
        among equals); None if there is none."""
        return min(self.within(sig, limit), key=lambda hit: hit[0], default=None)

    def nearest_of(self, sig: Signature | int) -> tuple[int, K] | None:
        """``nearest`` over every lookup of ``lookups`` (a new image's upright hash, then its probes, each within
        its own limit): the closest hit of any (among equals, that of the first lookup that has one)."""
        hits = [hit for q, limit in lookups(sig, self.distance) if (hit := self.nearest(q, limit)) is not None]
        return min(hits, key=lambda hit: hit[0], default=None)
