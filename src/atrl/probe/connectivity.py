"""From per-head region masses to connectivity density and region profiles (docs/ALGORITHM.md, Probes).

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

The reduction comes in two halves (`ConnectivityParts`): per-token sums over regions and over layers and heads,
where the masses are (2-3 kernels), and the rest (medians, means, normalisation), which a trainer runs on the
host after an asynchronous copy, off the forward's path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SINK_DEBIAS = ("none", "head_baseline", "drop_sinks")


def _masked_median(x_LBTH: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """(L, B, 1, H) median over the valid tokens of each response (lower median; 0 for an empty response)."""
    filled = x_LBTH.masked_fill(~mask_BT[None, :, :, None], float("nan"))
    med = torch.nanmedian(filled, dim=2, keepdim=True).values
    return torch.nan_to_num(med, nan=0.0)


@dataclass
class ConnectivityParts:
    """`connectivity_from_masses` in two halves: these per-token sums, taken where the masses are (2-3 kernels:
    the masses of every layer and head are reduced here), and `finish`, which can run elsewhere, e.g. on the host
    after an asynchronous copy (about 24 small ops: the masked median, the means, the profile's normalisation),
    so that a trainer's forward launches only the first half. (L, B, T, H) and (B, T, R) floats, far smaller
    than the (L, B, T, H, R) masses.

    visual_LBTH: each (layer, head)'s visual mass on each response token (`drop_sinks`: after its floors).
    region_BTR: the mass on each region summed over layers and heads (the profile's scale does not matter).
    head_baseline: `finish` subtracts each (layer, head)'s median visual mass.
    """

    visual_LBTH: torch.Tensor
    region_BTR: torch.Tensor
    head_baseline: bool

    def to(self, device: torch.device | str, non_blocking: bool = False) -> ConnectivityParts:
        return ConnectivityParts(self.visual_LBTH.to(device, non_blocking=non_blocking),
                                 self.region_BTR.to(device, non_blocking=non_blocking), self.head_baseline)

    def finish(self, mask_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) connectivity and (B, T, R) region profiles, zeros on padding (see `connectivity_from_masses`)."""
        valid = mask_BT.to(self.visual_LBTH.device, torch.bool)
        visual = self.visual_LBTH.masked_fill(~valid[None, :, :, None], 0.0)
        if self.head_baseline:
            visual = (visual - _masked_median(visual, valid)).clamp(min=0)
        conn = visual.mean(dim=(0, 3)) * valid
        region = self.region_BTR.masked_fill(~valid[..., None], 0.0)
        total = region.sum(-1, keepdim=True)
        profile = torch.where(total > 0, region / total.clamp(min=1e-30), torch.zeros_like(region))
        return conn, profile


def connectivity_parts(masses_LBTHR: torch.Tensor, mask_BT: torch.Tensor, sink_debias: str = "head_baseline"
                       ) -> ConnectivityParts:
    """The first half of `connectivity_from_masses`, on the masses' device; `.finish(mask_BT)` completes it."""
    if sink_debias not in SINK_DEBIAS:
        raise ValueError(f"sink_debias={sink_debias!r}: choose from {SINK_DEBIAS}")
    if masses_LBTHR.ndim != 5 or masses_LBTHR.shape[1:3] != mask_BT.shape:
        raise ValueError(f"masses_LBTHR must be (L, B, T, H, R) with (B, T) = {tuple(mask_BT.shape)}, "
                         f"got {tuple(masses_LBTHR.shape)}")
    m = masses_LBTHR.float()
    if sink_debias == "drop_sinks":
        valid = mask_BT.to(m.device, torch.bool)[None, :, :, None, None]
        m = torch.where(valid, m, torch.zeros((), dtype=m.dtype, device=m.device))
        floor = m.masked_fill(~valid, float("inf")).amin(dim=2, keepdim=True)
        floor = torch.where(torch.isinf(floor), torch.zeros_like(floor), floor)
        m = (m - floor).clamp(min=0)
    return ConnectivityParts(m.sum(-1), m.sum(dim=(0, 3)), sink_debias == "head_baseline")


def connectivity_from_masses(masses_LBTHR: torch.Tensor, mask_BT: torch.Tensor, sink_debias: str = "head_baseline"
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Connectivity (B, T) and region profiles (B, T, R) of response tokens; zeros on padding.

    Args:
        masses_LBTHR: attention mass of each response token on each region, per probed layer and head.
        mask_BT: bool, True on real response tokens.
        sink_debias: one of SINK_DEBIAS (see the module docstring).
    """
    return connectivity_parts(masses_LBTHR, mask_BT, sink_debias).finish(mask_BT)
