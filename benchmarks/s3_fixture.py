"""Shared fixture for the ingest and night benchmarks: many distinct small face JPEGs in a moto bucket.

Drawing 10,000 faces takes minutes, so a few hundred to 1,000 base faces are drawn with
faceclf.devtools.sample.generate_sample_faces and the rest are cheap variants of them: one pixel changed
(a different pixel per variant) and re-encoded with a different JPEG quality, optionally mirrored.
Every file's bytes are checked to be distinct (ingest drops exact duplicates), and each stays a
valid RGB JPEG of the base size (>= 32x32).
"""

from __future__ import annotations

import hashlib
import io
import os
import platform
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

CLASSES = ("with_mask", "without_mask")


def machine() -> str:
    """One line: CPU model, os.cpu_count(), Python."""
    try:
        from benchmarks.__main__ import machine as full

        return full()
    except Exception:  # noqa: BLE001 - torch missing or the runner module changed: a shorter line
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), platform.processor() or "unknown CPU")
        return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"




def row(benchmark: str, what: str, value: float | None, unit: str, baseline: str | None = None,
        baseline_value: float | None = None, note: str = "") -> dict:
    ratio = (value / baseline_value) if (value is not None and baseline_value) else None
    return {"benchmark": benchmark, "what": what, "value": value, "unit": unit, "baseline": baseline,
            "baseline_value": baseline_value, "ratio": ratio, "note": note}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def make_faces(n: int, size: int = 64, base_per_class: int | None = None, seed: int = 0) -> list[tuple[str, str, bytes]]:
    """``n`` distinct JPEGs, (class, file name, bytes), half per class; returns them in class order."""
    from faceclf.devtools.sample import generate_sample_faces

    per_class = -(-n // len(CLASSES))
    base_per_class = min(per_class, base_per_class or 500)
    out: list[tuple[str, str, bytes]] = []
    seen: set[str] = set()
    with tempfile.TemporaryDirectory(prefix="faceclf-bench-faces-") as tmp:
        generate_sample_faces(tmp, per_class=base_per_class, size=size, seed=seed, classes=CLASSES, png_every=0)
        for cls in CLASSES:
            bases = [Image.open(p).convert("RGB") for p in sorted((Path(tmp) / cls).glob("*.jpg"))]
            for i in range(per_class):
                if len(out) >= n:
                    break
                base, v = bases[i % len(bases)], i // len(bases)
                if v == 0:
                    img, quality = base, 90
                else:
                    img = base.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if v % 2 else base.copy()
                    px = (v * 7) % (size * size)
                    r, g, b = img.getpixel((px % size, px // size))
                    img.putpixel((px % size, px // size), ((r + 128) % 256, (g + 64) % 256, b))
                    quality = 70 + v % 26
                data = _jpeg(img, quality)
                bump = 0
                while hashlib.sha256(data).hexdigest() in seen:  # rare: same bytes as another variant
                    bump += 1
                    img = img.copy()
                    img.putpixel((bump % size, 0), (bump % 256, 255 - bump % 256, 0))
                    data = _jpeg(img, quality)
                seen.add(hashlib.sha256(data).hexdigest())
                out.append((cls, f"{cls}_{i:05d}.jpg", data))
    return out


def _jpeg(img: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def upload_faces(bucket: str, faces: list[tuple[str, str, bytes]], workers: int = 32) -> float:
    """Create ``bucket`` and put every face under incoming/<class>/<name> in parallel; return seconds."""
    from faceclf.store.s3 import s3_client

    client = s3_client(max_pool_connections=workers)
    client.create_bucket(Bucket=bucket)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda f: client.put_object(Bucket=bucket, Key=f"incoming/{f[0]}/{f[1]}", Body=f[2]), faces))
    return time.perf_counter() - t0


def reset_ingest_state(bucket: str) -> None:
    """Delete the manifest and quarantine log so that the next ingest downloads everything again."""
    from faceclf.dataset.manifest import MANIFEST_KEY, QUARANTINE_KEY
    from faceclf.store.s3 import s3_client

    client = s3_client()
    for key in (MANIFEST_KEY, QUARANTINE_KEY):
        client.delete_object(Bucket=bucket, Key=key)  # no error when the key does not exist
