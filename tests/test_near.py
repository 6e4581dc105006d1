"""faceclf.dataset.near: the twin index answers exactly as brute force would (``within``, ``nearest``, a new image's
probes through ``nearest_of``), its chunks cut the 64 bits exactly once, the hex form is strict, and real augmented
copies of a face-mask photo are twins of it at the configured distance while distinct generated faces are not."""

from __future__ import annotations

import io
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from faceclf.config import NEAR_DISTANCE
from faceclf.dataset.near import (
    NearIndex,
    Signature,
    chunk_masks,
    from_hex,
    CROP_SHARES,
    PROBE_DEGREES,
    PROBE_DISTANCE,
    hamming,
    lookups,
    phashes,
    signature_bytes,
    signature_of,
    to_hex,
)
from conftest import SHARED_FACES

SIGS = st.integers(min_value=0, max_value=2**64 - 1)
HEX16 = re.compile(r"[0-9a-f]{16}")


@st.composite
def index_case(draw: st.DrawFn) -> tuple[int, int, list[int]]:
    """(distance 0..12, query, entries): random signatures (rarely near anything) mixed with the query with
    0..distance+3 bits flipped (near, at and just past the boundary), in a drawn order, repeats allowed."""
    distance = draw(st.integers(0, 12))
    query = draw(SIGS)
    anywhere = st.sets(st.integers(0, 63), max_size=distance + 3)
    boundary = st.sets(st.integers(0, 63), min_size=max(0, distance - 1), max_size=distance + 1)  # the hard cases
    near = st.one_of(anywhere, boundary).map(lambda bits: query ^ sum(1 << b for b in bits))
    entries = draw(st.lists(st.one_of(SIGS, near, near), max_size=40))
    return distance, query, entries


@settings(max_examples=200)
@given(index_case())
def test_within_is_exactly_the_brute_force_set_in_the_order_added(case: tuple[int, int, list[int]]) -> None:
    distance, query, entries = case
    index: NearIndex[int] = NearIndex(distance)
    for k, sig in enumerate(entries):
        index.add(sig, k)
    expected = [(hamming(query, s), k) for k, s in enumerate(entries) if hamming(query, s) <= distance]
    assert list(index.within(query)) == expected
    assert len(index) == len(entries)


@given(index_case())
def test_nearest_is_the_smallest_distance_and_the_earliest_added_among_equals(
        case: tuple[int, int, list[int]]) -> None:
    distance, query, entries = case
    index: NearIndex[int] = NearIndex(distance)
    for k, sig in enumerate(entries):
        index.add(sig, -k)  # keys sort against the order added: "earliest" must come from the order, not the key
    hits = [(hamming(query, s), k) for k, s in enumerate(entries) if hamming(query, s) <= distance]
    if not hits:
        assert index.nearest(query) is None
        return
    d, k = min(hits)  # smallest distance, then smallest position added
    assert index.nearest(query) == (d, -k)


@given(st.integers(0, 63))
def test_chunk_masks_cover_the_64_bits_exactly_once(distance: int) -> None:
    chunks = chunk_masks(distance)
    assert len(chunks) == distance + 1
    shifted = [mask << shift for shift, mask in chunks]
    assert sum(m.bit_count() for m in shifted) == 64      # no bit twice ...
    covered = 0
    for m in shifted:
        covered |= m
    assert covered == 2**64 - 1                           # ... and none left out
    widths = [mask.bit_count() for _, mask in chunks]
    assert max(widths) - min(widths) <= 1                 # as even as can be: no chunk a weak filter


@pytest.mark.parametrize("distance", [-1, 64, 100])
def test_chunk_masks_refuse_a_distance_the_pigeonhole_cannot_serve(distance: int) -> None:
    with pytest.raises(ValueError):
        chunk_masks(distance)
    with pytest.raises(ValueError):
        NearIndex(distance)


@given(SIGS, SIGS, SIGS)
def test_hamming_is_a_metric(a: int, b: int, c: int) -> None:
    assert hamming(a, b) == hamming(b, a) == bin(a ^ b).count("1")
    assert (hamming(a, b) == 0) == (a == b)
    assert hamming(a, c) <= hamming(a, b) + hamming(b, c)


@given(SIGS)
def test_hex_round_trips(sig: int) -> None:
    text = to_hex(sig)
    assert HEX16.fullmatch(text)
    assert from_hex(text) == sig


@given(st.one_of(st.text(max_size=20), st.text(alphabet="0123456789abcdefABCDEF x+-_", min_size=14, max_size=18)))
def test_from_hex_takes_sixteen_lowercase_hex_digits_and_nothing_else(text: str) -> None:
    if HEX16.fullmatch(text):
        assert from_hex(text) == int(text, 16)
    else:
        with pytest.raises(ValueError):
            from_hex(text)


@pytest.mark.parametrize("bad", ["0123456789ABCDEF", " 0123456789abcdef", "0x23456789abcdef", "+123456789abcdef",
                                 "012345678\u0669abcdef", b"0123456789abcdef", None, 12])
def test_from_hex_refuses_lookalikes(bad: object) -> None:
    with pytest.raises(ValueError):
        from_hex(bad)  # type: ignore[arg-type]


def _brute_nearest(entries: list[int], keys: list[int], sig: int, distance: int) -> tuple[int, int] | None:
    """The closest entry within ``distance`` of ``sig`` and, among equals, the earliest added: by comparing all."""
    hits = [(hamming(sig, s), pos) for pos, s in enumerate(entries) if hamming(sig, s) <= distance]
    return (min(hits)[0], keys[min(hits)[1]]) if hits else None


@given(index_case(), st.lists(st.sets(st.integers(0, 63), max_size=14), min_size=1, max_size=6))
def test_nearest_of_is_the_closest_hit_of_any_probe_the_first_probe_among_equals(
        case: tuple[int, int, list[int]], probe_flips: list[set[int]]) -> None:
    distance, query, entries = case
    keys = [-k for k in range(len(entries))]
    index: NearIndex[int] = NearIndex(distance)
    for sig, key in zip(entries, keys):
        index.add(sig, key)
    probes = tuple(query ^ sum(1 << b for b in bits) for bits in probe_flips)  # the query, turned a little
    # the upright hash within ``distance``, each probe only within PROBE_DISTANCE (each is one more chance of a
    # false twin)
    limits = [distance, *[min(PROBE_DISTANCE, distance)] * (len(probes) - 1)]
    hits = [h for q, lim in zip(probes, limits) if (h := _brute_nearest(entries, keys, q, lim)) is not None]
    expected = next((h for h in hits if h[0] == min(x[0] for x in hits)), None)  # first lookup with the least
    assert index.nearest_of(Signature(probes[0], probes[1:])) == expected
    assert index.nearest_of(probes[0]) == _brute_nearest(entries, keys, probes[0], distance)  # a stored hash
    assert lookups(probes[0], distance) == [(probes[0], distance)]


@settings(deadline=None, max_examples=25)
@given(st.integers(0, 12), st.lists(SIGS, min_size=1, max_size=5))
def test_a_key_added_under_several_signatures_is_found_by_any_of_them(distance: int, sigs: list[int]) -> None:
    index: NearIndex[str] = NearIndex(distance)
    for sig in sigs:
        index.add(sig, "k")
    for sig in sigs:
        assert index.nearest(sig) == (0, "k")


def _photo() -> bytes:
    """One face-mask photo (fixed, so the test is repeatable); skips when the shared data set is absent."""
    if not SHARED_FACES.is_dir():
        pytest.skip(f"the face-mask data set is not at {SHARED_FACES} (shared/ is not checked out here)")
    return sorted((SHARED_FACES / "without_mask").glob("*.jpg"))[0].read_bytes()


def test_augmented_copies_of_a_real_photo_are_twins_at_the_configured_distance() -> None:
    from benchmarks.neardup_bench import AUGMENTS

    data = _photo()
    original = signature_bytes(data)
    assert len(original.probes) == len(PROBE_DEGREES) + 1 + len(CROP_SHARES)   # turns, the mirror, the crops
    index: NearIndex[str] = NearIndex(NEAR_DISTANCE)
    index.add(original.value, "original")   # what the manifest keeps of a placed image
    for name in ("noise sigma 8", "resize 0.5x", "resize 0.5x and back", "jpeg quality 50", "rotate +5",
                 "rotate -5", "rotate +10", "flip left-right", "crop 5% border"):
        with Image.open(io.BytesIO(data)) as img:
            copy = signature_bytes(AUGMENTS[name](img.convert("RGB")))
        hit = index.nearest_of(copy)
        assert hit is not None and hit[1] == "original", (name, min(hamming(p, original.value) for p in copy.probes))


def test_distinct_generated_faces_are_not_twins() -> None:
    from faceclf.devtools.sample import draw_face

    rng = random.Random(5)
    index: NearIndex[int] = NearIndex(NEAR_DISTANCE)
    for k in range(16):
        sig = signature_of(draw_face(("with_mask", "without_mask")[k % 2], 64, rng))
        assert index.nearest_of(sig) is None, f"face {k} was taken for a twin of an earlier, distinct face"
        index.add(sig.value, k)


def test_batched_phash_has_imagehash_bits() -> None:
    """near.phashes is imagehash.phash computed for many images at once: the same bits, image by image."""
    import imagehash

    from faceclf.devtools.sample import draw_face

    rng = random.Random(9)
    images = [draw_face(("with_mask", "without_mask")[k % 2], 64 + 8 * k, rng).convert("L") for k in range(6)]
    expected = [int(str(imagehash.phash(img)), 16) for img in images]
    assert phashes(images) == expected


def test_the_rotated_centre_is_pils_rotation_cropped() -> None:
    """near.rotated_centre samples only the centre, with PIL's own rotation matrix: the very pixels of rotating the
    whole thumbnail and cropping its centre (so the hashes are those the benchmark measured)."""
    from faceclf.dataset.near import centre, rotated_centre, thumbnail
    from faceclf.devtools.sample import draw_face

    rng = random.Random(4)
    for k, side in enumerate((48, 64, 90, 130)):
        thumb = thumbnail(draw_face("with_mask", side, rng).resize((side, side * 3 // 4)))   # not square either
        for degrees in PROBE_DEGREES:
            expected = centre(thumb.rotate(degrees, resample=Image.Resampling.BILINEAR))
            assert rotated_centre(thumb, degrees).tobytes() == expected.tobytes(), (side, degrees)


def test_a_flat_image_has_no_signature_and_twins_nothing() -> None:
    """Every one-colour image would hash alike (a degenerate pHash): none gets a signature, so two of them are no
    twins and each is placed by its own hash; a face beside them still gets one."""
    from faceclf.devtools.sample import draw_face

    assert signature_of(Image.new("RGB", (40, 40), (200, 10, 10))) is None
    assert signature_of(Image.new("L", (64, 48), 7)) is None
    assert signature_of(draw_face("with_mask", 64, random.Random(1))) is not None
