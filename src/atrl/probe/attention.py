"""Visual-attention probes inside the model's own fused attention call (DESIGN 3.1).

On a probed decoder layer, R indicator channels are appended to V (channel r is 1 on region r's image
tokens, 0 elsewhere). The fused kernel then returns, for every query token and head, the extra output
channels `sum over region r's image tokens of softmax(Q K^T)`: the attention mass on each region, exactly,
with no T x T matrix. The extra channels are detached and stripped before `o_proj`, so the layer's output
and gradients are those of plain attention.

Registered through transformers' `AttentionInterface` under the name "atrl_probe" (with the SDPA mask
builder). Layers without probes, and any forward outside `ProbeState` activation, take the plain SDPA path.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

PROBE_ATTENTION = "atrl_probe"

_ACTIVE: contextvars.ContextVar["ProbeState | None"] = contextvars.ContextVar("atrl_probe_state", default=None)


@dataclass
class ProbeState:
    """What one probed forward needs and what it records.

    indicators: (B, S, R) region indicators of the key positions.
    layer_of_module: id(attention module) -> decoder layer index, for the probed layers only.
    keep_last: keep only the last `keep_last` query rows (the response rows) of each record; None = all.
    pad_qk: zero-pad Q and K to V's widened head size (for kernels that need equal sizes).
    masses: decoder layer index -> (B, S_kept, H, R) float32 attention mass on each region (detached).
    """

    indicators: torch.Tensor
    layer_of_module: dict[int, int]
    keep_last: int | None = None
    pad_qk: bool = False
    masses: dict[int, torch.Tensor] = field(default_factory=dict)


def probe_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            **kwargs):
    """AttentionInterface function: SDPA, plus region-mass channels on probed layers.

    query: (B, H, S_q, D); key, value: (B, H_kv, S_k, D). Returns ((B, S_q, H, D), None) like SDPA's wrapper.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _ACTIVE.get()
    layer = state.layer_of_module.get(id(module)) if state is not None else None
    record = layer is not None
    if layer is not None:
        # Kept on the module so that activation checkpointing, which re-runs this forward inside backward
        # (after the capture has closed), recomputes the same widened attention and finds the saved shapes.
        module.__dict__["_atrl_probe_state"] = state
    elif torch._C._current_graph_task_id() != -1 and "_atrl_probe_state" in module.__dict__:
        state = module.__dict__["_atrl_probe_state"]
        layer = state.layer_of_module.get(id(module))
    else:  # a plain forward: a later recompute must take the plain path too
        module.__dict__.pop("_atrl_probe_state", None)
    if layer is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    ind = state.indicators
    B, H_kv, S_k, D = value.shape
    if ind.shape[:2] != (B, S_k):
        raise RuntimeError(
            f"atrl probe on layer {layer}: keys cover {S_k} positions but the probe was set up for "
            f"{ind.shape[1]} (batch {ind.shape[0]} vs {B}); probes measure a full-sequence forward, not "
            "cached generation: call the model with use_cache=False on the whole sequence")
    R = ind.shape[-1]
    # (B, H_kv, S_k, D + R): one shared indicator block per KV head; GQA query heads read their group's copy.
    widened = torch.cat([value, ind.to(value.dtype)[:, None].expand(B, H_kv, S_k, R)], dim=-1)
    if scaling is None:
        scaling = 1.0 / math.sqrt(D)
    if state.pad_qk:
        query = F.pad(query, (0, R))
        key = F.pad(key, (0, R))
    out, _ = sdpa_attention_forward(module, query, key, widened, attention_mask, dropout=dropout, scaling=scaling,
                                    **kwargs)  # (B, S_q, H, D + R)
    if record:
        rows = out[:, -state.keep_last:] if state.keep_last else out
        state.masses[layer] = rows[..., D:].detach().float()
    return out[..., :D], None


def register_probe_attention() -> None:
    """Register "atrl_probe" with transformers (idempotent); called when a probe is set up, not on import."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    if PROBE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
        AttentionInterface.register(PROBE_ATTENTION, probe_attention_forward)
        AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)


def activate(state: ProbeState) -> contextvars.Token:
    return _ACTIVE.set(state)


def deactivate(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)
