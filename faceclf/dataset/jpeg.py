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


def decode_jpeg_scaled(data: bytes, size: int) -> Image.Image | None:
    """A JPEG's pixels at PIL's draft scale for ``size``, EXIF orientation applied, as an RGB PIL image;
    None where this path does not apply (the caller then decodes with PIL)."""
    if simplejpeg is None or not data.startswith(_JPEG_MAGIC):
        return None
    try:
        with Image.open(io.BytesIO(data)) as header:  # parses the markers only: size, mode, EXIF
            if header.format != "JPEG" or header.mode not in ("RGB", "L"):
                return None
            width, height = header.size
            limit = Image.MAX_IMAGE_PIXELS
            if limit and width * height > limit:
                return None  # PIL's path raises the decompression-bomb error
            orientation = header.getexif().get(0x0112, 1)
        f = draft_factor(width, height, size)
        # min_factor f forbids a smaller reduction, the minimum size a larger one: exactly 1/f
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_factor=f, min_height=-(-height // f),
                                        min_width=-(-width // f))  # (H/f, W/f, 3) uint8
    except Exception:  # noqa: BLE001 - anything unusual is PIL's to decode, or to name the error of
        return None
    img = Image.fromarray(pixels)
    method = _TRANSPOSE.get(orientation)
    return img.transpose(method) if method is not None else img


def available() -> bool:
    """True when simplejpeg is installed (JPEGs then decode through it)."""
    return simplejpeg is not None

