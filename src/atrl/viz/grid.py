"""A PNG contact sheet of tasks: each image with its question and answer under it."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw, ImageFont


def task_grid(examples: Sequence, out_path: str | Path, *, columns: int = 5, tile: int = 224) -> Path:
    """Draw `examples` (objects with `.image`, `.question`, `.answer`, `.family`) into one PNG at `out_path`."""
    if not examples:
        raise ValueError("task_grid: no examples to draw")
    if columns <= 0:
        raise ValueError(f"task_grid: columns must be positive, got {columns}")
    font = ImageFont.load_default(size=12)
    caption_h = 76
    rows = (len(examples) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tile + 8) + 8, rows * (tile + caption_h + 8) + 8), (235, 235, 235))
    draw = ImageDraw.Draw(sheet)
    wrap = max(10, tile // 7)
    for k, ex in enumerate(examples):
        x = 8 + (k % columns) * (tile + 8)
        y = 8 + (k // columns) * (tile + caption_h + 8)
        sheet.paste(_poster(ex, tile), (x, y))
        lines = [f"[{ex.family}]"] + textwrap.wrap(ex.question, wrap)[:3] + [f"answer: {ex.answer}"]
        draw.multiline_text((x + 2, y + tile + 3), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    out = Path(out_path)
    from .._io import ensure_writable_dir

    ensure_writable_dir(out.parent if str(out.parent) else ".", argument="--out")
    sheet.save(out)
    return out


def _poster(ex, tile: int) -> Image.Image:
    """The tile of an example: its image, or a video's frames in reading order on a grid of the tile's size."""
    frames = getattr(ex, "frames", None)
    if not frames:
        return ex.image.convert("RGB").resize((tile, tile))
    import math

    cols = math.ceil(math.sqrt(len(frames)))
    rows = math.ceil(len(frames) / cols)
    side = min(tile // cols, tile // rows) - 2
    poster = Image.new("RGB", (tile, tile), (90, 90, 90))
    draw = ImageDraw.Draw(poster)
    font = ImageFont.load_default(size=10)
    for i, frame in enumerate(frames):
        fx, fy = 1 + (i % cols) * (side + 2), 1 + (i // cols) * (side + 2)
        poster.paste(frame.convert("RGB").resize((side, side)), (fx, fy))
        draw.text((fx + 2, fy + 1), str(i), fill=(0, 0, 0), font=font)
    return poster
