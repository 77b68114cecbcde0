"""Verifiable rewards: answer extraction, equivalence by answer type, format and overlong rewards.

Usable standalone (`extract_answer`, `is_equivalent`) and as TRL reward functions with the signature
`f(prompts, completions, **columns) -> list[float]` (`accuracy_reward`, `format_reward`,
`make_overlong_penalty(...)`), reading the data set's `answer`, `answer_type`, `choices`, `precision`
columns when present.

Answer extraction, in this order (the first rule that finds something wins):
    1. the last `<answer>...</answer>` block;
    2. the last `\\boxed{...}` (balanced braces);
    3. the last "the answer is ..." / "answer: ..." phrase, up to the end of its line or sentence;
    4. last resort: the last line of the response that has any text, with a trailing period dropped.

Equivalence by answer type:
    integer, float, number  numeric: fractions, decimals, percents ("50%" equals 50 or 0.5), thousands
                            separators, units and LaTeX (\\frac, \\dfrac) are read; with `precision` (MathVista:
                            decimal places) both sides are rounded to it, else a relative tolerance (1e-6).
    choice (multi_choice)   letter ("B", "(B)", "B.") or option text, against a gold letter or option text.
    math (expression)       math-verify (symbolic), in bounded time.
    list                    comma-separated items, element by element (numeric where both parse).
    text (free_form)        normalised text: case, surrounding punctuation, articles and spaces ignored.

Model output is never passed to `eval`. Every math-verify call is bounded: in the main thread by
math-verify's own alarm, elsewhere (signal alarms only work in the main thread) in a worker process that is
killed when it runs past the bound.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import threading
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, Sequence

from .._workers import exit_with_parent, stop_signals_blocked
from ..data.answers import ANSWER_TYPES


class _ToAtrlLog(logging.Handler):
    """math-verify's warnings ("Timeout during comparison") go to atrl's log, said as what they mean for the reward,
    not to the terminal through Python's last-resort handler."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger("atrl").log(record.levelno, "math-verify: %s (that answer is judged wrong)",
                                      record.getMessage())


_MATH_VERIFY_LOG = logging.getLogger("math_verify")
if not any(isinstance(h, _ToAtrlLog) for h in _MATH_VERIFY_LOG.handlers):
    _MATH_VERIFY_LOG.addHandler(_ToAtrlLog())
    _MATH_VERIFY_LOG.propagate = False
MAX_ANSWER_CHARS = 2000  # longer extracted answers are judged wrong without parsing
MATH_TIMEOUT_S = 2

# --------------------------------------------------------------------------------------------------
# extraction

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_ANSWER_PHRASE = re.compile(r"(?:the\s+(?:final\s+)?answer\s+is|answer\s*[:：])\s*(.+?)(?:\n|$|\.(?=\s|$))",
                            re.I)


def _last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` whose braces close (an unbalanced later one is passed over for an
    earlier one), in one pass over the text: linear in its length whatever the nesting (a model's output may
    hold thousands of unclosed `\\boxed{`)."""
    starts = [m.start() for m in re.finditer(r"\\boxed", text)]
    if not starts:
        return None
    closes: dict[int, int] = {}  # opening brace -> its closing brace
    stack: list[int] = []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            closes[stack.pop()] = m.start()
    braces = [m.start() for m in re.finditer(r"\{", text)]
    openers, k = [], 0
    for s in starts:  # the first "{" at or after each \boxed (two pointers: both lists are sorted)
        while k < len(braces) and braces[k] < s:
            k += 1
        openers.append(braces[k] if k < len(braces) else None)
    for opener in reversed(openers):
        if opener is None:
            return None
        if opener in closes:
            return text[opener + 1:closes[opener]]
    return None


def _unboxed(gold: str) -> str:
    """A reference answer written as `\\boxed{...}` (as some RL data sets store them) is its content; the
    extracted answers it is compared with have lost theirs."""
    if gold.startswith("\\boxed{") and gold.endswith("}"):
        inner = _last_boxed(gold)
        if inner is not None and len(inner) == len(gold) - len("\\boxed{}"):
            return inner.strip()
    return gold


def extract_answer(text: str) -> tuple[str | None, str]:
    """(answer, rule) where rule is "tag", "boxed", "phrase", "last_line" or "none"."""
    if not isinstance(text, str):
        raise TypeError(f"extract_answer expects a string, got {type(text).__name__}")
    tags = _ANSWER_TAG.findall(text)
    if tags:
        inner = tags[-1].strip()
        boxed = _last_boxed(inner)
        return (boxed.strip() if boxed is not None else inner), "tag"
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip(), "boxed"
    phrases = _ANSWER_PHRASE.findall(text)
    if phrases:
        return phrases[-1].strip().rstrip("."), "phrase"
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if lines:
        return lines[-1].rstrip("."), "last_line"
    return None, "none"


def completion_text(completion: Any) -> str:
    """TRL passes a string (standard format) or a list of messages (conversational format)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):  # multimodal content parts
            return "".join(part.get("text", "") for part in content if isinstance(part, dict))
        return str(content)
    raise TypeError(f"unexpected completion type {type(completion).__name__}")


# --------------------------------------------------------------------------------------------------
# numbers and text

_UNIT_TAIL = re.compile(r"^\s*(?:[a-zA-Z°%$€£]+\^?\d?|\\(?:circ|%|text\{[^}]*\}|mathrm\{[^}]*\}))*\s*$")
_NUMBER = re.compile(r"[-+−]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+−]?\.\d+")


def parse_number(text: str) -> tuple[float, bool] | None:
    """(value, is_percent) for a string that states one number, else None.

    Reads "3", "-2.50", "1,000", "3/4", "\\frac{3}{4}", "50%", "12 cm", "$5", "1.5e3". A string with two
    numbers that are not a fraction ("3 or 4") is not one number.
    """
    s = text.strip().replace("−", "-").replace("\\!", "").replace("\\,", "").replace("\\left", "")
    s = s.replace("\\right", "").strip("$ ").replace("\\$", "").strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    frac = re.fullmatch(r"(-?)\\[dt]?frac\{\s*(-?\d+(?:\.\d+)?)\s*\}\{\s*(-?\d+(?:\.\d+)?)\s*\}(.*)", s)
    if frac is None:
        frac = re.fullmatch(r"(-?)\(?\s*(-?\d+(?:\.\d+)?)\s*/\s*(-?\d+(?:\.\d+)?)\s*\)?(.*)", s)
    if frac is not None and _UNIT_TAIL.match(frac.group(4)):
        num, den = float(frac.group(2)), float(frac.group(3))
        if den == 0:
            return None
        value = num / den
        return (-value if frac.group(1) else value), "%" in frac.group(4)
    m = _NUMBER.match(s.lstrip("$€£"))
    if m is None:
        return None
    rest = s.lstrip("$€£")[m.end():]
    if not _UNIT_TAIL.match(rest):
        return None
    try:
        value = float(m.group(0).replace(",", "").replace("−", "-"))
    except ValueError:
        return None
    if not math.isfinite(value):
        return None
    return value, "%" in rest or "\\%" in rest


def sole_number(text: str) -> str | None:
    """The one number a phrase states among words ("There are 12 apples", "so the total is 12"), or None where it
    states none or several ("3 or 4" is not an answer)."""
    found = _NUMBER.findall(text.replace("−", "-"))
    return found[0] if len(found) == 1 else None


def numbers_equal(pred: str, gold: str, precision: float | int | None = None, rel_tol: float = 1e-6) -> bool:
    """Numeric equality; `precision` = decimal places both sides are rounded to (MathVista's rule)."""
    p, g = parse_number(pred), parse_number(gold)
    if p is None or g is None:
        return False
    gold_v = g[0]
    candidates = [p[0]] + ([p[0] / 100] if p[1] and not g[1] else []) + ([p[0] * 100] if g[1] and not p[1] else [])
    for value in candidates:
        if precision is not None and not (isinstance(precision, float) and math.isnan(precision)):
            digits = int(precision)
            if round(value, digits) == round(gold_v, digits):
                return True
        elif math.isclose(value, gold_v, rel_tol=rel_tol, abs_tol=1e-9):
            return True
    return False


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_text(text: str) -> str:
    s = text.strip().lower()
    s = re.sub(r"\\text\{(.*?)\}", r"\1", s)
    s = _ARTICLES.sub(" ", s)
    s = re.sub(r"[\s]+", " ", s)
    return s.strip(" .,;:!?\"'`()[]{}")


# --------------------------------------------------------------------------------------------------
# math-verify, bounded


def _math_verify_inline(pred: str, gold: str, timeout: int) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(_as_latex(gold), parsing_timeout=timeout)
    pred_parsed = parse(_as_latex(pred), parsing_timeout=timeout)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout))


def _as_latex(s: str) -> str:
    s = s.strip()
    return s if s.startswith("$") or "\\boxed" in s else f"${s}$"


_MATH_POOL: ProcessPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _math_pool() -> ProcessPoolExecutor:
    global _MATH_POOL
    with _POOL_LOCK:
        if _MATH_POOL is None:
            import multiprocessing

            _MATH_POOL = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                             initializer=exit_with_parent)
        return _MATH_POOL


def _reset_math_pool() -> None:
    global _MATH_POOL
    with _POOL_LOCK:
        if _MATH_POOL is not None:
            for proc in list(getattr(_MATH_POOL, "_processes", {}).values()):
                proc.kill()
            _MATH_POOL.shutdown(wait=False, cancel_futures=True)
            _MATH_POOL = None


def _bounded(fn: Callable, *args, timeout: int = MATH_TIMEOUT_S, default: Any = False):
    """`fn(*args, timeout)` within about 2 x `timeout` seconds: inline under SIGALRM in the main thread, else in a
    worker process that is killed past the limit (`default` then)."""
    in_main = threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGALRM")
    if in_main:
        return fn(*args, timeout)
    with stop_signals_blocked():  # the worker this may start ignores stop signals before one can kill it
        future = _math_pool().submit(fn, *args, timeout)
    try:
        return future.result(timeout=2 * timeout + 30)  # +30 s: a cold worker imports sympy first
    except FutureTimeout:
        _reset_math_pool()
        return default


def math_equal(pred: str, gold: str, timeout: int = MATH_TIMEOUT_S) -> bool:
    """Symbolic equality through math-verify, returning within about 2 x `timeout` seconds (False on timeout)."""
    if len(pred) > MAX_ANSWER_CHARS:
        return False
    return _bounded(_math_verify_inline, pred, gold, timeout=timeout, default=False)


def _math_value_inline(pred: str, timeout: int) -> float | None:
    from math_verify import parse

    parsed = parse(_as_latex(pred), parsing_timeout=timeout)
    for item in parsed or []:
        try:
            value = complex(item.evalf()) if hasattr(item, "evalf") else None
        except (TypeError, ValueError, AttributeError):
            continue
        if value is not None and value.imag == 0 and math.isfinite(value.real):
            return value.real
    return None


def math_value(pred: str, timeout: int = MATH_TIMEOUT_S) -> float | None:
    """The number an expression stands for ("2\\sqrt{3}", "3\\pi/2"), through math-verify, within about 2 x
    `timeout` seconds; None where it is no number."""
    if len(pred) > MAX_ANSWER_CHARS:
        return None
    return _bounded(_math_value_inline, pred, timeout=timeout, default=None)


# --------------------------------------------------------------------------------------------------
# equivalence


def _choice_index(answer: str, choices: Sequence[str]) -> int | None:
    s = answer.strip()
    m = re.fullmatch(r"\(?([A-Za-z])\)?[.:)]?", s) or re.match(r"\(?([A-Z])\)[.:]?\s+\S", s) \
        or re.match(r"([A-Z])[.:]\s+\S", s)
    if m is not None:
        k = ord(m.group(1).upper()) - ord("A")
        if 0 <= k < len(choices):
            return k
    norm = normalise_text(s)
    for k, choice in enumerate(choices):
        if normalise_text(str(choice)) == norm:
            return k
    for k, choice in enumerate(choices):
        if parse_number(str(choice)) is not None and numbers_equal(s, str(choice)):
            return k
    return None


def _split_list(s: str) -> list[str]:
    s = s.strip().strip("[](){}")
    return [part.strip() for part in re.split(r"[,;]", s) if part.strip()]


def _item_equal(pred: str, gold: str, precision) -> bool:
    if parse_number(gold) is not None and parse_number(pred) is not None:
        return numbers_equal(pred, gold, precision)
    return normalise_text(pred) == normalise_text(gold)


def is_equivalent(pred: str | None, gold: str, answer_type: str = "text", *, choices: Sequence[str] | None = None,
                  precision: float | int | None = None) -> bool:
    """Whether the extracted answer `pred` matches `gold` under `answer_type` (see the module docstring)."""
    if answer_type not in ANSWER_TYPES:
        raise ValueError(f"unknown answer_type {answer_type!r}; choose from {ANSWER_TYPES}")
    if pred is None:
        return False
    pred, gold = str(pred).strip(), _unboxed(str(gold).strip())
    if not pred or len(pred) > MAX_ANSWER_CHARS:
        return False
    if answer_type in ("integer", "float", "number"):
        if numbers_equal(pred, gold, precision):
            return True
        if parse_number(pred) is not None:
            return False
        sole = sole_number(pred)  # a number among words
        if sole is not None and re.search(r"[a-zA-Z]{2,}", pred) and not re.search(r"\\[a-zA-Z]", pred):
            return numbers_equal(sole, gold, precision)
        # an expression such as \sqrt{4}, 2^3 or 2\sqrt{3} still counts when it equals the number, at the
        # answer's precision where it has one
        if precision is not None and not (isinstance(precision, float) and math.isnan(precision)):
            value = math_value(pred)
            return value is not None and numbers_equal(repr(value), gold, precision)
        return math_equal(pred, gold)
    if answer_type in ("choice", "multi_choice"):
        if not choices:
            return normalise_text(pred) == normalise_text(gold)
        gi, pi = _choice_index(gold, choices), _choice_index(pred, choices)
        return gi is not None and gi == pi
    if answer_type in ("math", "expression"):
        return numbers_equal(pred, gold, precision) or math_equal(pred, gold)
    if answer_type == "list":
        p, g = _split_list(pred), _split_list(gold)
        return len(p) == len(g) and all(_item_equal(a, b, precision) for a, b in zip(p, g))
    return normalise_text(pred) == normalise_text(gold)


# --------------------------------------------------------------------------------------------------
# TRL reward functions

_FORMAT = re.compile(r"^\s*<think>.*?</think>\s*<answer>.*?</answer>\s*$", re.S)


def _column(kwargs: dict, name: str, n: int, default=None) -> list:
    values = kwargs.get(name)
    return list(values) if values is not None else [default] * n


def accuracy_reward(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 when the extracted answer matches the `answer` column (typed by `answer_type`, default "text")."""
    if "answer" not in columns:
        raise ValueError("accuracy_reward needs an 'answer' column in the data set")
    n = len(completions)
    answers = _column(columns, "answer", n)
    types = _column(columns, "answer_type", n, "text")
    # MathVista's own columns: a multiple-choice question's answer_type is "text", its question_type says choice
    qtypes = _column(columns, "question_type", n)
    types = ["choice" if q == "multi_choice" else t for t, q in zip(types, qtypes)]
    choices = _column(columns, "choices", n)
    precision = _column(columns, "precision", n)
    out = []
    for completion, gold, kind, opts, prec in zip(completions, answers, types, choices, precision):
        pred, _ = extract_answer(completion_text(completion))
        out.append(float(is_equivalent(pred, gold, kind or "text", choices=opts or None, precision=prec)))
    return out


def format_reward(prompts: list, completions: list, **columns) -> list[float]:
    """1.0 when the response is `<think>...</think><answer>...</answer>` and nothing else."""
    return [float(bool(_FORMAT.match(completion_text(c)))) for c in completions]


def overlong_penalty(length: int, max_length: int, cache: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - cache, then linear down to -1 at max_length."""
    if cache <= 0 or cache > max_length:
        raise ValueError(f"need 0 < cache ({cache}) <= max_length ({max_length})")
    free = max_length - cache
    if length <= free:
        return 0.0
    if length <= max_length:
        return (free - length) / cache
    return -1.0


def make_overlong_penalty(max_length: int, cache: int) -> Callable[..., list[float]]:
    """A TRL reward function applying `overlong_penalty` to each completion's token count."""
    overlong_penalty(0, max_length, cache)  # validate now, not at the first step

    def overlong_reward(prompts: list, completions: list, completion_ids: list | None = None, **columns):
        if completion_ids is None:
            raise ValueError("overlong_reward needs completion_ids (TRL passes them to reward functions)")
        return [overlong_penalty(len(ids), max_length, cache) for ids in completion_ids]

    overlong_reward.__name__ = "overlong_reward"
    return overlong_reward
