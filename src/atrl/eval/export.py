"""Prediction files that other evaluation kits read, written beside `eval.json` for MathVista rows.

- `mathvista_predictions.json`: the output format of MathVista's own pipeline (a JSON object keyed by pid, each
  entry with `question`, `query`, `choices`, `question_type`, `answer_type`, `precision`, `answer`, `metadata`,
  `response`, `extraction`, and the `prediction` / `true_false` its `calculate_score.py` fills in). Scored there
  with `python evaluation/calculate_score.py --output_dir DIR --output_file mathvista_predictions.json
  --score_file scores.json` (that script reads the ground truth from the hub data set); its `extract_answer.py`
  can re-extract `extraction` from `response` with a language model first.
- `vlmevalkit_MathVista.tsv`: one row per question with the columns VLMEvalKit's MathVista evaluator reads
  (`index`, `question`, `answer`, `answer_option`, `choices`, `question_type`, `answer_type`, `precision`,
  `task`, `skills`, `category`, `prediction`: the raw response, which VLMEvalKit's judge extracts from). In
  VLMEvalKit: `from vlmeval.dataset.utils.mathvista import MathVista_eval; MathVista_eval(path, model=JUDGE)`.

With several sampled answers per question, the files hold each question's first sample.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .score import EvalResult

TSV_COLUMNS = ("index", "question", "answer", "answer_option", "choices", "question_type", "answer_type",
               "precision", "task", "skills", "category", "prediction")


def _first_samples(result: EvalResult) -> list[dict]:
    return [row for i, row in enumerate(result.rows) if i % result.samples == 0 and row.get("scoring") == "mathvista"]


def mathvista_entries(result: EvalResult) -> dict[str, dict]:
    """The MathVista pipeline's output entries, by pid."""
    entries = {}
    for row in _first_samples(result):
        meta = {k: v for k, v in row["metadata"].items() if k not in ("question_type", "answer_type")}
        entries[str(row["uid"])] = {
            "question": row["question"], "query": row["question"], "choices": row["choices"] or None,
            "question_type": row["question_type"], "answer_type": row["answer_type"],
            "precision": row["precision"], "answer": row["answer"], "metadata": meta, "response": row["response"],
            "extraction": "" if row["extracted"] is None else row["extracted"], "prediction": row["prediction"],
            "true_false": row["correct_mathvista"]}
    return entries


def _letter(answer: str, choices: list[str]) -> str:
    return chr(ord("A") + choices.index(answer)) if answer in choices else ""


def write_mathvista_predictions(result: EvalResult, out: Path) -> list[Path]:
    """Both files in `out` when the result has MathVista rows; nothing otherwise. Returns the paths written."""
    entries = mathvista_entries(result)
    if not entries:
        return []
    official = out / "mathvista_predictions.json"
    official.write_text(json.dumps(entries, indent=1, ensure_ascii=False))
    tsv = out / "vlmevalkit_MathVista.tsv"
    with tsv.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, delimiter="\t", lineterminator="\n")
        writer.writerow(TSV_COLUMNS)
        for pid, e in entries.items():
            meta, choices = e["metadata"], e["choices"] or []
            writer.writerow([pid, e["question"], e["answer"], _letter(str(e["answer"]), choices),
                             repr(list(choices)), e["question_type"], e["answer_type"],
                             "" if e["precision"] is None else e["precision"], meta.get("task", ""),
                             repr(list(meta.get("skills") or [])), meta.get("category", ""), e["response"]])
    return [official, tsv]
