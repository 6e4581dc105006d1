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
import os
from collections import defaultdict
from dataclasses import dataclass
from typing import Generic, Hashable, Iterable, Iterator, TypeVar

import numpy as np
from PIL import Image

SIGNATURE_BITS = 64
THUMB_SIDE = 64                        # px, the longer side of the grey thumbnail everything is hashed from
CENTRE_SHARE = 0.7                     # of each side: a 10-degree rotation's empty corners stay outside it
PROBE_DEGREES = tuple(range(-10, 11, 2))  # a new image is looked up rotated by each: 1-2 degrees off still match
K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class Signature:
    """An image's upright hash (``value``, what the manifest stores) and its hashes rotated by each of
    PROBE_DEGREES (``probes``, ``value`` among them), with which a new image is looked up."""

    value: int
    probes: tuple[int, ...]


def _hash(img: Image.Image) -> int:
    """imagehash's 64-bit pHash of the centre of a grey image, as an int."""
    import imagehash

    w, h = img.size
    box = (round(w * (1 - CENTRE_SHARE) / 2), round(h * (1 - CENTRE_SHARE) / 2),
           round(w * (1 + CENTRE_SHARE) / 2), round(h * (1 + CENTRE_SHARE) / 2))
    bits = imagehash.phash(img.crop(box)).hash.reshape(-1)  # (64,) bool, row-major
    return int("".join("1" if b else "0" for b in bits), 2)


def thumbnail(img: Image.Image) -> Image.Image:
    """The grey thumbnail of an image, THUMB_SIDE px on its longer side, small images enlarged too (a 48 px face
    and its 72 px resize then hash alike): the same whether ``img`` was fully decoded already (ingest checks every
    pixel) or is a file just opened."""
    grey = img.convert("L")
    scale = THUMB_SIDE / max(grey.size)
    size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
    return grey.resize(size, Image.Resampling.BILINEAR, reducing_gap=2.0 if scale < 0.5 else None)


def signature_of(img: Image.Image) -> Signature:
    """The signature of an image: its upright hash and its rotated probes."""
    thumb = thumbnail(img)
    probes = tuple(_hash(thumb.rotate(d, resample=Image.Resampling.BILINEAR)) if d else _hash(thumb)
                   for d in PROBE_DEGREES)
    return Signature(probes[PROBE_DEGREES.index(0)], probes)


def signature_bytes(data: bytes) -> Signature:
    """``signature_of`` the image encoded in ``data``."""
    with Image.open(io.BytesIO(data)) as img:
        return signature_of(img)


def signature_file(path: str | os.PathLike[str]) -> Signature:
    """``signature_of`` the image file at ``path``."""
    with Image.open(path) as img:
        return signature_of(img)


def queries(sig: Signature | int) -> Iterable[int]:
    """The hashes to look an image up with: its probes, or its stored hash alone (a manifest row's)."""
    return sig.probes if isinstance(sig, Signature) else (sig,)


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

    def within(self, sig: int) -> Iterator[tuple[int, K]]:
        """(distance, key) of every entry within ``distance`` bits of ``sig``, each once, in the order added.

        Face hashes cluster (at 100,000 generated faces ~240 entries share a chunk with a query, not the ~12 of
        uniform hashes), so the candidates are compared in one numpy step, not one Python call each."""
        buckets = [b for table, (shift, mask) in zip(self._tables, self._chunks)
                   if (b := table.get((sig >> shift) & mask))]
        if not buckets:
            return
        candidates = np.unique(np.concatenate([np.asarray(b, dtype=np.int64) for b in buckets]))  # sorted (M,)
        dist = np.bitwise_count(self._sigs[candidates] ^ np.uint64(sig))                      # (M,) uint8
        for i, d in zip(candidates[dist <= self.distance].tolist(), dist[dist <= self.distance].tolist()):
            yield d, self._keys[i]

    def nearest(self, sig: int) -> tuple[int, K] | None:
        """(distance, key) of the closest entry within ``distance`` bits (the earliest added among equals); None
        if there is none."""
        return min(self.within(sig), key=lambda hit: hit[0], default=None)

    def nearest_of(self, sig: Signature | int) -> tuple[int, K] | None:
        """``nearest`` over every hash ``queries`` gives (a new image's rotated probes): the closest hit of any
        (among equals, that of the first probe that has one)."""
        hits = [hit for q in queries(sig) if (hit := self.nearest(q)) is not None]
        return min(hits, key=lambda hit: hit[0], default=None)
