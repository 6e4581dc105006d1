"""JPEGs decode through libjpeg-turbo (simplejpeg) to the very pixels PIL gives, so training's cache and
scoring may use either: the real face-mask photos, every EXIF orientation, grey, progressive, CMYK and
broken files, at every DCT scale."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import faceclf.dataset.preprocess as preprocess
from faceclf.dataset.jpeg import available, decode_jpeg_scaled, draft_factor, plain_header
from faceclf.dataset.preprocess import decode_into, load_image
from conftest import SHARED_FACES

pytestmark = pytest.mark.skipif(not available(), reason="simplejpeg is a dependency; this checks its path")


def pil_only(data: bytes, size: int) -> np.ndarray | str:
    """The PIL path alone (as load_image was before libjpeg-turbo), or its error text."""
    try:
        return preprocess.pil_decode(data, size)
    except ValueError as e:
        return str(e)


def decode_or_error(data: bytes, size: int) -> np.ndarray | str:
    try:
        return load_image(io.BytesIO(data), size)
    except ValueError as e:
        return str(e)


def face(width: int, height: int, seed: int = 0) -> Image.Image:
    """An asymmetric test picture (gradients and a block in one corner), so any wrong rotation shows."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(1, width - 1), y * 255 // max(1, height - 1), (x + y) % 256], -1).astype(np.uint8)
    img[: height // 3, : width // 4] = rng.integers(0, 255, 3)
    return Image.fromarray(img)


def jpeg(img: Image.Image, **save: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


def test_every_face_mask_photo_decodes_to_the_same_pixels() -> None:
    files = sorted(p for p in SHARED_FACES.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg"))
    assert len(files) > 1000, SHARED_FACES
    fast_used = 0
    for path in files:
        data = path.read_bytes()
        for size in (64, 96):
            fast_used += decode_jpeg_scaled(data, size) is not None
            got, want = decode_or_error(data, size), pil_only(data, size)
            assert isinstance(got, np.ndarray) and np.array_equal(got, want), (path, size)
    assert fast_used == 2 * len(files)  # all of them went through libjpeg-turbo


@pytest.mark.parametrize("orientation", range(1, 9))
def test_each_exif_orientation_is_applied_as_pil_applies_it(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = jpeg(face(300, 200), exif=exif.tobytes())
    assert decode_jpeg_scaled(data, 64) is not None
    assert np.array_equal(decode_or_error(data, 64), pil_only(data, 64))


@pytest.mark.parametrize("side", [64, 100, 128, 200, 256, 400, 520, 1000])
def test_draft_factor_is_the_scale_pil_decodes_at(side: int) -> None:
    data = jpeg(face(side, side + 37))
    with Image.open(io.BytesIO(data)) as img:
        img.draft("RGB", (96, 96))
        f = draft_factor(side, side + 37, 96)
        assert img.size == (-(-side // f), -(-(side + 37) // f))
    assert np.array_equal(decode_or_error(data, 96), pil_only(data, 96))


@pytest.mark.parametrize("kind", ["grey", "progressive", "subsampling 4:4:4", "cmyk", "png", "truncated", "garbage"])
def test_other_files_decode_or_fail_exactly_as_with_pil(kind: str) -> None:
    img = face(240, 180, seed=3)
    data = {
        "grey": lambda: jpeg(img.convert("L")),
        "progressive": lambda: jpeg(img, progressive=True),
        "subsampling 4:4:4": lambda: jpeg(img, subsampling=0),
        "cmyk": lambda: jpeg(img.convert("CMYK")),
        "png": lambda: (lambda b: (img.save(b, "PNG"), b.getvalue())[1])(io.BytesIO()),
        "truncated": lambda: jpeg(img)[:700],
        "garbage": lambda: b"\xff\xd8\xff" + b"not a jpeg at all" * 20,
    }[kind]()
    got, want = decode_or_error(data, 64), pil_only(data, 64)
    if isinstance(want, str):
        assert got == want and want.startswith("cannot decode image")  # the same error, in the same words
    else:
        assert np.array_equal(got, want)
    if kind in ("cmyk", "png", "truncated", "garbage"):
        assert decode_jpeg_scaled(data, 64) is None  # left to PIL


def test_a_missing_file_is_the_same_error_as_before(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot decode image: \[Errno 2\] No such file or directory"):
        load_image(tmp_path / "gone.jpg", 64)


def segment(marker: int, payload: bytes) -> bytes:
    """A JPEG marker segment: FF marker, 2-byte length (itself included), payload."""
    return bytes([0xFF, marker]) + (len(payload) + 2).to_bytes(2, "big") + payload


@settings(max_examples=60, deadline=None)
@given(width=st.integers(1, 200), height=st.integers(1, 200), grey=st.booleans(),
       extra=st.lists(st.sampled_from([0xE0, 0xE1, 0xE2, 0xEB, 0xED, 0xEE, 0xFE]), max_size=3),
       size=st.sampled_from([16, 64]))
def test_plain_header_reads_what_pil_reads_and_defers_where_orientation_could_hide(
        width: int, height: int, grey: bool, extra: list[int], size: int) -> None:
    img = face(width, height)
    data = jpeg(img.convert("L") if grey else img)
    # extra segments (APPn, COM) go right after SOI, as cameras and editors put them
    data = data[:2] + b"".join(segment(m, b"Exif\0\0" if m == 0xE1 else b"x" * 7) for m in extra) + data[2:]
    got = plain_header(data)
    if {0xE1, 0xE2} & set(extra):
        assert got is None  # EXIF / XMP / MPF: PIL's parser reads the orientation or the MPO index
    else:
        with Image.open(io.BytesIO(data)) as pil:
            assert got == pil.size
    out = np.empty((size, size, 3), np.uint8)
    want = pil_only(data, size)
    assert decode_into(data, size, out) is None and np.array_equal(out, want)


@settings(max_examples=200, deadline=None)
@given(junk=st.binary(max_size=64), cut=st.integers(0, 400))
def test_plain_header_never_raises_on_broken_bytes(junk: bytes, cut: int) -> None:
    data = jpeg(face(40, 30))
    for candidate in (b"\xff\xd8\xff" + junk, data[:cut], data[:cut] + junk):
        got = plain_header(candidate)
        assert got is None or got == (40, 30)


def test_jpegs_already_at_the_model_size_decode_straight_into_the_batch() -> None:
    batch = np.zeros((2, 64, 64, 3), np.uint8)
    data = jpeg(face(64, 64))
    assert decode_into(data, 64, batch[1]) is None
    assert np.array_equal(batch[1], pil_only(data, 64)) and not batch[0].any()
    assert decode_into(b"\xff\xd8\xff" + b"not a jpeg at all" * 20, 64, batch[0]).startswith("cannot decode image")
