"""A procedural sample face set: cartoon faces a CNN can really tell apart, for demos and tests.

Each image is a face (random skin tone, position, size, tilt, background clutter, blur, noise)
drawn with a class-specific feature: a surgical-style mask over nose and mouth (`with_mask`), a
bare nose and mouth (`without_mask`), or dark glasses (`with_sunglasses`, for >2-class tests).
A ``look`` other than "plain" photographs the same faces differently (a shifted set for drift and warm-start
tests): "night" is a dim, blue-tinted, washed-out camera.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

KNOWN_CLASSES = ("with_mask", "without_mask", "with_sunglasses")
SKIN = [(255, 224, 189), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 56, 30)]
MASK = [(180, 215, 240), (245, 245, 245), (40, 40, 45), (120, 160, 200), (230, 170, 190), (90, 120, 90)]
LOOKS = ("plain", "night")


def _jitter(rgb: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(max(0, min(255, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _background(draw: ImageDraw.ImageDraw, w: int, rng: random.Random) -> None:
    draw.rectangle([0, 0, w, w], fill=_jitter((rng.randint(40, 220),) * 3, rng, 60))
    for _ in range(rng.randint(2, 6)):  # clutter so the face is not the only structure
        x, y, s = rng.randint(0, w), rng.randint(0, w), rng.randint(w // 10, w // 3)
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape([x - s, y - s, x + s, y + s], fill=_jitter((rng.randint(0, 255),) * 3, rng, 80))


def draw_face(cls: str, size: int, rng: random.Random) -> Image.Image:
    """Render one face of class ``cls`` at size x size pixels."""
    if cls not in KNOWN_CLASSES:
        raise ValueError(f"sample class {cls!r} is not one of {KNOWN_CLASSES}")
    w = size * 2  # draw at 2x, then downscale: cheap anti-aliasing
    img = Image.new("RGB", (w, w))
    d = ImageDraw.Draw(img)
    _background(d, w, rng)
    fw = w * rng.uniform(0.45, 0.62)
    fh = fw * rng.uniform(1.2, 1.38)
    cx, cy = w / 2 + rng.uniform(-0.08, 0.08) * w, w / 2 + rng.uniform(-0.06, 0.06) * w
    left, top, right, bottom = cx - fw / 2, cy - fh / 2, cx + fw / 2, cy + fh / 2
    skin = _jitter(rng.choice(SKIN), rng)
    d.ellipse([left - fw * 0.06, cy - fh * 0.1, left + fw * 0.06, cy + fh * 0.08], fill=skin)  # ears
    d.ellipse([right - fw * 0.06, cy - fh * 0.1, right + fw * 0.06, cy + fh * 0.08], fill=skin)
    d.ellipse([left, top, right, bottom], fill=skin)
    hair = _jitter(rng.choice([(20, 15, 10), (90, 60, 30), (200, 170, 90), (130, 130, 130)]), rng)
    d.chord([left, top - fh * 0.05, right, top + fh * 0.45], 180, 360, fill=hair)
    ey, ex = top + fh * 0.42, fw * 0.2
    for sx in (-1, 1):
        ecx = cx + sx * ex
        d.ellipse([ecx - fw * 0.09, ey - fh * 0.035, ecx + fw * 0.09, ey + fh * 0.035], fill=(250, 250, 250))
        d.ellipse([ecx - fw * 0.035, ey - fh * 0.03, ecx + fw * 0.035, ey + fh * 0.03], fill=_jitter((50, 40, 30), rng, 30))
        d.line([ecx - fw * 0.1, ey - fh * 0.08, ecx + fw * 0.1, ey - fh * 0.09], fill=hair, width=max(1, w // 60))
    nose_y, mouth_y = top + fh * 0.6, top + fh * 0.76
    if cls == "with_mask":
        mask = _jitter(rng.choice(MASK), rng, 12)
        mt, mb = top + fh * rng.uniform(0.5, 0.56), top + fh * rng.uniform(0.9, 0.97)
        d.rounded_rectangle([left + fw * 0.08, mt, right - fw * 0.08, mb], radius=w // 20, fill=mask)
        for k in range(1, 4):  # pleats
            y = mt + (mb - mt) * k / 4
            d.line([left + fw * 0.12, y, right - fw * 0.12, y], fill=_jitter(mask, rng, 40), width=max(1, w // 90))
        for sx in (-1, 1):  # ear loops
            edge = left + fw * 0.08 if sx < 0 else right - fw * 0.08
            d.line([edge, mt + (mb - mt) * 0.2, cx + sx * fw * 0.52, cy], fill=mask, width=max(1, w // 80))
    else:
        shade = tuple(int(c * 0.8) for c in skin)
        d.polygon([(cx, ey + fh * 0.05), (cx - fw * 0.06, nose_y), (cx + fw * 0.06, nose_y)], fill=shade)
        lips = _jitter((170, 60, 60), rng, 30)
        d.chord([cx - fw * 0.18, mouth_y - fh * 0.06, cx + fw * 0.18, mouth_y + fh * 0.06], 0, 180, fill=lips)
        if cls == "with_sunglasses":
            for sx in (-1, 1):
                ecx = cx + sx * ex
                d.ellipse([ecx - fw * 0.13, ey - fh * 0.06, ecx + fw * 0.13, ey + fh * 0.06], fill=(15, 15, 20))
            d.line([cx - ex + fw * 0.1, ey, cx + ex - fw * 0.1, ey], fill=(15, 15, 20), width=max(1, w // 50))
    img = img.rotate(rng.uniform(-12, 12), resample=Image.Resampling.BILINEAR, fillcolor=_jitter((128, 128, 128), rng, 90))
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5))).resize((size, size), Image.Resampling.BILINEAR)
    # Gaussian grey noise around 128 from our own seeded generator (PIL's effect_noise draws from the
    # C library's rand(), whose state depends on everything the process did before: not repeatable).
    sigma = rng.uniform(2, 14)
    grey = np.random.default_rng(rng.getrandbits(64)).normal(128.0, sigma, (size, size)).clip(0, 255)
    noise = Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    return Image.blend(img, noise, 0.08)


def with_look(img: Image.Image, look: str) -> Image.Image:
    """``img`` as the camera ``look`` sees it; "plain" is ``img`` itself (no random draw either way, so a seed
    gives the same faces in every look)."""
    if look not in LOOKS:
        raise ValueError(f"sample look {look!r} is not one of {LOOKS}")
    if look == "plain":
        return img
    rgb = np.asarray(img, dtype=np.float32)                                # (S, S, 3)
    grey = rgb.mean(axis=2, keepdims=True)
    night = 0.35 * (0.5 * rgb + 0.5 * grey) * np.array([0.7, 0.85, 1.25], dtype=np.float32) + 12.0
    return Image.fromarray(night.clip(0, 255).astype(np.uint8))


def generate_sample_faces(root: str | Path, per_class: int = 150, size: int = 128, seed: int = 0,
                          classes: Sequence[str] = ("with_mask", "without_mask"), png_every: int = 7,
                          look: str = "plain") -> dict[str, int]:
    """Write ``per_class`` faces for each class to root/<class>/ (JPEG, every ``png_every``-th PNG), as the
    camera ``look`` sees them (one of LOOKS).

    The same seed gives the same files. Returns the number of files written per class.
    """
    if look not in LOOKS:
        raise ValueError(f"sample look {look!r} is not one of {LOOKS}")
    root = Path(root)
    rng = random.Random(seed)
    written = {}
    for cls in classes:
        folder = root / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            img = with_look(draw_face(cls, size, rng), look)
            if png_every and i % png_every == png_every - 1:
                img.save(folder / f"{cls}_{i:05d}.png")
            else:
                img.save(folder / f"{cls}_{i:05d}.jpg", quality=rng.randint(70, 95))
        written[cls] = per_class
    return written
