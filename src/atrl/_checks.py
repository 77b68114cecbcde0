"""Checks of user-written mappings (YAML recipe sections, knob tables) against the dataclass they configure."""

from __future__ import annotations

from dataclasses import fields
from typing import Any


def check_keys(values: Any, cls: type, where: str, exclude: tuple[str, ...] = ()) -> None:
    """Raise a ValueError naming `where` if `values` is not a mapping or has keys that `cls` has no field for."""
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    known = {f.name for f in fields(cls)} - set(exclude)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where} has unknown keys {unknown}; known: {sorted(known)}")
