"""Evaluate a VLM checkpoint on a data set: greedy answers, rule-based scoring, accuracy by category.

Rows are dicts with `prompt` (TRL conversational), `image` or `images`, `answer`, `answer_type`, optional
`choices`, `precision` and a category: `family` (synthetic tasks) or MathVista's `metadata.category`.
The answer is extracted from the response (`atrl.rl.rewards.extract_answer`, or extractions given by the user) and
scored by MathVista's official rule on MathVista rows (`atrl.eval.official`) and by the RL reward's equivalence
rules (`atrl.rl.rewards`) on every row; the report says which rule its accuracy follows and, where both apply,
how much they differ.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..rl.rewards import extract_answer, is_equivalent
from .responses import ResponseLog, label_rows, row_key


@dataclass
class EvalResult:
    accuracy: float
    n: int
    by_category: dict[str, dict[str, float]]
    rows: list[dict[str, Any]] = field(default_factory=list)  # per row: uid, category, answer, extracted, correct
    truncated: int = 0  # responses cut at max_new_tokens before they ended (`evaluate` counts them)
    samples: int = 1  # answers per question (rows holds each question's samples one after another)
    pass_at_k: dict[int, float] = field(default_factory=dict)  # with several samples: see `pass_at_k`
    scoring: str = "reward"  # the rule `correct` and `accuracy` follow (see `score_responses`)
    extraction: str = "rule-based"  # where the extracted answers came from: "rule-based" or the file given
    other_accuracy: dict[str, float] = field(default_factory=dict)  # under the other rule, where both apply
    differ: int = 0  # responses on which the two rules disagree

    @property
    def standard_error(self) -> float:
        """Standard error of `accuracy` over the questions: the spread of each question's share of right answers
        (its samples one after another in `rows`) over the square root of their number; 0 with under 2."""
        right = [float(r["correct"]) for r in self.rows]
        per_question = [sum(right[i:i + self.samples]) / self.samples for i in range(0, len(right), self.samples)]
        n = len(per_question)
        if n < 2:
            return 0.0
        mean = sum(per_question) / n
        return (sum((x - mean) ** 2 for x in per_question) / (n - 1) / n) ** 0.5

    def to_json(self) -> str:
        return json.dumps({"accuracy": self.accuracy, "standard_error": self.standard_error, "n": self.n,
                           "samples": self.samples, "scoring": self.scoring,
                           "extraction": self.extraction, "other_accuracy": self.other_accuracy,
                           "differ": self.differ, "pass_at_k": self.pass_at_k, "truncated": self.truncated,
                           "by_category": self.by_category, "rows": self.rows}, indent=1, ensure_ascii=False)

    def to_markdown(self, title: str = "Evaluation") -> str:
        each = f", {self.samples} sampled answers each" if self.samples > 1 else ""
        lines = [f"# {title}", "", (f"Overall accuracy: **{100 * self.accuracy:.1f}%** "
                                    f"({self.n // self.samples} questions{each}; standard error "
                                    f"{100 * self.standard_error:.1f} points)"), "",
                 _scoring_note(self), ""]
        if self.other_accuracy:
            lines += _differences(self)
        if self.pass_at_k:
            lines += ["pass@k (a question counts when at least one of k answers drawn from its samples is right; "
                      "unbiased estimate): " + ", ".join(f"pass@{k} {100 * v:.1f}%" for k, v in
                                                         self.pass_at_k.items()), ""]
        if self.truncated:
            lines += [(f"**{self.truncated} of {self.n} responses were cut at the token limit before they ended**: "
                       "their answers may be missing; raise --max-new-tokens."), ""]
        lines += ["| category | n | accuracy |", "|---|---|---|"]
        for cat, v in sorted(self.by_category.items()):
            lines.append(f"| {cat} | {int(v['n'])} | {100 * v['accuracy']:.1f}% |")
        return "\n".join(lines) + "\n"

    def write(self, out_dir: str | Path, title: str = "Evaluation") -> tuple[Path, Path]:
        """`eval.json` and `eval.md` in `out_dir`; for MathVista rows also the prediction files other kits read
        (`mathvista_predictions.json`, `vlmevalkit_MathVista.tsv`: see `atrl.eval.export`)."""
        from .._io import ensure_writable_dir
        from .export import write_mathvista_predictions

        out = ensure_writable_dir(out_dir, argument="--out")
        (out / "eval.json").write_text(self.to_json())
        (out / "eval.md").write_text(self.to_markdown(title))
        write_mathvista_predictions(self, out)
        return out / "eval.json", out / "eval.md"


_RULES = {"mathvista": "MathVista's official rule (the extraction normalised by question type, then compared with "
                       "the answer exactly; atrl.eval.official)",
          "reward": "the RL reward's equivalence rules (numbers with the row's precision, choices by letter or text, "
                    "math-verify expressions, lists, text; atrl.rl.rewards)"}


def _scoring_note(r: EvalResult) -> str:
    rule = _RULES.get(r.scoring, r.scoring)
    source = ("extracted by rule (answer tags, \\boxed{}, \"the answer is\", the last line); MathVista's own "
              "pipeline extracts with a language model, which atrl does not call: `--extractions FILE` rescores "
              "with another extractor's answers" if r.extraction == "rule-based"
              else f"extractions from {r.extraction}")
    return f"Scoring: **{r.scoring}**, {rule}. Answers {source}."


def _differences(r: EvalResult, examples: int = 5) -> list[str]:
    (name, acc), = r.other_accuracy.items()
    lines = [f"Under {name} scoring the accuracy is {100 * acc:.1f}%: the two rules disagree on {r.differ} of "
             f"{r.n} responses.", ""]
    differing = [row for row in r.rows if row.get("correct_mathvista") is not None
                 and row["correct_mathvista"] != row["correct_reward"]]
    if differing:
        lines += ["| uid | answer | extracted | MathVista's prediction | mathvista | reward |",
                  "|---|---|---|---|---|---|"]
        for row in differing[:examples]:
            lines.append(f"| {row['uid']} | {row['answer']} | {row['extracted']} | {row['prediction']} | "
                         f"{'right' if row['correct_mathvista'] else 'wrong'} | "
                         f"{'right' if row['correct_reward'] else 'wrong'} |")
        lines.append("")
    return lines


def _images(row: dict) -> list:
    if row.get("images") is not None:
        return list(row["images"])
    return [row["image"]] if row.get("image") is not None else []


def _category(row: dict) -> str:
    if row.get("family"):
        return str(row["family"])
    meta = row.get("metadata")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            meta = {}
    return str((meta or {}).get("category", "all"))


@torch.no_grad()
def generate_responses(model, processor, rows: Sequence[dict], *, max_new_tokens: int = 64, batch_size: int = 16,
                       temperature: float | None = None, samples: int = 1, seed: int | None = 0,
                       repetition_penalty: float = 1.0, progress=None, cut: list[bool] | None = None,
                       video_bounds=None) -> list[str]:
    """Responses for `rows` (left-padded batches): greedy, or `samples` per row drawn at `temperature`. A row's
    `videos` are decoded within `video_bounds` (default `VideoBounds()`), as training decodes them.

    Sampled responses come row by row (row 0's samples first) and are seeded by `seed` (None: drawn from torch's
    random state as it is, for a caller that seeds once and generates in several calls). `cut`, when given, gets
    one flag per response: True where generation stopped at `max_new_tokens` before an end-of-sequence token.
    """
    if temperature is None and samples != 1:
        raise ValueError(f"samples={samples}: several responses per row need a sampling temperature")
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature={temperature}: must be positive (use None for greedy decoding)")
    if samples < 1:
        raise ValueError(f"samples={samples}: must be at least 1")
    decoding = {"do_sample": False} if temperature is None else {
        "do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": samples}
    # As TRL's rollouts decode: no repetition penalty unless asked (a checkpoint's generation_config may set one:
    # Qwen2.5-VL-Instruct's 1.05), and never an image token, which no image stands behind
    decoding["repetition_penalty"] = repetition_penalty
    image_tokens = [getattr(model.config, name, None) for name in ("image_token_id", "video_token_id")]
    if any(t is not None for t in image_tokens):
        decoding["suppress_tokens"] = [t for t in image_tokens if t is not None]
    if temperature is not None and seed is not None:
        torch.manual_seed(seed)
    tok = processor.tokenizer
    tok.padding_side = "left"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[str] = []
    ends = _end_token_ids(model, tok)
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        texts = [processor.apply_chat_template(r["prompt"], add_generation_prompt=True) for r in chunk]
        images = [_images(r) for r in chunk]
        kwargs = {"images": images} if any(images) else {}
        kwargs.update(_video_kwargs(processor, chunk, video_bounds))
        batch = processor(text=texts, return_tensors="pt", padding=True, **kwargs).to(device)
        ids = model.generate(**batch, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                             **decoding)
        new = ids[:, batch["input_ids"].shape[1]:]
        out.extend(tok.batch_decode(new, skip_special_tokens=True))
        if cut is not None:
            ended = torch.isin(new, torch.tensor(ends, device=new.device)).any(dim=1)
            cut.extend((~ended & (new.shape[1] >= max_new_tokens)).tolist())
        if progress is not None:
            progress(len(chunk))
    if was_training:
        model.train()
    return out


def _video_kwargs(processor, rows: Sequence[dict], bounds) -> dict:
    """The processor's video arguments for the rows' `videos` (none when they have none)."""
    if not any(r.get("videos") for r in rows):
        return {}
    from ..data.formats import video_inputs
    from ..data.video import VideoBounds, decode_row_videos

    return video_inputs(processor, [v for r in rows for v in decode_row_videos(r, bounds or VideoBounds())])


def _end_token_ids(model, tok) -> list[int]:
    """The tokens that end a response: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
    return sorted({*ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})


def score_responses(rows: Sequence[dict], responses: Sequence[str], *, scoring: str = "auto",
                    extractions: Mapping[str, str] | None = None, extraction_source: str = "rule-based"
                    ) -> EvalResult:
    """Score `responses` (one per row) against the rows' answers.

    scoring: "reward" (the RL reward's equivalence rules), "mathvista" (MathVista's official rule: every row must
        carry MathVista's fields, or a clear error names it), or "auto": MathVista's rule on rows with MathVista's
        fields (`question_type`), the reward's on the rest. Where MathVista's rule applies, the reward's verdict is
        kept beside it (`correct_reward` / `correct_mathvista` per row, the other accuracy and the count of
        disagreements in the result).
    extractions: extracted answers by row uid (`atrl.eval.official.load_extractions`) in place of the rule-based
        extraction; every row needs one, and an id no row has is an error.
    """
    from .official import SCORINGS, check_mathvista_row, mathvista_correct, mathvista_fields

    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r} is unknown; choose from {SCORINGS}")
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    if extractions is not None:
        _check_extractions(rows, extractions, extraction_source)
    per_cat: dict[str, list[bool]] = defaultdict(list)
    scored = []
    used: set[str] = set()
    for i, (row, response) in enumerate(zip(rows, responses)):
        if extractions is not None:
            pred, rule = extractions[str(row.get("uid"))], "given"
        else:
            pred, rule = extract_answer(response)
        ok_reward = is_equivalent(pred, row["answer"], row.get("answer_type") or "text",
                                  choices=row.get("choices") or None, precision=row.get("precision"))
        where = f"row {i} (uid {row.get('uid')!r})"
        fields = mathvista_fields(row) if scoring != "reward" else None
        if fields is not None or scoring == "mathvista":  # the rule applies: every field it needs, or an error
            fields = check_mathvista_row(row, where, fields)
        entry = {"uid": row.get("uid"), "category": _category(row), "answer": row["answer"], "extracted": pred,
                 "rule": rule, "response": response, "correct_reward": ok_reward}
        if fields is not None:
            prediction, ok = mathvista_correct(pred, row["answer"], fields)
            entry.update(prediction=prediction, correct_mathvista=ok, correct=ok, scoring="mathvista",
                         question=_prompt_text(row), **{k: fields[k] for k in ("question_type", "answer_type",
                                                                                "choices", "precision", "metadata")})
        else:
            entry.update(correct=ok_reward, scoring="reward")
        used.add(entry["scoring"])
        per_cat[entry["category"]].append(entry["correct"])
        scored.append(entry)
    n = len(scored)
    acc = sum(r["correct"] for r in scored) / n if n else float("nan")
    by_cat = {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in per_cat.items()}
    result = EvalResult(acc, n, by_cat, scored, extraction=extraction_source,
                        scoring=" + ".join(sorted(used)) if used else ("reward" if scoring == "auto" else scoring))
    both = [r for r in scored if "correct_mathvista" in r]
    if both and len(both) == n:
        result.other_accuracy = {"reward": sum(r["correct_reward"] for r in both) / n}
        result.differ = sum(r["correct_reward"] != r["correct_mathvista"] for r in both)
    return result


def _check_extractions(rows: Sequence[dict], extractions: Mapping[str, str], source: str) -> None:
    """Given extractions must cover exactly the rows' ids (a file for another data set is refused)."""
    uids = [str(r.get("uid")) for r in rows]
    unknown = sorted(set(extractions) - set(uids))
    if unknown:
        raise ValueError(f"--extractions {source}: {len(unknown)} extraction(s) for questions the data does not have "
                         f"(uid {', '.join(map(repr, unknown[:5]))}{', ...' if len(unknown) > 5 else ''}); give "
                         "the file of this data set, or the whole data set (not --n)")
    missing = [(i, u) for i, u in enumerate(uids) if u not in extractions]
    if missing:
        i, u = missing[0]
        raise ValueError(f"--extractions {source}: no extraction for row {i} (uid {u!r})"
                         f"{f' and {len(missing) - 1} more rows' if len(missing) > 1 else ''}")


def _prompt_text(row: dict) -> str:
    """The text of a row's prompt (its user turn's text parts), as MathVista's `query` holds it."""
    prompt = row.get("prompt")
    if isinstance(prompt, str):
        return prompt
    parts = []
    for message in prompt or []:
        content = message.get("content")
        if isinstance(content, str):
            parts.append(content)
        else:
            parts += [c.get("text") or "" for c in content or [] if c.get("type") == "text"]
    return "\n".join(p for p in parts if p)


def evaluate(model, processor, rows: Sequence[dict], *, batch_size: int = 16, log: ResponseLog | None = None,
             progress=None, resumed=None, scoring: str = "auto", extractions: Mapping[str, str] | None = None,
             extraction_source: str = "rule-based", **kwargs) -> EvalResult | None:
    """Accuracy of `model` on `rows`; with `temperature` (and `samples`), the mean accuracy of sampled responses.

    `rows` may be a `datasets.Dataset`: a batch's images are decoded when it is answered, and scoring reads the
    rows without them. With a `log`, responses are kept as they come and rows it already holds are not answered
    again; `resumed(answered, cut_lines)`, when given, hears how many of `rows` the log answered and how many of its
    lines a kill cut short, before anything is generated. Under several processes (torch.distributed initialised,
    as by `accelerate launch`), each answers every n-th remaining row, a batch at a time in step with the others,
    and the first process gathers and scores them: the result is returned there, None on the others. Sampled
    responses are seeded once per process (`seed` + rank), so they depend on the number of processes, as they do
    on the batch size. `scoring`, `extractions`: as in `score_responses` (checked before anything is generated).
    """
    import torch.distributed as dist

    from .official import SCORINGS

    if scoring not in SCORINGS:
        raise ValueError(f"scoring {scoring!r} is unknown; choose from {SCORINGS}")
    labels = label_rows(rows)
    if extractions is not None:
        if kwargs.get("samples", 1) != 1:
            raise ValueError("--extractions gives one answer per question: it cannot score several samples each")
        _check_extractions(labels, extractions, extraction_source)
    samples, seed = kwargs.get("samples", 1), kwargs.pop("seed", 0)
    distributed = dist.is_available() and dist.is_initialized()
    world, rank = (dist.get_world_size(), dist.get_rank()) if distributed else (1, 0)
    keys = [row_key(r) for r in labels]
    done, partial = log.read() if log is not None else ({}, 0)
    todo = [i for i, key in enumerate(keys) if key not in done]
    if resumed is not None and (len(todo) < len(keys) or partial):
        resumed(len(keys) - len(todo), partial)
    if log is not None:
        if distributed:
            dist.barrier()  # every process has read the log before any writes to it
        log.start(main_process=rank == 0)
    if kwargs.get("temperature") is not None:
        torch.manual_seed(seed + rank)
    if progress is not None and len(todo) < len(keys):
        progress(len(keys) - len(todo))  # answered by an earlier run
    mine = todo[rank::world]
    steps = -(-len(todo[0::world]) // batch_size)  # the first process has the most rows
    new: dict[str, tuple[list[str], list[bool]]] = {}
    device = next(model.parameters()).device
    for step in range(steps):
        chunk = mine[step * batch_size:(step + 1) * batch_size]
        if chunk:
            cut: list[bool] = []
            responses = _generate_halving(model, processor, [rows[i] for i in chunk], cut, **kwargs)
            for k, i in enumerate(chunk):
                entry = responses[k * samples:(k + 1) * samples], cut[k * samples:(k + 1) * samples]
                new[keys[i]] = entry
                if log is not None:
                    log.append(keys[i], *entry)
        answered = len(chunk)
        if distributed:  # in step: a process out of rows waits here, a batch at a time, not at the end
            count = torch.tensor([answered], device=device if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(count)
            answered = int(count.item())
        if progress is not None:
            progress(answered)
    if distributed:
        everyone: list = [None] * world
        dist.all_gather_object(everyone, new)
        for part in everyone:
            new.update(part)
        if rank != 0:
            return None
    answers = {**done, **new}
    result = score_responses([r for r in labels for _ in range(samples)],
                             [text for key in keys for text in answers[key][0]], scoring=scoring,
                             extractions=extractions, extraction_source=extraction_source)
    flags = [flag for key in keys for flag in answers[key][1]]
    result.truncated = sum(flags)
    result.samples = samples
    if samples > 1:
        right = [sum(r["correct"] for r in result.rows[i:i + samples]) for i in range(0, result.n, samples)]
        ks = sorted({*(2 ** j for j in range(samples.bit_length()) if 2 ** j <= samples), samples})
        result.pass_at_k = {k: pass_at_k(samples, right, k) for k in ks}
    for row, was_cut in zip(result.rows, flags):
        row["truncated"] = was_cut
    return result


def _generate_halving(model, processor, rows: list[dict], cut: list[bool], **kwargs) -> list[str]:
    """`generate_responses` on `rows` as one batch; out of device memory, on each half in turn (down to one row,
    which then raises), so that a batch of large images does not end a long evaluation."""
    try:
        return generate_responses(model, processor, rows, batch_size=len(rows), cut=cut, seed=None, **kwargs)
    except torch.OutOfMemoryError:
        if len(rows) == 1:
            raise
    import logging

    logging.getLogger("atrl").warning("out of memory generating for %d prompts at once: in halves", len(rows))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = len(rows) // 2
    return (_generate_halving(model, processor, rows[:half], cut, **kwargs)
            + _generate_halving(model, processor, rows[half:], cut, **kwargs))


def pass_at_k(n: int, correct: Sequence[int], k: int) -> float:
    """The mean over questions of the chance that k of a question's n sampled answers, drawn without replacement,
    hold at least one right one: 1 - C(n - c, k) / C(n, k) for c right (the unbiased estimator of pass@k from n
    samples, Chen et al. 2021)."""
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= {n} samples per question")
    if not correct:
        return float("nan")
    return sum(1.0 - math.comb(n - c, k) / math.comb(n, k) for c in correct) / len(correct)
