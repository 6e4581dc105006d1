"""Placement rules (faceclf.dataset.placement) as properties: a new image joins its nearest placed twin's split,
placement never moves what is placed, resplit leaves no twin group straddling splits and only moves images toward
train; and the label-suspect record read back from the bucket (faceclf.nightly.audit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from faceclf.dataset.layout import SPLITS, split_of
from faceclf.dataset.near import hamming
from faceclf.dataset.placement import Placement, resplit_moves, twin_counts, twin_groups
from faceclf.nightly.audit import SUSPECTS_KEY, AuditRow, read_suspects, record_suspects
from faceclf.store.objects import LocalStore

MANY = settings(deadline=None, max_examples=150)
FRACTIONS = (0.8, 0.1, 0.1)
HEX64 = st.text("0123456789abcdef", min_size=64, max_size=64)


@st.composite
def families(draw: st.DrawFn) -> list[int]:
    """Signatures in a few families: each a random base and members a few bits away (twins within 4 bits)."""
    sigs = []
    for _ in range(draw(st.integers(1, 6))):
        base = draw(st.integers(0, 2**64 - 1))
        for _ in range(draw(st.integers(1, 5))):
            flips = draw(st.lists(st.integers(0, 63), max_size=2))
            sig = base
            for bit in flips:
                sig ^= 1 << bit
            sigs.append(sig)
    return sigs


@MANY
@given(sigs=families(), shas=st.lists(HEX64, min_size=30, max_size=30, unique=True), distance=st.integers(0, 6))
def test_a_new_image_joins_its_nearest_placed_twin_else_its_hash(sigs: list[int], shas: list[str], distance: int) -> None:
    placement, placed = Placement(FRACTIONS, distance), []
    for sig, sha in zip(sigs, shas):
        twins = [(hamming(sig, s), k) for k, (s, _) in enumerate(placed) if hamming(sig, s) <= distance]
        got = placement.place(sha, sig)
        if twins:
            best = min(twins)  # nearest; the earliest placed among equals
            assert got.split == placed[best[1]][1] and got.distance == best[0]
        else:
            assert got.split == split_of(sha, FRACTIONS) and got.twin is None
        placed.append((sig, got.split))


@MANY
@given(sigs=families(), splits=st.lists(st.sampled_from(SPLITS), min_size=30, max_size=30), distance=st.integers(0, 6))
def test_resplit_leaves_no_group_straddling_and_moves_only_toward_train(sigs: list[int], splits: list[str],
                                                                        distance: int) -> None:
    splits = splits[:len(sigs)]
    moves = resplit_moves(splits, sigs, distance)
    after = [moves.get(i, s) for i, s in enumerate(splits)]
    groups = twin_groups(sigs, distance)
    for g in set(groups):
        members = [i for i, x in enumerate(groups) if x == g]
        assert len({after[i] for i in members}) == 1                        # one split per group
        assert after[members[0]] == min((splits[i] for i in members), key=SPLITS.index)  # its earliest split
    assert all(SPLITS.index(new) < SPLITS.index(splits[i]) for i, new in moves.items())
    assert twin_counts(zip(after, sigs), distance) == {"val": 0, "test": 0}
    for i in range(len(sigs)):     # twins (directly within distance) always share a group
        for j in range(i):
            if hamming(sigs[i], sigs[j]) <= distance:
                assert groups[i] == groups[j]


def test_the_suspect_record_appends_once_per_image_and_refuses_a_bad_row(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "bucket")
    row = AuditRow("incoming/a/x.jpg", "a" * 64, tmp_path / "x.jpg", "a", "b", 0.97)
    assert read_suspects(store) == []
    assert record_suspects(store, [row], "20261201T021500Z-abc123", "now") == 1
    assert record_suspects(store, [row], "20261202T021500Z-abc123", "later") == 0  # recorded once
    assert [r["sha256"] for r in read_suspects(store)] == ["a" * 64]
    store.put_bytes(SUSPECTS_KEY, (json.dumps({"sha256": "../../etc", "key": "k", "given": "a", "suggested": "b",
                                               "confidence": 1}) + "\n").encode())
    with pytest.raises(ValueError, match="line 1: sha256"):
        read_suspects(store)
