"""`atrl analyze`: what the probes see on a checkpoint.

For each example, the prompt plus a response (a synthetic task's reference trace by default, so that the
perception spans are known; or the model's own response, the only kind a data file has) goes through one
forward pass with probes; per response token we get connectivity, a region profile and whether `atrl.credit`
makes it an anchor. Outputs:

- the connectivity distribution (histogram) with Sarle's bimodality coefficient (> 5/9 suggests two modes);
- the anchor fraction;
- precision and recall of anchors against the perception spans (the characters that state what was read from
  the image), next to a random choice of the same number of tokens: precision = base rate of perception
  tokens, recall = anchor fraction;
- per-token records for the highlighted-response views and the attention heatmaps in `atrl.viz`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

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
    frames: Any = None  # a video's frames (T, H, W, 3), when the prompt's first visual input is a video
    time_bins: int | None = None  # the video's stretches of time: its regions are time_bins blocks of the grid


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
    perception_auc: float = float("nan")  # ROC AUC of connectivity for the perception tokens (random: 0.5)

    def summary(self) -> dict[str, float]:
        return {"tokens": int(self.connectivity.size), "bimodality": self.bimodality,
                "anchor_fraction": self.anchor_fraction, "perception_auc": self.perception_auc,
                "random_auc": 0.5 if self.perception_auc == self.perception_auc else float("nan"),
                "anchor_precision": self.precision, "anchor_recall": self.recall,
                "random_precision": self.random_precision, "random_recall": self.random_recall,
                "skipped": len(self.skipped)}


def _token_spans(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [tuple(o) for o in enc["offset_mapping"]]


@dataclass
class _Item:
    uid: str
    family: str
    messages: list  # the conversational prompt
    images: list
    response: str
    perception_spans: list[tuple[int, int]] | None  # character spans in `response`; None: unknown
    videos: list = field(default_factory=list)  # `videos` column items (decoded when analysed)


def _items(examples: Sequence[Any], responses: Sequence[str] | None) -> list[_Item]:
    """Synthetic `Example`s (reference trace and its perception spans unless `responses` are given) or data-set
    rows as `atrl eval` reads them (TRL conversational `prompt`, `images`; `responses` required)."""
    from ..data.synthetic import build_prompt
    from .score import _category, _images

    if responses is not None and len(responses) != len(examples):
        raise ValueError(f"analyze: {len(examples)} examples but {len(responses)} responses")
    items = []
    for i, ex in enumerate(examples):
        if isinstance(ex, dict):
            if responses is None:
                raise ValueError(f"analyze: row {i} ({ex.get('uid')}) is a data-set row, which has no reference "
                                 "trace: pass the responses to analyse (e.g. the model's own)")
            items.append(_Item(str(ex.get("uid", i)), _category(ex), ex["prompt"], _images(ex), responses[i], None,
                               list(ex.get("videos") or [])))
        else:
            own = responses is None
            video = getattr(ex, "frames", None) is not None
            items.append(_Item(ex.uid, ex.family, build_prompt(ex.question, "video" if video else "image"),
                               [] if video else [ex.image], ex.reasoning if own else responses[i],
                               list(ex.perception_spans) if own else None,
                               [{"images": ex.frames, "fps": ex.fps}] if video else []))
    return items


def _analyse_one(model, processor, probe, item: _Item, device, credit: CreditOptions, sink_debias: str,
                 region_grid: tuple[int, int]) -> TokenView | str:
    """One example through the probed forward: its view, or why it was skipped."""
    response = item.response
    prompt = processor.apply_chat_template(item.messages, add_generation_prompt=True)
    kwargs = {"images": [item.images]} if item.images else {}
    videos = []
    if item.videos:
        from ..data.formats import video_inputs
        from ..data.video import VideoBounds, decode_video

        videos = [decode_video(v, VideoBounds(), item.uid) for v in item.videos]
        kwargs.update(video_inputs(processor, videos))
    batch = processor(text=[prompt + response], return_tensors="pt", **kwargs)
    batch = {k: v.to(device) for k, v in batch.items()}
    ids, spans = _token_spans(processor.tokenizer, response)
    T = len(ids)
    if T == 0:
        return f"{item.uid}: the response is empty"
    if batch["input_ids"][0, -T:].tolist() != ids:
        return f"{item.uid}: the response does not tokenize the same inside the prompt"
    with probe.capture(batch["input_ids"], batch.get("image_grid_thw"), response_len=T,
                       image_sizes=batch.get("image_sizes"), video_grid_thw=batch.get("video_grid_thw")) as cap:
        model(**batch, use_cache=False)
    mask = torch.ones(1, T, dtype=torch.bool)
    conn, prof = cap.connectivity(mask, sink_debias=sink_debias)
    result = assign_credit(conn, prof, mask, credit)
    perception_chars = np.zeros(len(response) + 1, dtype=bool)
    for a, b in item.perception_spans or ():
        perception_chars[a:b] = True
    perception = np.array([perception_chars[a:b].any() for a, b in spans])
    first_is_video = bool(videos) and _first_visual_is_video(item.messages)
    return TokenView(item.uid, item.family, response, [response[a:b] for a, b in spans], spans, conn[0].numpy(),
                     prof[0].numpy(), result.boosted_mask[0].numpy(), perception,
                     item.images[0] if item.images else None, tuple(region_grid),
                     frames=videos[0].frames if first_is_video else None,
                     time_bins=probe.time_bins if first_is_video else None)


def _first_visual_is_video(messages: list) -> bool:
    """Whether the prompt's first image-or-video part is a video (its regions come first in a profile)."""
    for message in messages:
        for part in message.get("content") if isinstance(message.get("content"), list) else []:
            if part.get("type") in ("image", "video"):
                return part["type"] == "video"
    return False


@torch.no_grad()
def analyze(model, processor, examples: Sequence[Any], *, responses: Sequence[str] | None = None,
            credit: CreditOptions | None = None, sink_debias: str = "head_baseline",
            region_grid: tuple[int, int] = (4, 4), layers: Sequence[int] | None = None,
            progress: Callable[[int], None] | None = None, time_bins: int = 4) -> AnalysisResult:
    """Probe each example's response and score anchors against perception spans where they are known.

    Args:
        examples: synthetic `Example`s (image, question, reasoning, perception_spans, uid, family), or data-set
            rows (`prompt` in TRL's conversational format, `images`, `uid`, a category as `atrl eval` reads it).
        responses: responses to analyse instead of the reference traces (perception spans then do not apply);
            required for data-set rows.
        progress: called with 1 after each example (analysed or skipped).
        time_bins: stretches of time a video's regions are cut into (each with `region_grid` cells).
    """
    credit = credit or CreditOptions()
    items = _items(examples, responses)
    probe = ConnectivityProbe(model, layers=layers, region_grid=region_grid, processor=processor, time_bins=time_bins)
    device = next(model.parameters()).device
    views: list[TokenView] = []
    skipped: list[str] = []
    try:
        for item in items:
            outcome = _analyse_one(model, processor, probe, item, device, credit, sink_debias, region_grid)
            (views if isinstance(outcome, TokenView) else skipped).append(outcome)
            if progress is not None:
                progress(1)
    finally:
        probe.detach()
    if not views:
        raise ValueError("analyze: no example could be analysed: " + "; ".join(skipped[:3]))
    conn_all = np.concatenate([v.conn for v in views])
    anchors = np.concatenate([v.anchor for v in views])
    nan = float("nan")
    if all(item.perception_spans is None for item in items):  # nothing to score anchors against
        return AnalysisResult(views, conn_all, bimodality_coefficient(conn_all), float(anchors.mean()), nan, nan,
                              nan, nan, skipped)
    percep = np.concatenate([v.perception for v in views])
    hit = float((anchors & percep).sum())
    precision = hit / anchors.sum() if anchors.any() else nan
    recall = hit / percep.sum() if percep.any() else nan
    auc = nan
    if percep.any() and not percep.all():  # how well connectivity ranks the tokens that state what was read
        from sklearn.metrics import roc_auc_score

        auc = float(roc_auc_score(percep, conn_all))
    return AnalysisResult(views, conn_all, bimodality_coefficient(conn_all), float(anchors.mean()), precision, recall,
                          float(percep.mean()), float(anchors.mean()), skipped, perception_auc=auc)
