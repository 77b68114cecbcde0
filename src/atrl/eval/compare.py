"""Checkpoints side by side on the same questions: accuracy overall and by category, and whether a difference is
more than the luck of which questions were asked.

Each model after the first is compared with the first (the baseline) question by question:

- the difference in accuracy, with a 95% paired bootstrap interval (questions resampled with replacement, the
  same resample for both models, so that question difficulty cancels out);
- for greedy answers (one per question), McNemar's exact test: of the questions exactly one model got right,
  is the split further from even than chance would make it (two-sided binomial p-value)?
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .score import EvalResult


@dataclass
class Difference:
    """A model against the baseline over the same questions."""

    accuracy_difference: float  # model - baseline
    ci_low: float  # 95% paired bootstrap interval of the difference
    ci_high: float
    only_model_right: int  # questions (greedy: answers) the model got right and the baseline did not
    only_baseline_right: int
    mcnemar_p: float | None  # exact two-sided p-value; None with several samples per question


@dataclass
class Comparison:
    labels: list[str]  # the baseline first
    n: int  # questions
    samples: int  # answers per question
    accuracy: dict[str, float]
    by_category: dict[str, dict[str, float]]  # category -> label -> accuracy, and "n"
    differences: dict[str, Difference]  # label (not the baseline) -> against the baseline
    pass_at_k: dict[str, dict[int, float]] = field(default_factory=dict)  # label -> k -> pass@k (several samples)
    accuracy_ci: dict[str, list[float]] = field(default_factory=dict)  # label -> 95% bootstrap interval (low, high)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    def to_markdown(self, title: str = "Comparison") -> str:
        base = self.labels[0]
        lines = [f"# {title}", "", f"{self.n} questions, {self.samples} answer(s) each; baseline: `{base}`.", "",
                 ("| model | accuracy | against the baseline | 95% interval | only this right / only baseline right "
                  "| McNemar p |"), "|---|---|---|---|---|---|",
                 f"| `{base}` | {100 * self.accuracy[base]:.1f}% | | | | |"]
        for label in self.labels[1:]:
            d = self.differences[label]
            p = "n/a (sampled)" if d.mcnemar_p is None else f"{d.mcnemar_p:.3g}"
            lines.append(f"| `{label}` | {100 * self.accuracy[label]:.1f}% | {100 * d.accuracy_difference:+.1f} "
                         f"points | [{100 * d.ci_low:+.1f}, {100 * d.ci_high:+.1f}] | {d.only_model_right} / "
                         f"{d.only_baseline_right} | {p} |")
        if self.pass_at_k:
            ks = list(self.pass_at_k[base])
            lines += ["", "pass@k (at least one of k answers right; unbiased estimate from the samples):", "",
                      "| model | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
            lines += [f"| `{x}` | " + " | ".join(f"{100 * self.pass_at_k[x][k]:.1f}%" for k in ks) + " |"
                      for x in self.labels]
        lines += ["", "By category:", "", "| category | n | " + " | ".join(f"`{x}`" for x in self.labels) + " |",
                  "|---|---|" + "---|" * len(self.labels)]
        for cat, row in sorted(self.by_category.items()):
            lines.append(f"| {cat} | {int(row['n'])} | " + " | ".join(f"{100 * row[x]:.1f}%" for x in self.labels)
                         + " |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, title: str = "Comparison") -> tuple[Path, Path]:
        out = Path(out_dir)
        (out / "compare.json").write_text(self.to_json())
        (out / "compare.md").write_text(self.to_markdown(title))
        return out / "compare.json", out / "compare.md"


def checkpoint_steps(paths: list[str]) -> list[int] | None:
    """The steps N when every path is a `checkpoint-N` folder of one run, else None."""
    found = [re.fullmatch(r"checkpoint-(\d+)", Path(p).name) for p in paths]
    if not all(found) or len({Path(p).resolve().parent for p in paths}) != 1:
        return None
    return [int(m.group(1)) for m in found]


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: P(a split at least this uneven | fair coin)."""
    m = only_a + only_b
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, i) for i in range(min(only_a, only_b) + 1)) / 2.0 ** m
    return min(1.0, 2.0 * tail)


def per_question(result: EvalResult, samples: int) -> tuple[np.ndarray, list[str]]:
    """(n,) share of each question's answers that were right, and each question's category."""
    correct = np.array([r["correct"] for r in result.rows], dtype=float)
    if correct.size % samples:
        raise ValueError(f"{correct.size} scored answers is not a multiple of {samples} samples per question")
    return correct.reshape(-1, samples).mean(1), [r["category"] for r in result.rows[::samples]]


def compare_results(results: dict[str, EvalResult], samples: int = 1, resamples: int = 2000,
                    seed: int = 0) -> Comparison:
    """Compare models scored on the same questions in the same order (`evaluate` on the same rows); the first
    entry of `results` is the baseline."""
    if len(results) < 2:
        raise ValueError("compare_results: two models or more")
    labels = list(results)
    scores, categories = {}, None
    for label, result in results.items():
        scores[label], cats = per_question(result, samples)
        if categories is None:
            categories = cats
        elif cats != categories:
            raise ValueError(f"{label!r} was scored on other questions than {labels[0]!r}")
    n = len(categories)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n, size=(resamples, n))  # one set of resamples, shared by every model
    base = scores[labels[0]]
    differences = {}
    for label in labels[1:]:
        diff = scores[label] - base
        boot = diff[picks].mean(1)
        only_model, only_base = int((diff > 0).sum()), int((diff < 0).sum())
        differences[label] = Difference(float(diff.mean()), float(np.percentile(boot, 2.5)),
                                        float(np.percentile(boot, 97.5)), only_model, only_base,
                                        mcnemar_exact(only_model, only_base) if samples == 1 else None)
    by_category: dict[str, dict[str, float]] = {}
    cats = np.array(categories)
    for cat in sorted(set(categories)):
        mask = cats == cat
        by_category[cat] = {"n": int(mask.sum()), **{x: float(scores[x][mask].mean()) for x in labels}}
    passes = {x: dict(results[x].pass_at_k) for x in labels} if all(r.pass_at_k for r in results.values()) else {}
    intervals = {x: [float(np.percentile(scores[x][picks].mean(1), q)) for q in (2.5, 97.5)] for x in labels}
    return Comparison(labels, n, samples, {x: float(scores[x].mean()) for x in labels}, by_category, differences,
                      passes, intervals)
