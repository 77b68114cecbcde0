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


STATE = "trainer_state.json"


def run_history(folder: str | os.PathLike) -> tuple[list[dict], Path]:
    """The log history of a training run, and the file it was read from.

    `folder` is a run's output folder or one checkpoint folder. Read from the `trainer_state.json` with the most
    steps among the folder's own (a finished run writes one there) and its complete checkpoints' (a run still
    going, or killed, has only those); half-written checkpoints are not read."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {str(root)!r} does not exist")
    best: tuple[int, list[dict], Path] | None = None
    for path in [root / STATE, *(p / STATE for p in checkpoints(root)[0])]:
        if not path.is_file():
            continue
        try:
            state = json.loads(path.read_text())
            history, step = state["log_history"], int(state.get("global_step", 0))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{path}: not a trainer state with a log_history ({type(err).__name__}: {err})") from err
        if not isinstance(history, list):  # a bad file is bad input (ValueError), as everywhere in atrl
            raise ValueError(f"{path}: log_history is a {type(history).__name__}, not a list")  # noqa: TRY004
        if best is None or step > best[0]:
            best = (step, history, path)
    if best is None:
        raise FileNotFoundError(f"{root}: no {STATE} in the folder or in a complete checkpoint-N/ under it; give a "
                                "training run's output folder (trl.output_dir) or one of its checkpoints")
    return best[1], best[2]
