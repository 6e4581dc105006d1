"""Which split an image goes to, so that near-duplicates never straddle train / val / test.

    a new image           joins the split of its nearest already-placed twin (pHash within ``distance`` bits,
                          faceclf.dataset.near); an image with no twin is placed by its content hash
                          (faceclf.dataset.layout.split_of). Placed images never move by themselves.
    twins across splits   counted every night (``twin_counts``: val/test images with a train twin), and moved
                          only by an explicit `faceclf resplit` (``resplit_moves``).

Resplit's rule: a group of twins (connected by chains of twins) that straddles splits goes whole to the first
of train, val, test that holds one of its members. So test images leave for train where a twin was trained on,
never the reverse: the images a model (the champion included) trained on never enter the test set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

from faceclf.dataset.layout import SPLITS, split_of
from faceclf.dataset.near import NearIndex, Signature, lookups

Sig = Signature | int | None   # a new image's full signature, a stored hash (manifest), or none known


@dataclass(frozen=True)
class Placed:
    """Where one image went and why: ``twin`` is the sha256 of the placed twin it joined (None: by hash)."""

    split: str
    twin: str | None = None
    distance: int | None = None


class Placement:
    """The split of each new image, given the images placed before it (their signatures and splits)."""

    def __init__(self, fractions: Sequence[float], distance: int) -> None:
        self.fractions = tuple(fractions)
        self.index: NearIndex[tuple[str, str]] = NearIndex(distance)   # key: (sha256, split)

    def add(self, sha256: str, signature: int | None, split: str) -> None:
        """Record an image already placed (e.g. a manifest row); one without a signature cannot be a twin."""
        if signature is not None:
            self.index.add(signature, (sha256, split))

    def place(self, sha256: str, signature: Sig) -> Placed:
        """The split of a new image (its nearest placed twin's, looked up with every rotated probe, else by hash),
        recorded for later ones."""
        hit = self.index.nearest_of(signature) if signature is not None else None
        placed = Placed(hit[1][1], hit[1][0], hit[0]) if hit else Placed(split_of(sha256, self.fractions))
        self.add(sha256, value(signature), placed.split)
        return placed


def value(signature: Sig) -> int | None:
    """The stored (upright) hash of a signature."""
    return signature.value if isinstance(signature, Signature) else signature


def twin_counts(images: Iterable[tuple[str, Sig]], distance: int) -> dict[str, int]:
    """How many val and test images have a train twin: ``images`` are (split, signature) pairs (None: not known,
    never a twin). Keys "val" and "test"; the night reports "test" as its leak. With stored hashes alone (the
    manifest's, as a night counts) a twin rotated by more than a degree or two is not seen; full signatures
    (resplit's, from the files) look up every rotated probe."""
    images = list(images)
    train: NearIndex[int] = NearIndex(distance)
    for i, (split, sig) in enumerate(images):
        if split == "train" and sig is not None:
            train.add(value(sig), i)
    counts = {"val": 0, "test": 0}
    for split, sig in images:
        if split in counts and sig is not None and train.nearest_of(sig) is not None:
            counts[split] += 1
    return counts


def twin_groups(signatures: Sequence[Sig], distance: int) -> list[int]:
    """The group of each image (the index of its group's first image): images joined by chains of twins share
    one. Union-find over the index's hits, each image compared only with those sharing a chunk."""
    parent = list(range(len(signatures)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]   # path halving
            i = parent[i]
        return i

    index: NearIndex[int] = NearIndex(distance)
    for i, sig in enumerate(signatures):
        if sig is None:
            continue
        for q, limit in lookups(sig, distance):
            for _, j in index.within(q, limit):
                a, b = root(i), root(j)
                if a != b:
                    parent[max(a, b)] = min(a, b)   # the smaller index roots: the group's first image
        index.add(value(sig), i)
    return [root(i) for i in range(len(signatures))]


def resplit_moves(splits: Sequence[str], signatures: Sequence[Sig], distance: int) -> dict[int, str]:
    """{image index: new split} for every image of a twin group that straddles splits: the group goes to the first
    of SPLITS (train, val, test) that one of its members is in. Images already there, and groups in one split,
    are not listed."""
    groups = twin_groups(signatures, distance)
    target: dict[int, str] = {}
    for i, g in enumerate(groups):
        if g not in target or SPLITS.index(splits[i]) < SPLITS.index(target[g]):
            target[g] = splits[i]
    return {i: target[g] for i, g in enumerate(groups) if splits[i] != target[g]}
