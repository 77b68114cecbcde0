"""Checkpoints that are either complete or ignored, and finding the one to resume from.

The Hugging Face Trainer writes `checkpoint-N/` file by file; a run killed while writing leaves a folder that
looks like a checkpoint but is not. atrl writes a marker, `atrl_complete.json`, into the folder only after
everything else is on disk (marker written to a temporary name, flushed, then renamed: atomic on POSIX), and
resumes only from folders that carry it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

MARKER = "atrl_complete.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def mark_checkpoint_complete(folder: str | os.PathLike, step: int) -> Path:
    folder = Path(folder)
    tmp = folder / (MARKER + ".tmp")
    with tmp.open("w") as fh:
        json.dump({"step": step}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    final = folder / MARKER
    os.replace(tmp, final)
    return final


def checkpoint_step(folder: Path) -> int:
    """The step N of a `checkpoint-N` folder."""
    return int(_CHECKPOINT.match(folder.name).group(1))


def checkpoints(output_dir: str | os.PathLike) -> tuple[list[Path], list[Path]]:
    """(complete, incomplete) checkpoint folders under `output_dir`, each sorted by step."""
    root = Path(output_dir)
    if not root.is_dir():
        return [], []
    found = sorted((checkpoint_step(p), p) for p in root.iterdir() if p.is_dir() and _CHECKPOINT.match(p.name))
    complete = [p for _, p in found if (p / MARKER).is_file()]
    incomplete = [p for _, p in found if not (p / MARKER).is_file()]
    return complete, incomplete
