"""`atrl analyze`: what the probes see on a checkpoint.

For each example, the prompt plus a response (the task's reference trace by default, so that the perception
spans are known) goes through one forward pass with probes; per response token we get connectivity, a region
profile and whether `atrl.credit` makes it an anchor. Outputs:

- the connectivity distribution (histogram) with Sarle's bimodality coefficient (> 5/9 suggests two modes);
- the anchor fraction;
- precision and recall of anchors against the perception spans (the characters that state what was read from
  the image), next to a random choice of the same number of tokens: precision = base rate of perception
  tokens, recall = anchor fraction;
- per-token records for the highlighted-response views and the attention heatmaps in `atrl.viz`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch

from ..credit import CreditOptions, assign_credit, bimodality_coefficient
from ..probe import ConnectivityProbe


@dataclass
class TokenView:
    """One analysed response: its tokens and what the probes and the credit module said about each."""

    uid: str
    family: str
    response: str
    tokens: list[str]
    spans: list[tuple[int, int]]  # character span of each token in `response`
    conn: np.ndarray  # (T,)
    profile: np.ndarray  # (T, R)
    anchor: np.ndarray  # (T,) bool
    perception: np.ndarray  # (T,) bool: token overlaps a perception span
    image: Any = None
    grid: tuple[int, int] | None = None  # region grid of the (first) image


@dataclass
class AnalysisResult:
    views: list[TokenView]
    connectivity: np.ndarray  # all response tokens
    bimodality: float
    anchor_fraction: float
    precision: float
    recall: float
    random_precision: float
    random_recall: float
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        return {"tokens": int(self.connectivity.size), "bimodality": self.bimodality,
                "anchor_fraction": self.anchor_fraction, "anchor_precision": self.precision,
                "anchor_recall": self.recall, "random_precision": self.random_precision,
                "random_recall": self.random_recall, "skipped": len(self.skipped)}


def _token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


@torch.no_grad()
def analyze(model, processor, examples: Sequence[Any], *, responses: Sequence[str] | None = None,
            credit: CreditOptions | None = None, sink_debias: str = "head_baseline",
            region_grid: tuple[int, int] = (4, 4), layers: Sequence[int] | None = None) -> AnalysisResult:
    """Probe each example's response (default: its reference trace) and score anchors against perception spans.

    Args:
        examples: synthetic `Example`s (image, question, reasoning, perception_spans, uid, family).
        responses: responses to analyse instead of the reference traces (perception spans then do not apply).
    """
    from ..data.synthetic import build_prompt

    credit = credit or CreditOptions()
    probe = ConnectivityProbe(model, layers=layers, region_grid=region_grid)
    tok = processor.tokenizer
    views: list[TokenView] = []
    skipped: list[str] = []
    try:
        for i, ex in enumerate(examples):
            response = responses[i] if responses is not None else ex.reasoning
            prompt = processor.apply_chat_template(build_prompt(ex.question), add_generation_prompt=True)
            batch = processor(text=[prompt + response], images=[[ex.image]], return_tensors="pt")
            batch = {k: v.to(next(model.parameters()).device) for k, v in batch.items()}
            ids, spans = _token_spans(tok, response)
            T = len(ids)
            if T == 0 or batch["input_ids"][0, -T:].tolist() != ids:
                skipped.append(f"{ex.uid}: the response does not tokenize the same inside the prompt")
                continue
            with probe.capture(batch["input_ids"], batch.get("image_grid_thw"), response_len=T) as cap:
                model(**batch, use_cache=False)
            mask = torch.ones(1, T, dtype=torch.bool)
            conn, prof = cap.connectivity(mask, sink_debias=sink_debias)
            result = assign_credit(conn, prof, mask, credit)
            perception_chars = np.zeros(len(response) + 1, dtype=bool)
            if responses is None:
                for a, b in ex.perception_spans:
                    perception_chars[a:b] = True
            perception = np.array([perception_chars[a:b].any() for a, b in spans])
            views.append(TokenView(ex.uid, ex.family, response, [response[a:b] for a, b in spans], spans,
                                   conn[0].numpy(), prof[0].numpy(), result.boosted_mask[0].numpy(), perception,
                                   ex.image, tuple(region_grid)))
    finally:
        probe.detach()
    if not views:
        raise ValueError("analyze: no example could be analysed: " + "; ".join(skipped[:3]))
    conn_all = np.concatenate([v.conn for v in views])
    anchors = np.concatenate([v.anchor for v in views])
    percep = np.concatenate([v.perception for v in views])
    hit = float((anchors & percep).sum())
    precision = hit / anchors.sum() if anchors.any() else float("nan")
    recall = hit / percep.sum() if percep.any() else float("nan")
    return AnalysisResult(views, conn_all, bimodality_coefficient(conn_all), float(anchors.mean()), precision, recall,
                          float(percep.mean()), float(anchors.mean()), skipped)
