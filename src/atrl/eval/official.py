"""Benchmarks' published scoring rules, so that a reported accuracy is comparable with published numbers.

**MathVista** (Lu et al., ICLR 2024), the rule of `evaluation/calculate_score.py` in the MathVista repository,
written here from its description. An extracted answer is normalised by the question's type and then compared
with the row's answer as a string, exactly:

- `multi_choice`: the extraction as text, stripped; a letter in parentheses anywhere in it ("(b) five") is taken,
  upper-cased; a letter A, B, ... within the number of choices selects that choice; anything else becomes the
  choice nearest to it by Levenshtein distance (the first of equally near ones). So free text always maps to
  some choice, and an empty extraction to the shortest one.
- `free_form` with answer type `integer`: `str(int(float(x)))` (so "5.6" counts as 5, a truncation); `float`:
  `str(round(float(x), precision))`; `list`: `str(x)`. Text that is not a number is wrong ("1,000", "25%",
  "14.5 cm", a Unicode minus), and "[1,2,3]" is not "[1, 2, 3]".
- A free-form answer type the rule does not name (MathVista has none): the extraction itself. A missing
  extraction is the empty string, as the official pipeline records a failed extraction.

The official pipeline extracts the answer from the response with a language model (GPT-4 in the paper); atrl
cannot call one offline and extracts by rule (`atrl.rl.rewards.extract_answer`: answer tags, `\\boxed{}`,
"the answer is", the last line). `load_extractions` reads extractions made by any other extractor (MathVista's own
`extract_answer.py` output included), and `atrl eval --extractions FILE` rescores a run with them.

**Other benchmarks.** Geometry3K's published metric is choice accuracy over its four options (Inter-GPS); the
Geometry3K / ViRL39K files atrl reads carry the answer without the options, so they are scored by the reward's
rules, and the report says so.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Mapping

from Levenshtein import distance

SCORINGS = ("auto", "mathvista", "reward")

_LETTER_IN_PARENS = re.compile(r"\(([a-zA-Z])\)")


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def mathvista_normalize(extraction: Any, choices: list[str] | None, question_type: str, answer_type: str | None,
                        precision: float | None) -> str | None:
    """An extraction normalised by MathVista's rule (see the module docstring); None where the rule gives no
    prediction (not a number for a numeric answer)."""
    if question_type == "multi_choice":
        if not choices:
            raise ValueError("a multi_choice question needs its choices")
        text = "" if extraction is None else str(extraction).strip()
        letter = _LETTER_IN_PARENS.findall(text)
        if letter:
            text = letter[0].upper()
        letters = [chr(ord("A") + i) for i in range(len(choices))]
        if text in letters:
            return choices[letters.index(text)]
        distances = [distance(text, choice) for choice in choices]
        return choices[distances.index(min(distances))]
    text = "" if extraction is None else extraction
    if answer_type == "float" and _missing(precision):
        raise ValueError("a float answer needs its precision")
    try:
        if answer_type == "integer":
            return str(int(float(text)))
        if answer_type == "float":
            return str(round(float(text), int(precision)))
    except (TypeError, ValueError, OverflowError):  # not a number: no prediction
        return None
    return str(text)


def mathvista_fields(row: Mapping[str, Any]) -> dict[str, Any] | None:
    """The fields MathVista's rule reads, from a row as `atrl.data.formats.to_trl_dataset` makes it (question type
    and MathVista's own answer type in its metadata), or None for a row that is not MathVista's."""
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = None
    if not isinstance(meta, dict) or "question_type" not in meta:
        return None
    qtype = meta["question_type"]
    answer_type = meta.get("answer_type") or row.get("answer_type")
    return {"question_type": qtype, "answer_type": answer_type, "choices": list(row.get("choices") or []),
            "precision": row.get("precision"), "metadata": meta}


def check_mathvista_row(row: Mapping[str, Any], where: str, fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The row's MathVista fields (`fields`: already read by `mathvista_fields`); a clear error naming the row and
    the field when one the rule needs is missing."""
    fields = mathvista_fields(row) if fields is None else fields
    if fields is None:
        raise ValueError(f"{where}: --scoring mathvista needs MathVista's fields (question_type, answer_type, "
                         "choices, precision); this row has no question_type. Use --scoring reward for this data")
    if fields["question_type"] not in ("multi_choice", "free_form"):
        raise ValueError(f"{where}: question_type {fields['question_type']!r} is neither multi_choice nor free_form")
    if fields["question_type"] == "multi_choice" and not fields["choices"]:
        raise ValueError(f"{where}: a multi_choice question without choices")
    if fields["question_type"] == "free_form" and fields["answer_type"] == "float" and _missing(fields["precision"]):
        raise ValueError(f"{where}: a float answer without its precision")
    return fields


def mathvista_correct(extraction: str | None, answer: Any, fields: Mapping[str, Any]) -> tuple[str | None, bool]:
    """(the normalised prediction, whether it equals the answer as a string)."""
    prediction = mathvista_normalize(extraction, fields["choices"], fields["question_type"], fields["answer_type"],
                                     fields["precision"])
    return prediction, prediction is not None and prediction == str(answer)


def load_extractions(path: str | Path) -> dict[str, str]:
    """Extracted answers by question id from `path`: a JSON object `{pid: extraction}` or `{pid: {"extraction":
    ...}}` (MathVista's own output files), or JSONL with one `{"pid" (or "uid"): ..., "extraction": ...}` a
    line. Errors name the file and the entry."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--extractions {str(p)!r} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"--extractions {p}: not UTF-8 text (byte {err.start})") from None
    out: dict[str, str] = {}
    if p.suffix == ".jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"--extractions {p}, line {n}: not JSON ({err.msg})") from None
            key = entry.get("pid", entry.get("uid")) if isinstance(entry, dict) else None
            if key is None or "extraction" not in entry:
                raise ValueError(f"--extractions {p}, line {n}: needs 'pid' (or 'uid') and 'extraction'")
            out[str(key)] = "" if entry["extraction"] is None else str(entry["extraction"])
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--extractions {p}, line {err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--extractions {p}: a JSON object keyed by question id (or JSONL), not a "
                         f"{type(data).__name__}")
    for key, value in data.items():
        if isinstance(value, dict):
            if "extraction" not in value:
                raise ValueError(f"--extractions {p}, entry {key!r}: no 'extraction' field")
            value = value["extraction"]
        out[str(key)] = "" if value is None else str(value)
    return out
