"""Image galleries: a contact sheet (one PNG of thumbnails, each with a caption) that a person can look at
instead of reading keys: the label audit's suspects, the test images candidate and champion disagree on.

A gallery only informs: an image that does not open becomes a grey tile saying so, never an error.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageOps

from faceclf.store.atomic import write_atomic

THUMB = 112             # pixels per tile side
CAPTION_LINES = 2       # caption lines under each tile
LINE_HEIGHT = 12        # pixels per caption line (PIL's default bitmap font is ~11 px high)
COLUMNS = 8
MAX_TILES = 64          # a sheet larger than this is cut (and says how many were left off)
CAPTION_CHARS = 19      # characters per caption line at THUMB px


def tile(path: Path, caption: str) -> Image.Image:
    """One thumbnail (THUMB x THUMB, aspect kept, grey border) with up to CAPTION_LINES lines of caption below."""
    cell = Image.new("RGB", (THUMB, THUMB + CAPTION_LINES * LINE_HEIGHT + 4), "white")
    try:
        with Image.open(path) as img:
            img.draft("RGB", (THUMB, THUMB))
            thumb = ImageOps.contain(img.convert("RGB"), (THUMB - 4, THUMB - 4))
        cell.paste(thumb, ((THUMB - thumb.width) // 2, (THUMB - thumb.height) // 2))
    except Exception as e:  # noqa: BLE001 - a gallery only informs; the tile says what went wrong
        cell.paste((200, 200, 200), (2, 2, THUMB - 2, THUMB - 2))
        caption = f"unreadable: {type(e).__name__} " + caption
    draw = ImageDraw.Draw(cell)
    for i in range(CAPTION_LINES):
        line = caption[i * CAPTION_CHARS:(i + 1) * CAPTION_CHARS]
        draw.text((2, THUMB + 2 + i * LINE_HEIGHT), line, fill="black")
    return cell


def contact_sheet(items: Sequence[tuple[Path, str]], out: Path, title: str) -> Path | None:
    """Write a PNG grid of ``items`` (image path, caption), COLUMNS wide, under ``title``; the first MAX_TILES
    only (the title says how many more there were). None, and nothing written, when ``items`` is empty."""
    if not items:
        return None
    shown = list(items[:MAX_TILES])
    more = len(items) - len(shown)
    heading = f"{title} ({len(items)} image{'s' if len(items) != 1 else ''}" + (f", first {len(shown)} shown)" if more else ")")
    cells = [tile(Path(p), c) for p, c in shown]
    columns = min(COLUMNS, len(cells))
    rows = math.ceil(len(cells) / columns)
    w, h = cells[0].size
    sheet = Image.new("RGB", (max(columns * w, 6 * len(heading) + 8), 20 + rows * h), "white")
    ImageDraw.Draw(sheet).text((4, 4), heading, fill="black")
    for i, cell in enumerate(cells):
        sheet.paste(cell, ((i % columns) * w, 20 + (i // columns) * h))
    write_atomic(out, lambda p: sheet.save(p, format="PNG"))
    return out
