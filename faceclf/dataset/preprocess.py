"""The one preprocessing preset: how a face image file becomes model input, for training and scoring alike.

    file -> decode (EXIF orientation, RGB) -> resize to S x S (bilinear) -> uint8 (S, S, 3)
         -> float32 x * scale - shift, channel-first        (== (x / 255 - mean) / std)

Training (torch), evaluation, the export metadata and ONNX Runtime scoring (numpy) all take their
numbers from a ``Preprocess``: the same scale and shift arrays, so both paths build identical inputs.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import numpy as np
from PIL import Image, ImageOps

from faceclf.config import AUTO_MAX_SIZE, MEAN, STD, DataConfig
from faceclf.dataset.jpeg import decode_jpeg_into

_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass(frozen=True)
class Preprocess:
    """Input size and per-channel normalisation of a model; travels in checkpoints and ONNX metadata."""

    image_size: int = AUTO_MAX_SIZE
    mean: tuple[float, float, float] = MEAN
    std: tuple[float, float, float] = STD

    @classmethod
    def of(cls, image_size: int, mean: Sequence[float], std: Sequence[float]) -> "Preprocess":
        """From any sequences (JSON lists, config tuples)."""
        return cls(int(image_size), tuple(float(m) for m in mean), tuple(float(s) for s in std))  # type: ignore[arg-type]

    @classmethod
    def from_config(cls, data: DataConfig) -> "Preprocess":
        """The preset a run's DataConfig describes."""
        return cls.of(data.image_size, data.mean, data.std)

    @classmethod
    def from_checkpoint(cls, ckpt: Mapping[str, Any]) -> "Preprocess":
        """The preset a checkpoint was trained with."""
        return cls.of(ckpt["image_size"], ckpt["mean"], ckpt["std"])

    @classmethod
    def from_metadata(cls, meta: Mapping[str, str]) -> "Preprocess":
        """The preset written into an ONNX model's metadata_props by ``metadata``."""
        return cls.of(int(meta["image_size"]), json.loads(meta["mean"]), json.loads(meta["std"]))

    def metadata(self) -> dict[str, str]:
        """ONNX metadata_props entries that let any reader rebuild this preset."""
        return {"image_size": str(self.image_size), "mean": json.dumps(list(self.mean)),
                "std": json.dumps(list(self.std))}

    def scale_shift(self) -> tuple[np.ndarray, np.ndarray]:
        """float32 (3,) arrays with u8 * scale - shift == (u8 / 255 - mean) / std: one multiply, one subtract."""
        mean, std = np.asarray(self.mean, np.float32), np.asarray(self.std, np.float32)
        return np.float32(1.0) / (np.float32(255.0) * std), mean / std

    def decode(self, path: str | os.PathLike[str]) -> np.ndarray:
        """One image file -> uint8 (S, S, 3); ValueError with the reason if it is not a decodable image."""
        return load_image(path, self.image_size)

    def try_decode(self, path: str | os.PathLike[str]) -> np.ndarray | str:
        """``decode``, but a file that does not decode gives its reason (a str) instead of raising."""
        try:
            return self.decode(path)
        except ValueError as e:
            return str(e)

    def to_input(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, S, S, 3) -> normalised float32 (B, 3, S, S), the model's input (numpy: ONNX Runtime)."""
        scale, shift = self.scale_shift()
        x = images.transpose(0, 3, 1, 2).astype(np.float32)                  # (B, 3, S, S)
        x *= scale.reshape(1, 3, 1, 1)
        x -= shift.reshape(1, 3, 1, 1)
        return x


def load_image(path: str | os.PathLike[str] | BinaryIO, size: int) -> np.ndarray:
    """Decode one image to RGB, apply its EXIF orientation and resize it to (size, size).

    Returns uint8 (size, size, 3). Grayscale, RGBA, palette and CMYK images become RGB. Raises
    ValueError with the reason when the file is not a decodable image or claims more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` (checked from the header, before any pixel is decoded). JPEGs decode
    through libjpeg-turbo (faceclf.dataset.jpeg) to the very pixels ``pil_decode`` gives; the rest through PIL.
    """
    try:
        data = path.read() if hasattr(path, "read") else Path(path).read_bytes()
    except OSError as e:
        raise ValueError(f"cannot decode image: {e}") from None
    out = np.empty((size, size, 3), np.uint8)
    return out if decode_jpeg_into(data, size, out) else pil_decode(data, size)


def decode_into(data: bytes, size: int, out: np.ndarray) -> str | None:
    """``load_image`` of an image file's bytes written into ``out`` (uint8 (size, size, 3), e.g. one slot of a
    batch array); the reason it does not decode, or None. Scoring decodes a batch this way, without an array
    per image."""
    if decode_jpeg_into(data, size, out):  # libjpeg-turbo, GIL released while it decodes
        return None
    try:
        out[...] = pil_decode(data, size)
    except ValueError as e:
        return str(e)
    return None


def pil_decode(data: bytes, size: int) -> np.ndarray:
    """``load_image`` through PIL alone: every format, and the reference the libjpeg-turbo path matches."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.width * img.height > limit:
                raise ValueError(f"image too large (decompression bomb guard): {img.width}x{img.height} "
                                 f"pixels is over the limit of {limit}")
            img.draft("RGB", (size, size))  # JPEG: let libjpeg downscale by DCT (jpeg.draft_factor: the same)
            img = ImageOps.exif_transpose(img)
            if img.mode in ("P", "PA", "LA", "RGBA") or "transparency" in img.info:
                img = img.convert("RGBA")
            img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR, reducing_gap=3.0)
            return np.array(img, dtype=np.uint8)  # a writable copy (asarray of a PIL image is read-only)
    except Image.DecompressionBombError as e:  # PIL's own guard at twice the limit, raised by open()
        raise ValueError(f"image too large (decompression bomb guard): {e}") from None
    except (OSError, SyntaxError) as e:  # PIL raises these for unreadable files
        # PIL names an in-memory file by its repr ("<_io.BytesIO object at 0x7f..>"): leave that out, so
        # the same bad bytes give the same error text in every run (the row's key names the file).
        raise ValueError(f"cannot decode image: {_BUFFER_REPR.sub('', str(e))}") from None
