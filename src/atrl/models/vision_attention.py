"""The Qwen-VL vision towers' attention in a call per segment length and layer (a few) instead of one per window.

transformers' Qwen2-VL and Qwen2.5-VL vision attention hands its packed sequence (every image's patches, in
windows on Qwen2.5-VL's window layers) to a FlashAttention implementation whole, with the segment boundaries
(`cu_seqlens`); any other implementation gets one call per segment, in a Python loop, after reading the segment
lengths back from the device in every layer. With SDPA at the recipes' image sizes (~1,000 merged tokens, 64
windows of 64 patches per image), that is thousands of small attention calls per forward, and as many in the
backward: on an H100 at the 3B shape the training step spends more host time in them than in anything else, and
the step is host-bound (docs/benchmarks.md, Vision tower). This route takes the 3B tower's forward + backward to 0.42 of
the loop's time there (4 images, 7,184 calls per forward against 32), with 2.5 GiB less peak memory.

`packed_sdpa_attention` takes the FlashAttention calling convention (`cu_seq_lens_q`, `max_length_q`) and
computes the segments of each length in one SDPA call: the segments of that length are gathered into a
(segments, heads, length, head size) batch, and the outputs are scattered back into sequence order. Windows are
mostly of one size (border windows of a few others), whole images of one size per image size: a few calls per
layer, each unpadded and unmasked, so SDPA picks the kernel it picks for one segment. The layout is computed
once per `cu_seqlens` tensor (the vision tower makes two per forward: windows and whole images), not once per
layer. transformers routes `cu_seqlens` only to implementations whose name contains
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
    """The segments grouped by length: `groups` holds, per distinct length L, the (segments of that length, L)
    positions of each in the sequence; `back` (S,) where each sequence position sits among the groups' outputs
    laid end to end. Equal-length segments need no padding and no mask, so each group's call takes the kernel
    a single segment's call takes (flash or cuDNN, never the masked or math path). All built on the host and
    copied once: reading them costs the device no synchronisation."""

    def __init__(self, cu_seqlens: torch.Tensor):
        bounds = cu_seqlens.tolist()  # one read-back per layout, not per layer
        starts = torch.tensor(bounds[:-1], dtype=torch.long)
        lengths = torch.tensor(bounds[1:], dtype=torch.long) - starts
        if len(bounds) < 2 or int(lengths.min()) <= 0:
            raise ValueError(f"vision attention: segment boundaries {bounds[:8]}... must rise strictly")
        device = cu_seqlens.device
        groups, order = [], []
        for length in sorted(set(lengths.tolist())):
            positions = starts[lengths == length][:, None] + torch.arange(length)  # (segments, length)
            groups.append(positions.to(device))
            order.append(positions.flatten())
        self.groups = groups
        self.back = torch.argsort(torch.cat(order)).to(device)  # sequence position -> row of the joined outputs
        self.total = bounds[-1]


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

    dropout = dropout if module.training else 0.0
    rows = []
    for positions in layout.groups:  # (segments, length): a call per distinct segment length
        q, k, v = (x[0][:, positions].transpose(0, 1) for x in (query, key, value))  # (segments, H, length, D)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scaling)
        rows.append(out.transpose(1, 2).flatten(0, 1))  # (segments x length, H, D)
    joined = rows[0] if len(rows) == 1 else torch.cat(rows)
    return joined.index_select(0, layout.back).unsqueeze(0), None


def register_packed_vision_attention() -> str:
    """Register `packed_sdpa_attention` with transformers' AttentionInterface; returns its name."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, packed_sdpa_attention)
    return NAME


def use_packed_vision_attention(model) -> bool:
    """Put `model`'s vision tower on `packed_sdpa_attention` where it is a Qwen2-VL / Qwen2.5-VL tower on SDPA;
    returns whether it did (other models and implementations are left as they are)."""
    config = model.config
    vision = getattr(config, "vision_config", None)
    if getattr(config, "model_type", None) not in ("qwen2_vl", "qwen2_5_vl") or vision is None:
        return False
    if vision._attn_implementation != "sdpa":
        return False
    model.set_attn_implementation({"vision_config": register_packed_vision_attention()})
    return True
