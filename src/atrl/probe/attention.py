"""Visual-attention probes inside the model's own fused attention call (DESIGN 3.1).

On a probed decoder layer, R indicator channels are appended to V (channel r is 1 on region r's image
tokens, 0 elsewhere). The fused kernel then returns, for every query token and head, the extra output
channels `sum over region r's image tokens of softmax(Q K^T)`: the attention mass on each region, exactly,
with no T x T matrix. The extra channels are detached and stripped before `o_proj`, so the layer's output
and gradients are those of plain attention.

Two routes into transformers' `AttentionInterface`, one wrapper (`probed_attention`) for both:
- SDPA: the decoder is switched to "atrl_probe" (SDPA plus probes, with the SDPA mask builder); the vision
  tower keeps "sdpa".
- FlashAttention (any implementation whose name says "flash": flash_attention_2/3/4, hub kernels): the
  registry entry of that name is wrapped in place, because transformers' flash plumbing (padding mask,
  varlen unpadding, which kernel to import) keys on the name the config carries. The wrapper passes every
  call through untouched except a probed layer's inside an active capture. FlashAttention needs one head
  size for Q, K and V, so Q and K are zero-padded to V's widened size (scores unchanged: the scale is
  passed explicitly).
Layers without probes, and any forward outside `ProbeState` activation, take the plain path.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .layout import ProbeError

PROBE_ATTENTION = "atrl_probe"
FLASH_MAX_HEAD_SIZE = 256  # FlashAttention 2 and 3 take head sizes up to 256

_ACTIVE: contextvars.ContextVar["ProbeState | None"] = contextvars.ContextVar("atrl_probe_state", default=None)


@dataclass
class ProbeState:
    """What one probed forward needs and what it records.

    indicators: (B, S, R) region indicators of the key positions.
    layer_of_module: id(attention module) -> decoder layer index, for the probed layers only.
    keep_last: keep only the last `keep_last` query rows (the response rows) of each record; None = all.
    pad_qk: zero-pad Q and K to V's widened head size (for kernels that need equal sizes).
    on_complete: called once, inside the forward, right after the last probed layer has recorded (the rest of
        the forward is still to run), so that the masses can be handed on early.
    masses: decoder layer index -> (B, S_kept, H, R) float32 attention mass on each region (detached).
    """

    indicators: torch.Tensor
    layer_of_module: dict[int, int]
    keep_last: int | None = None
    pad_qk: bool = False
    on_complete: Callable[[], None] | None = None
    masses: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return len(self.masses) == len(set(self.layer_of_module.values()))

    def finish(self) -> None:
        """Call `on_complete` if it has not been called yet."""
        done, self.on_complete = self.on_complete, None
        if done is not None:
            done()


def _probe_of(module: torch.nn.Module) -> tuple[ProbeState | None, int | None, bool]:
    """(state, probed layer index or None, whether to record) for this call of `module`'s attention."""
    state = _ACTIVE.get()
    layer = state.layer_of_module.get(id(module)) if state is not None else None
    if layer is not None:
        # Kept on the module so that activation checkpointing, which re-runs this forward inside backward
        # (after the capture has closed), recomputes the same widened attention and finds the saved shapes.
        module.__dict__["_atrl_probe_state"] = state
        return state, layer, True
    if torch._C._current_graph_task_id() != -1 and "_atrl_probe_state" in module.__dict__:
        state = module.__dict__["_atrl_probe_state"]
        return state, state.layer_of_module.get(id(module)), False
    module.__dict__.pop("_atrl_probe_state", None)  # a plain forward: a later recompute takes the plain path too
    return None, None, False


def probed_attention(base: Callable, equal_head_sizes: bool = False) -> Callable:
    """An AttentionInterface function: `base`, plus region-mass channels on probed layers.

    base: a transformers attention function (module, query, key, value, attention_mask, **kw) -> (out, w),
        query (B, H, S_q, D), key/value (B, H_kv, S_k, D), out (B, S_q, H, D_v).
    equal_head_sizes: the kernel needs Q, K and V of one head size (FlashAttention): always pad Q and K.
    """

    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs):
        state, layer, record = _probe_of(module)
        if layer is None:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        ind = state.indicators
        B, H_kv, S_k, D = value.shape
        if ind.shape[:2] != (B, S_k):
            raise RuntimeError(
                f"atrl probe on layer {layer}: keys cover {S_k} positions but the probe was set up for "
                f"{ind.shape[1]} (batch {ind.shape[0]} vs {B}); probes measure a full-sequence forward, not "
                "cached generation: call the model with use_cache=False on the whole sequence")
        R = ind.shape[-1]
        if equal_head_sizes and D + R > FLASH_MAX_HEAD_SIZE:
            raise ProbeError(
                f"atrl probe on layer {layer}: head size {D} + {R} region channels exceeds FlashAttention's "
                f"{FLASH_MAX_HEAD_SIZE}; use a smaller anchor.region_grid (regions = most images in one sample x "
                "cells per image) or load the model with attn_implementation='sdpa'")
        # (B, H_kv, S_k, D + R): one shared indicator block per KV head; GQA query heads read their group's copy.
        widened = torch.cat([value, ind.to(value.dtype)[:, None].expand(B, H_kv, S_k, R)], dim=-1)
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])
        if state.pad_qk or equal_head_sizes:
            query = F.pad(query, (0, R))
            key = F.pad(key, (0, R))
        out, _ = base(module, query, key, widened, attention_mask, dropout=dropout, scaling=scaling,
                      **kwargs)  # (B, S_q, H, D + R)
        if record:
            rows = out[:, -state.keep_last:] if state.keep_last else out
            state.masses[layer] = rows[..., D:].detach().float()
            if state.complete:
                state.finish()
        return out[..., :D], None

    forward.atrl_base = base
    return forward


def install_probe_attention(implementation: str) -> str:
    """Make `implementation` ("sdpa" or a flash flavour) probe-capable; returns the name the decoder must use.

    Idempotent; called when a probe is set up, not on import.
    """
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if implementation in ("sdpa", PROBE_ATTENTION):
        if PROBE_ATTENTION not in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping:
            AttentionInterface.register(PROBE_ATTENTION, probed_attention(sdpa_attention_forward))
            AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)
        return PROBE_ATTENTION
    current = ALL_ATTENTION_FUNCTIONS[implementation]
    if not hasattr(current, "atrl_base"):  # the instance's own mapping wins over the class-wide one
        ALL_ATTENTION_FUNCTIONS[implementation] = probed_attention(current, equal_head_sizes=True)
    return implementation


def activate(state: ProbeState) -> contextvars.Token:
    return _ACTIVE.set(state)


def deactivate(token: contextvars.Token) -> None:
    _ACTIVE.reset(token)
