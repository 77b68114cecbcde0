"""Evaluate a VLM checkpoint on a data set: greedy answers, rule-based scoring, accuracy by category.

Rows are dicts with `prompt` (TRL conversational), `image` or `images`, `answer`, `answer_type`, optional
`choices`, `precision` and a category: `family` (synthetic tasks) or MathVista's `metadata.category`.
Scoring uses `atrl.rl.rewards`: the answer is extracted from the response and compared by answer type.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
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

    def to_json(self) -> str:
        return json.dumps({"accuracy": self.accuracy, "n": self.n, "samples": self.samples,
                           "pass_at_k": self.pass_at_k, "truncated": self.truncated,
                           "by_category": self.by_category, "rows": self.rows}, indent=1, ensure_ascii=False)

    def to_markdown(self, title: str = "Evaluation") -> str:
        each = f", {self.samples} sampled answers each" if self.samples > 1 else ""
        lines = [f"# {title}", "", (f"Overall accuracy: **{100 * self.accuracy:.1f}%** "
                                    f"({self.n // self.samples} questions{each})"), ""]
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
        from .._io import ensure_writable_dir

        out = ensure_writable_dir(out_dir, argument="--out")
        (out / "eval.json").write_text(self.to_json())
        (out / "eval.md").write_text(self.to_markdown(title))
        return out / "eval.json", out / "eval.md"


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
                       repetition_penalty: float = 1.0, progress=None, cut: list[bool] | None = None) -> list[str]:
    """Responses for `rows` (left-padded batches): greedy, or `samples` per row drawn at `temperature`.

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


def _end_token_ids(model, tok) -> list[int]:
    """The tokens that end a response: the generation config's end-of-sequence ids and the tokenizer's."""
    ids = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = list(ids) if isinstance(ids, (list, tuple)) else [] if ids is None else [ids]
    return sorted({*ids, *([tok.eos_token_id] if tok.eos_token_id is not None else [])})


def score_responses(rows: Sequence[dict], responses: Sequence[str]) -> EvalResult:
    if len(rows) != len(responses):
        raise ValueError(f"{len(rows)} rows but {len(responses)} responses")
    per_cat: dict[str, list[bool]] = defaultdict(list)
    scored = []
    for row, response in zip(rows, responses):
        pred, rule = extract_answer(response)
        ok = is_equivalent(pred, row["answer"], row.get("answer_type") or "text",
                           choices=row.get("choices") or None, precision=row.get("precision"))
        cat = _category(row)
        per_cat[cat].append(ok)
        scored.append({"uid": row.get("uid"), "category": cat, "answer": row["answer"], "extracted": pred,
                       "rule": rule, "correct": ok, "response": response})
    n = len(scored)
    acc = sum(r["correct"] for r in scored) / n if n else float("nan")
    by_cat = {c: {"n": len(v), "accuracy": sum(v) / len(v)} for c, v in per_cat.items()}
    return EvalResult(acc, n, by_cat, scored)


def evaluate(model, processor, rows: Sequence[dict], *, batch_size: int = 16, log: ResponseLog | None = None,
             progress=None, resumed=None, **kwargs) -> EvalResult | None:
    """Accuracy of `model` on `rows`; with `temperature` (and `samples`), the mean accuracy of sampled responses.

    `rows` may be a `datasets.Dataset`: a batch's images are decoded when it is answered, and scoring reads the
    rows without them. With a `log`, responses are kept as they come and rows it already holds are not answered
    again; `resumed(answered, cut_lines)`, when given, hears how many of `rows` the log answered and how many of its
    lines a kill cut short, before anything is generated. Under several processes (torch.distributed initialised,
    as by `accelerate launch`), each answers every n-th remaining row, a batch at a time in step with the others,
    and the first process gathers and scores them: the result is returned there, None on the others. Sampled
    responses are seeded once per process (`seed` + rank), so they depend on the number of processes, as they do
    on the batch size.
    """
    import torch.distributed as dist

    labels = label_rows(rows)
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
                             [text for key in keys for text in answers[key][0]])
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
