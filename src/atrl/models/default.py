"""Where the embedded default base model lives (the warm-started tiny Qwen2.5-VL of `atrl demo`).

Resolution order: the folder named by $ATRL_DEFAULT_MODEL; the cached build under $ATRL_CACHE (default
~/.cache/atrl/default-base). None when neither exists: callers then build a fresh random tiny model.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("ATRL_CACHE", Path.home() / ".cache" / "atrl"))


def default_base_model() -> Path | None:
    env = os.environ.get("ATRL_DEFAULT_MODEL")
    if env:
        path = Path(env)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"$ATRL_DEFAULT_MODEL={env!r} is not a model folder (no config.json)")
        return path
    cached = cache_dir() / "default-base"
    return cached if (cached / "config.json").is_file() else None
