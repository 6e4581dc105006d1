"""JPEG decoding through libjpeg-turbo's own API (simplejpeg), to exactly the pixels PIL gives.

PIL's ``draft`` asks libjpeg to decode a JPEG at 1/2, 1/4 or 1/8 of its size (DCT scaling) when the
target is that much smaller; simplejpeg decodes straight to numpy with the same scaled IDCT, without
PIL's per-call overhead. Asked for the very factor PIL would pick (``draft_factor``), it returns the same
pixels: on all 1,376 face-mask JPEGs the final resized images were identical, byte for byte
(tests/test_jpeg.py). Whatever this path does not cover (not a JPEG, CMYK, a file over the pixel limit,
anything simplejpeg refuses) returns None, and the caller decodes through PIL as before, so errors keep
their wording and rare formats their handling.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

try:
    import simplejpeg
except ImportError:  # a dependency; on a platform without its wheel, PIL decodes everything
    simplejpeg = None

_JPEG_MAGIC = b"\xff\xd8\xff"
# EXIF orientation -> the transpose that undoes it (the table of PIL.ImageOps.exif_transpose)
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
              5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
              8: Image.Transpose.ROTATE_90}


def draft_factor(width: int, height: int, size: int) -> int:
    """The DCT scale PIL's ``draft("RGB", (size, size))`` picks: the largest of 8, 4, 2, 1 not above
    min(width // size, height // size)."""
    scale = min(width // size, height // size)
    return next(f for f in (8, 4, 2, 1) if scale >= f or f == 1)


# SOFn markers (frame headers) that carry the image's size: every one but DHT (C4), JPG (C8) and DAC (CC)
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_STANDALONE = frozenset([0x01, *range(0xD0, 0xD8)])  # TEM, RSTn: markers without a length
_APP1, _APP2, _SOS = 0xE1, 0xE2, 0xDA  # APP1: EXIF or XMP (orientation); APP2: MPF (PIL opens it as MPO)


def plain_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of an 8-bit grey or 3-channel JPEG without APP1/APP2 segments, read from its markers in
    a few microseconds; None for anything else (PIL's header parser then decides).

    Without APP1 there is no EXIF or XMP orientation and without APP2 no MPF (multi-picture) index, so PIL
    would open the file as a plain JPEG, mode L or RGB, with orientation 1: exactly what this returns.
    """
    pos, n, size = 2, len(data), None
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return None  # not a marker where one must be: PIL's to judge
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        length = data[pos + 2] << 8 | data[pos + 3]
        if marker in (_APP1, _APP2) or length < 2:
            return None
        if marker == _SOS:
            return size
        if marker in _SOF:
            if size is not None or pos + 10 > n or data[pos + 4] != 8 or data[pos + 9] not in (1, 3):
                return None  # a second frame, 12-bit samples, CMYK or 2 channels
            height, width = data[pos + 5] << 8 | data[pos + 6], data[pos + 7] << 8 | data[pos + 8]
            size = (width, height) if width and height else None
            if size is None:
                return None
        pos += 2 + length
    return None


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) of a JPEG this module decodes (8-bit, grey or RGB, within PIL's pixel
    limit); None where PIL must: not a JPEG, CMYK, an MPO, too many pixels, or markers PIL cannot read."""
    if simplejpeg is None or not data.startswith(_JPEG_MAGIC):
        return None
    plain = plain_header(data)
    if plain is not None:
        width, height, orientation = *plain, 1
    else:
        try:
            with Image.open(io.BytesIO(data)) as header:  # parses the markers only: size, mode, EXIF
                if header.format != "JPEG" or header.mode not in ("RGB", "L"):
                    return None
                width, height = header.size
                orientation = header.getexif().get(0x0112, 1)
        except Exception:  # noqa: BLE001 - anything unusual is PIL's to decode, or to name the error of
            return None
    limit = Image.MAX_IMAGE_PIXELS
    if limit and width * height > limit:
        return None  # PIL's path raises the decompression-bomb error
    return width, height, orientation


def _decode_scaled(data: bytes, width: int, height: int, f: int, buffer: np.ndarray | None = None) -> np.ndarray:
    """uint8 (ceil(H/f), ceil(W/f), 3): libjpeg-turbo's scaled IDCT at exactly 1/f, into ``buffer`` when given."""
    # min_factor f forbids a smaller reduction, the minimum size a larger one: exactly 1/f
    return simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=f, min_height=-(-height // f),
                                  min_width=-(-width // f), buffer=buffer)


def decode_jpeg_scaled(data: bytes, size: int) -> Image.Image | None:
    """A JPEG's pixels at PIL's draft scale for ``size``, EXIF orientation applied, as an RGB PIL image;
    None where this path does not apply (the caller then decodes with PIL)."""
    header = jpeg_header(data)
    if header is None:
        return None
    width, height, orientation = header
    try:
        pixels = _decode_scaled(data, width, height, draft_factor(width, height, size))
    except Exception:  # noqa: BLE001 - a file libjpeg-turbo refuses is PIL's to decode or to name the error of
        return None
    img = Image.fromarray(pixels)
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def decode_jpeg_into(data: bytes, size: int, out: np.ndarray) -> bool:
    """Decode a JPEG to ``load_image``'s pixels, uint8 (size, size, 3), written into ``out``; False (``out``
    undefined) where this path does not apply and PIL must decode.

    A JPEG whose DCT-scaled size is already size x size with no orientation to apply (a 64 px face at 64, a
    128 px one at 64) is decoded straight into ``out``: no PIL image, no copy. PIL's resize of an image to
    its own size is a copy, so skipping it keeps the pixels.
    """
    header = jpeg_header(data)
    if header is None:
        return False
    width, height, orientation = header
    f = draft_factor(width, height, size)
    try:
        if orientation == 1 and -(-width // f) == size and -(-height // f) == size:
            _decode_scaled(data, width, height, f, buffer=out)
            return True
        pixels = _decode_scaled(data, width, height, f)
    except Exception:  # noqa: BLE001 - a file libjpeg-turbo refuses is PIL's to decode or to name the error of
        return False
    img = Image.fromarray(pixels)
    method = _TRANSPOSE.get(orientation)
    img = img.transpose(method) if method is not None else img
    out[...] = np.asarray(img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0))
    return True


def available() -> bool:
    """True when simplejpeg is installed (JPEGs then decode through it)."""
    return simplejpeg is not None

