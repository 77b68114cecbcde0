"""The Qwen-VL vision towers' attention in one SDPA call per layer instead of one per window.

transformers' Qwen2-VL and Qwen2.5-VL vision attention hands its packed sequence (every image's patches, in
windows on Qwen2.5-VL's window layers) to a FlashAttention implementation whole, with the segment boundaries
(`cu_seqlens`); any other implementation gets one call per segment, in a Python loop, after reading the segment
lengths back from the device in every layer. With SDPA at the recipes' image sizes (~1,000 merged tokens, 64
windows of 64 patches per image), that is thousands of small attention calls per forward, and as many in the
backward: on an H100 at the 3B shape the training step spent more host time in them than in anything else
(docs/benchmarks.md), and the step was host-bound.

`packed_sdpa_attention` takes the FlashAttention calling convention (`cu_seq_lens_q`, `max_length_q`) and
computes every segment in one SDPA call: the segments are gathered into a (segments, heads, longest, head size)
batch, the shorter ones padded and masked out of the keys, and the outputs scattered back into sequence order.
The layout is computed once per `cu_seqlens` tensor (the vision tower makes two per forward: windows and whole
images), not once per layer. transformers routes `cu_seqlens` only to implementations whose name contains
"flash" (`is_flash_attention_requested`), hence the registered name.

    from atrl.models.vision_attention import use_packed_vision_attention
    use_packed_vision_attention(model)       # a Qwen2-VL / Qwen2.5-VL model on SDPA; returns whether it applied
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

NAME = "atrl_packed_sdpa_flash_api"  # "flash" in the name: transformers then passes cu_seqlens (see above)
_LAYOUTS: dict[int, tuple[torch.Tensor, "_Layout"]] = {}  # id(cu_seqlens) -> (that tensor, its layout)
_LAYOUTS_KEPT = 8


class _Layout:
    """Where each packed position comes from: `index` (segments, longest) into the sequence (padding points at the
    segment's own first position); `mask` (segments, 1, 1, longest) the keys SDPA may attend to (None when every
    segment has the longest length); `back` (S,) where each sequence position sits among the segments x longest
    packed rows. All built on the host and copied once: reading them costs the device no synchronisation (a
    boolean mask as an index would: its count of True is read back in every layer)."""

    def __init__(self, cu_seqlens: torch.Tensor):
        bounds = cu_seqlens.tolist()  # one read-back per layout, not per layer
        starts = torch.tensor(bounds[:-1], dtype=torch.long)
        lengths = torch.tensor(bounds[1:], dtype=torch.long) - starts
        if len(bounds) < 2 or int(lengths.min()) <= 0:
            raise ValueError(f"vision attention: segment boundaries {bounds[:8]}... must rise strictly")
        longest = int(lengths.max())
        offsets = torch.arange(longest)
        valid = offsets[None, :] < lengths[:, None]
        index = starts[:, None] + torch.where(valid, offsets[None, :], 0)
        device = cu_seqlens.device
        self.index = index.to(device)
        self.mask = None if bool(valid.all()) else valid[:, None, None, :].to(device)
        self.back = valid.flatten().nonzero().squeeze(1).to(device)
        self.segments, self.longest, self.total = len(bounds) - 1, longest, bounds[-1]


def _layout(cu_seqlens: torch.Tensor) -> _Layout:
    key = id(cu_seqlens)
    kept = _LAYOUTS.get(key)
    if kept is not None and kept[0] is cu_seqlens:
        return kept[1]
    layout = _Layout(cu_seqlens)
    while len(_LAYOUTS) >= _LAYOUTS_KEPT:
        _LAYOUTS.pop(next(iter(_LAYOUTS)))
    _LAYOUTS[key] = (cu_seqlens, layout)  # the tensor is kept with it: its id cannot be reused meanwhile
    return layout


def packed_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                          attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                          cu_seq_lens_q: torch.Tensor | None = None, cu_seq_lens_k: torch.Tensor | None = None,
                          is_causal: bool = False, **kwargs) -> tuple[torch.Tensor, None]:
    """(1, heads, S, head size) query, key, value of a packed sequence whose segments `cu_seq_lens_q` bounds (and
    attend only within themselves) -> ((1, S, heads, head size) output, None)."""
    if cu_seq_lens_q is None or query.shape[0] != 1:
        raise ValueError("packed vision attention takes one packed sequence (batch 1) with its segment boundaries "
                         "(cu_seq_lens_q); it is meant for the Qwen-VL vision towers only")
    if cu_seq_lens_k is not None and cu_seq_lens_k is not cu_seq_lens_q and not torch.equal(cu_seq_lens_k,
                                                                                           cu_seq_lens_q):
        raise ValueError("packed vision attention: queries and keys must share their segments")
    if attention_mask is not None or is_causal:
        raise ValueError("packed vision attention: the segments are the only mask (no attention_mask, not causal)")
    layout = _layout(cu_seq_lens_q)
    if layout.total != query.shape[2]:
        raise ValueError(f"packed vision attention: the segments cover {layout.total} positions, the sequence has "
                         f"{query.shape[2]}")

    def packed(x: torch.Tensor) -> torch.Tensor:  # (1, H, S, D) -> (segments, H, longest, D)
        return x[0][:, layout.index].transpose(0, 1)

    out = F.scaled_dot_product_attention(packed(query), packed(key), packed(value), attn_mask=layout.mask,
                                         dropout_p=dropout if module.training else 0.0, scale=scaling)
    # (segments, H, longest, D) -> (segments x longest, H, D) -> the real positions, in sequence order
    heads, head_size = out.shape[1], out.shape[3]
    rows = out.transpose(1, 2).reshape(layout.segments * layout.longest, heads, head_size)
    return rows.index_select(0, layout.back).unsqueeze(0), None


def use_packed_vision_attention(model) -> bool:
    """Put `model`'s vision tower on `packed_sdpa_attention` where it is a Qwen2-VL / Qwen2.5-VL tower on SDPA;
    returns whether it did (other models and implementations are left as they are)."""
    from transformers import AttentionInterface

    config = model.config
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) not in ("qwen2_vl", "qwen2_5_vl") or vision is None:
        return False
    if vision._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(NAME, packed_sdpa_attention)
    model.set_attn_implementation({"vision_config": NAME})
    return True
