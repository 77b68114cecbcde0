"""Filesystem helpers shared by every command that writes a folder."""

from __future__ import annotations

import os
from pathlib import Path


def ensure_writable_dir(path: str | os.PathLike, *, argument: str) -> Path:
    """Create `path` if needed and check that files can be written there; raise naming `argument`."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".atrl-write-check-{os.getpid()}"  # one per process: ranks of a launch share the folder
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise ValueError(f"{argument}: cannot write to {str(out)!r} ({err.strerror or err})") from err
    return out
