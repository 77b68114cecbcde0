"""Responses kept on disk as they are generated, so that an interrupted `atrl eval` continues where it stopped.

A benchmark's evaluation is long (MathVista's 1,000 questions at 1,024 new tokens: about an hour on one GPU with
`generate`). `<out>/responses/` holds `settings.json` (what the responses depend on: the weights' fingerprint,
the generation settings) and one `part-<rank>.jsonl` per process, a line per answered row:
`{"key", "responses", "cut"}`. A row is known by a hash of its question, answer and id (its `key`), not by its
position, so `--n 100` then `--n 1000` answers only the 900 new rows, and a kill mid-line loses that line only.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

_IMAGE_COLUMNS = ("image", "images", "videos")


def label_rows(rows: Sequence[dict]) -> list[dict]:
    """The rows without their images (what scoring and the row keys read): a `datasets.Dataset` drops its image
    columns without decoding them; a list of dicts is copied without those keys."""
    if hasattr(rows, "remove_columns"):
        return rows.remove_columns([c for c in _IMAGE_COLUMNS if c in rows.column_names]).to_list()
    return [{k: v for k, v in r.items() if k not in _IMAGE_COLUMNS} for r in rows]


def row_key(labels: dict) -> str:
    """A row's identity for the log: its prompt, answer, id and every other label field, images aside."""
    return hashlib.sha256(json.dumps(labels, sort_keys=True, default=str).encode()).hexdigest()[:24]


def weights_fingerprint(model: torch.nn.Module, per_tensor: int = 4096) -> str:
    """A hash of the model's weights as loaded: every tensor's name, shape, dtype and the bytes of up to
    `per_tensor` evenly spaced entries. Cheap on any device (no copy of a whole tensor), and it changes when the
    checkpoint at a path is trained further or loaded in another precision."""
    digest = hashlib.sha256()
    for name, p in model.state_dict().items():
        flat = p.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // per_tensor)].contiguous()
        digest.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
        digest.update(sample.view(torch.uint8).cpu().numpy().tobytes())
    return digest.hexdigest()[:24]


class ResponseLog:
    """`<folder>/settings.json` and `part-<rank>.jsonl`; every process reads all parts, writes only its own."""

    def __init__(self, folder: str | Path, settings: dict[str, Any], rank: int = 0):
        self.folder, self.settings, self.rank = Path(folder), settings, rank

    @property
    def settings_file(self) -> Path:
        return self.folder / "settings.json"

    def discard(self) -> None:
        """Forget earlier responses (`--fresh`); one process calls it before any reads."""
        if self.folder.exists():
            shutil.rmtree(self.folder)

    def check(self) -> None:
        """Refuse responses generated under other settings: they would be scored as this model's."""
        if not self.settings_file.exists():
            return
        try:
            earlier = json.loads(self.settings_file.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{self.settings_file} cannot be read ({err}); pass --fresh to start over") from err
        changed = sorted(k for k in {*earlier, *self.settings} if earlier.get(k) != self.settings.get(k))
        if changed:
            what = ", ".join(f"{k} {earlier.get(k)!r} -> {self.settings.get(k)!r}" for k in changed)
            raise ValueError(f"{self.folder} holds responses generated with other settings ({what}); pass --fresh "
                             "to discard them, or choose another --out")

    def read(self) -> tuple[dict[str, tuple[list[str], list[bool]]], int]:
        """The responses logged so far by row key, and how many lines were cut short (a process killed while
        writing leaves at most its last line incomplete; that row is answered again). A broken line anywhere
        else is an error naming the file and line."""
        done: dict[str, tuple[list[str], list[bool]]] = {}
        partial = 0
        for part in sorted(self.folder.glob("part-*.jsonl")):
            lines = part.read_bytes().split(b"\n")  # bytes: a kill may cut a character in two
            for number, line in enumerate(lines, 1):
                if not line:
                    continue
                try:
                    entry = json.loads(line.decode("utf-8"))
                    done.setdefault(entry["key"], (list(entry["responses"]), list(entry["cut"])))
                except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
                    if number == len(lines):  # the last line, without its newline: cut by a kill
                        partial += 1
                        continue
                    raise ValueError(f"{part}, line {number}: not a response entry ({err}); pass --fresh to "
                                     "start over") from err
        return done, partial

    @property
    def part(self) -> Path:
        return self.folder / f"part-{self.rank}.jsonl"

    def start(self, main_process: bool = True) -> None:
        """After every process has read and checked: the first writes the settings; each drops its own part's
        incomplete last line (so that what it appends next starts a line of its own)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if main_process and not self.settings_file.exists():
            tmp = self.settings_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.settings, indent=1))
            tmp.replace(self.settings_file)
        if self.part.exists():
            data = self.part.read_bytes()
            if data and not data.endswith(b"\n"):
                with self.part.open("r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)

    def append(self, key: str, responses: list[str], cut: list[bool]) -> None:
        part = self.part
        text = json.dumps({"key": key, "responses": responses, "cut": cut}, ensure_ascii=False) + "\n"
        with part.open("a") as f:
            f.write(text)
            f.flush()
