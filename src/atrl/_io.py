"""Filesystem helpers shared by the commands: writable folders, and text and YAML read with errors that name the file
and the line."""

from __future__ import annotations

import os
from pathlib import Path

import yaml


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


def read_text(path: str | os.PathLike, what: str = "") -> str:
    """The UTF-8 text of `path`; a byte that is not UTF-8 is an error naming the file, its line and column."""
    p = Path(path)
    data = p.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        label = f"{what} " if what else ""
        raise ValueError(f"{label}{p}:{line}:{column}: byte 0x{data[err.start]:02x} is not UTF-8 text; save the file "
                         "as UTF-8") from None


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (plain YAML keeps the last, silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark,
                    f"the key {key!r} is given twice (first on line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _StrictLoader.construct_mapping)


def read_yaml(path: str | os.PathLike, what: str = "") -> object:
    """`path` parsed as plain YAML: a syntax error, a duplicate key or a Python tag is an error naming the file and
    the line (one line, no traceback); an empty file gives None."""
    p = Path(path)
    text = read_text(p, what)
    label = f"{what} " if what else ""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no Python objects
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(p)
        problem = err.problem or err.context or "not valid YAML"
        if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:
            problem += " (recipes are plain YAML: no Python objects)"
        raise ValueError(f"{label}{where}: {problem}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"{label}{p}: not valid YAML ({err})") from None
