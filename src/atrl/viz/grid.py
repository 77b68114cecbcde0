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
        sheet.paste(ex.image.convert("RGB").resize((tile, tile)), (x, y))
        lines = [f"[{ex.family}]"] + textwrap.wrap(ex.question, wrap)[:3] + [f"answer: {ex.answer}"]
        draw.multiline_text((x + 2, y + tile + 3), "\n".join(lines), fill=(0, 0, 0), font=font, spacing=2)
    out = Path(out_path)
    from .._io import ensure_writable_dir

    ensure_writable_dir(out.parent if str(out.parent) else ".", argument="--out")
    sheet.save(out)
    return out
