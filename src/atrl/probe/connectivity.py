"""From per-head region masses to connectivity density and region profiles (DESIGN 3.2).

Shapes: L probed layers, B batch, T response tokens, H query heads, R regions. Masks: True = real token.

    c_t = mean over layers and heads of (visual mass of that head on token t, sink-debiased)

Sink debiasing (`sink_debias`), our reconstruction:
    none           raw visual mass.
    head_baseline  subtract each (layer, head)'s median visual mass over the response's tokens, clip at 0,
                   so heads that put mass on the image for every token do not count (default).
    drop_sinks     subtract, per (layer, head, region), the smallest mass any response token puts there:
                   the part of a region's mass that every query pays (an attention sink) is dropped.
The region profile of token t is its (debiased) region masses averaged over layers and heads, normalised to
sum 1 (all zeros where there is no visual mass).
"""

from __future__ import annotations

import torch

SINK_DEBIAS = ("none", "head_baseline", "drop_sinks")


def _masked_median(x_LBTH: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(L, B, 1, H) median over the valid tokens of each response (lower median; 0 for an empty response)."""
    filled = x_LBTH.masked_fill(~mask_BT[None, :, :, None], float("nan"))
    med = torch.nanmedian(filled, dim=2, keepdim=True).values
    return torch.nan_to_num(med, nan=0.0)


def connectivity_from_masses(masses_LBTHR: torch.Tensor, mask_BT: torch.Tensor, sink_debias: str = "head_baseline"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Connectivity (B, T) and region profiles (B, T, R) of response tokens; zeros on padding.

    Args:
        masses_LBTHR: attention mass of each response token on each region, per probed layer and head.
        mask_BT: bool, True on real response tokens.
        sink_debias: one of SINK_DEBIAS (see the module docstring).
    """
    if sink_debias not in SINK_DEBIAS:
        raise ValueError(f"sink_debias={sink_debias!r}: choose from {SINK_DEBIAS}")
    if masses_LBTHR.ndim != 5 or masses_LBTHR.shape[1:3] != mask_BT.shape:
        raise ValueError(f"masses_LBTHR must be (L, B, T, H, R) with (B, T) = {tuple(mask_BT.shape)}, "
                         f"got {tuple(masses_LBTHR.shape)}")
    m = masses_LBTHR.float()
    valid = mask_BT[None, :, :, None, None]
    m = torch.where(valid, m, torch.zeros((), dtype=m.dtype, device=m.device))
    if sink_debias == "drop_sinks":
        floor = m.masked_fill(~valid, float("inf")).amin(dim=2, keepdim=True)
        floor = torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)
        m = (m - floor).clamp(min=0)
    visual_LBTH = m.sum(-1)
    if sink_debias == "head_baseline":
        visual_LBTH = (visual_LBTH - _masked_median(visual_LBTH, mask_BT)).clamp(min=0)
    conn = visual_LBTH.mean(dim=(0, 3)) * mask_BT  # (B, T)
    region = m.mean(dim=(0, 3))  # (B, T, R)
    total = region.sum(-1, keepdim=True)
    profile = torch.where(total > 0, region / total.clamp(min=1e-30), torch.zeros_like(region))
    return conn, profile * mask_BT[..., None]
