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


def _matches(value: Any, hint: Any) -> bool | None:
    """Whether `value` fits the type `hint`; None where the hint is not one this checks (an enum, a class)."""
    import types
    import typing

    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        answers = [_matches(value, h) for h in typing.get_args(hint)]
        if any(a is True for a in answers):
            return True
        return None if any(a is None for a in answers) else False
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return all(_matches(v, args[0]) is not False for v in value) if args else True
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return None


_KIND = {bool: "true or false", int: "a whole number", float: "a number", str: "text", list: "a list",
         tuple: "a list", dict: "a mapping"}


def _describe(hint: Any) -> str:
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(dict.fromkeys(_describe(h) for h in typing.get_args(hint)))
    if hint is type(None):
        return "null"
    if origin in (list, tuple):
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        return f"a list of {_describe(args[0]).replace('a ', '', 1)}s" if args else "a list"
    return _KIND.get(origin or hint, getattr(hint, "__name__", str(hint)))


def check_types(values: dict, cls: type, where: str) -> dict:
    """`values` with numbers written as text read as numbers where `cls`'s field takes a number and no text (YAML
    1.1 reads `5e-5` as a string); a ValueError naming `where` and the key for a value whose type does not fit the
    field (a word where a number is wanted, a single value where a list is), before `cls` is built from it."""
    import typing

    hints = typing.get_type_hints(cls)
    out = dict(values)
    for key, value in values.items():
        if key not in hints:
            continue
        hint = hints[key]
        if isinstance(value, str) and _matches(value, hint) is False:
            for number in (int, float):
                try:
                    converted = number(value)
                except ValueError:
                    continue
                if _matches(converted, hint):
                    out[key] = value = converted
                    break
        if _matches(value, hint) is False:
            raise ValueError(f"{where}.{key}={value!r}: use {_describe(hint)}")
    return out
