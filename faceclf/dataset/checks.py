"""What ingest accepts: a listed key and size first (no download), then the downloaded bytes.

    key and size (from the listing)  incoming/<class>/<name>: safe, visible, not too long parts;
                                     1 <= size <= max_bytes. The name's extension is not looked at.
    bytes (in memory)                JPEG (phone MPO too), PNG or WebP, judged from the bytes alone;
                                     pixel count and sides from the header before any pixel is decoded
                                     (decompression-bomb guard), then a full decode must succeed.

A refusal is a ``Refused`` whose message is the quarantine reason. The decoded format, not the object's
name, gives the image's extension in dest (``FILE_EXTENSIONS``, from faceclf.dataset.layout).
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass

from PIL import Image

from faceclf.config import MAX_NAME_BYTES, IngestConfig
from faceclf.dataset.layout import legal_class
from faceclf.dataset.manifest import INCOMING
from faceclf.dataset.near import Signature, signature_of
from faceclf.store.objects import ObjectInfo, Store, safe_key

FORMAT_ALIASES = {"MPO": "JPEG"}      # phone cameras' multi-picture JPEGs open as MPO; the file is a JPEG


class Refused(ValueError):
    """An object that is not ingested; the message is the quarantine reason."""


@dataclass(frozen=True)
class Checked:
    """A downloaded object that is a valid image: its bytes and what they are."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    signature: Signature | None = None  # perceptual (faceclf.dataset.near): what places a twin in its twin's split


def class_of(info: ObjectInfo, cfg: IngestConfig) -> str:
    """The class of a listed object, or Refused saying why its key or size is not acceptable.

    Checked before any download: the key must be exactly incoming/<class>/<name> with safe, visible,
    not too long parts, and a class that is a legal folder name on every worker OS (``legal_class``, the
    rule manifest rows are held to as well); the size must be in [1, max_bytes]. The name may have any
    extension (or none): the format is judged from the bytes by ``check_image``.
    """
    try:
        safe_key(info.key)
    except ValueError as e:
        raise Refused(f"unsafe key: {e}") from None
    parts = info.key[len(INCOMING):].split("/") if info.key.startswith(INCOMING) else []
    if len(parts) != 2:
        raise Refused(f"key {info.key!r} is not {INCOMING}<class>/<name>")
    cls, name = parts
    if cls.startswith(".") or name.startswith("."):
        raise Refused(f"hidden class or file name in key {info.key!r}")
    try:
        legal_class(cls)
    except ValueError as e:
        raise Refused(str(e)) from None
    if len(name.encode()) > MAX_NAME_BYTES:
        raise Refused(f"file name {name[:80]!r}... is over {MAX_NAME_BYTES} bytes")
    if info.size == 0:
        raise Refused("empty object (0 bytes)")
    if info.size > cfg.max_bytes:
        raise Refused(f"object of {info.size} bytes is over the {cfg.max_bytes}-byte limit")
    return cls


def webp_canvas(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a WebP file from its first chunk header; None if ``data`` is not one we can read.

    RIFF <size> WEBP, then VP8 (lossy: 14-bit sides after the 9d 01 2a start code), VP8L (lossless:
    14-bit sides minus one after the 0x2f signature) or VP8X (extended: 24-bit canvas sides minus one).
    """
    if len(data) < 25 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if len(data) < 30:
        return None
    if chunk == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    if chunk == b"VP8X":
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def check_header(fmt: str, w: int, h: int, cfg: IngestConfig) -> None:
    """Refused unless the format is allowed and w x h passes the pixel-count and side limits (ingest's check, and
    scoring's before it decodes: faceclf.serving.stream)."""
    if fmt not in cfg.allowed_formats:
        raise Refused(f"format {fmt} not allowed ({', '.join(cfg.allowed_formats)})")
    if w * h > cfg.max_pixels:
        raise Refused(f"image {w}x{h} is over the {cfg.max_pixels}-pixel limit (decompression bomb guard)")
    if not (cfg.min_side <= w <= cfg.max_side and cfg.min_side <= h <= cfg.max_side):
        raise Refused(f"image {w}x{h} has a side outside [{cfg.min_side}, {cfg.max_side}] pixels")


def bomb_reason(cfg: IngestConfig, e: Image.DecompressionBombError) -> str:
    """The refusal of an image Pillow's own guard stopped from its header (more pixels than it allows)."""
    return f"image is over the {cfg.max_pixels}-pixel limit (decompression bomb guard): {e}"


def check_image(data: bytes, cfg: IngestConfig) -> Checked:
    """Validate image bytes in memory; Refused with the reason if they are not an acceptable image.

    The format is what Pillow identifies from the bytes (never the object's name). Format and pixel
    count come from the header, before any pixel is decoded (decompression-bomb guard); then a full
    decode must succeed, which catches truncated and corrupt files. A WebP is checked from its own
    header before Pillow opens it: opening one already allocates the decoder's whole canvas.
    """
    if canvas := webp_canvas(data):
        check_header("WEBP", *canvas, cfg)
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = FORMAT_ALIASES.get(img.format or "", img.format or "unknown")
            w, h = img.size
            check_header(fmt, w, h, cfg)
            img.load()
            signature = signature_of(img)
    except Refused:
        raise
    except Image.DecompressionBombError as e:  # PIL's own guard, raised by open() from the header
        raise Refused(bomb_reason(cfg, e)) from None
    except Image.UnidentifiedImageError:
        raise Refused("not an image: cannot identify image file") from None
    except Exception as e:  # noqa: BLE001 - untrusted bytes: any decoder error means a bad file, not a bad night
        raise Refused(f"truncated or corrupt image data: {type(e).__name__}: {e}") from None
    return Checked(data, hashlib.sha256(data).hexdigest(), fmt, w, h, signature)


def fetch_and_check(store: Store, info: ObjectInfo, cfg: IngestConfig) -> Checked | Refused | Exception:
    """Download and validate one object (runs in a worker thread).

    Returns the Checked image, the Refused reason, or the download error (retried next night).
    """
    try:
        data = store.get_bytes(info.key)
    except Exception as e:  # noqa: BLE001 - reported per object; one failed GET must not end the night
        return e
    try:
        return check_image(data, cfg)
    except Refused as e:
        return e
