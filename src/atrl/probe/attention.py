"""Visual-attention probes inside the model's own fused attention kernel (docs/ALGORITHM.md, Probes).

A probed decoder layer gives the kernel R indicator channels as values (channel r is 1 on region r's image
tokens, 0 elsewhere). The kernel then returns, for every query token and head, `sum over region r's image
tokens of softmax(Q K^T)`: the attention mass on each region, exactly, with no T x T matrix. Two routes, chosen
per call (`ProbeState.route`, default "auto"):
- fused (no gradient flows through the call: the no-grad old-log-prob pass, evaluation, the first forward of
  reentrant activation checkpointing): one call, V widened to [V | indicators]. The extra output channels are
  detached and stripped before `o_proj`. Cheapest: the region channels add about a third of a forward.
- split (a gradient flows through the call): the plain call, untouched, and a second, no-grad call on the same
  Q, K and mask with the indicators, zero-padded to V's head size, as its values. The backward is then the plain
  one; widening the call widens its backward too, which makes a probed layer's attention call cost about 4x the
  split route's extra time on an H100 (docs/benchmarks.md, Probe overhead). The second call has the plain
  call's shapes, so it gets the same kernel on every backend, and the layer's output is the plain call's own.
  Under SDPA that call goes to SDPA directly (`_sdpa_masses`), and does less where that keeps the plain call's
  kernel: it computes only the rows the capture keeps (the response rows), SDPA's causal triangle aligned at
  the bottom right, or the padding mask's last rows (`_bias_keeps_kernel`: the bias reaches flash and
  memory-efficient attention, not cuDNN), and its values are the indicator channels alone, not padded to the
  head size (`_narrow_keeps_kernel`: cuDNN and memory-efficient attention take a narrower V, flash does not).
Inside a backward (an activation-checkpointing recompute) a probed layer runs plain and records nothing.

Two entries into transformers' `AttentionInterface`, one wrapper (`probed_attention`) for both:
- SDPA: the decoder is switched to "atrl_probe" (SDPA plus probes, with the SDPA mask builder); the vision
  tower keeps "sdpa".
- FlashAttention (any implementation whose name says "flash": flash_attention_2/3/4, hub kernels): the
  registry entry of that name is wrapped in place, because transformers' flash plumbing (padding mask,
  varlen unpadding, which kernel to import) keys on the name the config carries. The wrapper passes every
  call through untouched except a probed layer's inside an active capture. FlashAttention needs one head
  size for Q, K and V, so on the fused route Q and K are zero-padded to V's widened size (scores unchanged:
  the scale is passed explicitly).
Layers without probes, and any forward outside `ProbeState` activation, take the plain path.
"""

from __future__ import annotations

import contextvars
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from .layout import ProbeError

PROBE_ATTENTION = "atrl_probe"
FLASH_MAX_HEAD_SIZE = 256  # FlashAttention 2 and 3 take head sizes up to 256
ROUTES = ("auto", "fused", "split")

_ACTIVE: contextvars.ContextVar["ProbeState | None"] = contextvars.ContextVar("atrl_probe_state", default=None)
# call shapes whose narrow values a kernel refused although SDPA's choice took them (process-wide: not tried again)
_NARROW_REFUSED: set[tuple] = set()
logger = logging.getLogger("atrl")


@dataclass
class ProbeState:
    """What one probed forward needs and what it records.

    indicators: (B, S, R) region indicators of the key positions, or a function that builds them, called at the
        first probed layer (`VisionLayout.deferred_indicators`: the capture then never waits for the device).
    layer_of_module: id(attention module) -> decoder layer index, for the probed layers only.
    keep_last: keep only the last `keep_last` query rows (the response rows) of each record; None = all.
    pad_qk: on the fused route, zero-pad Q and K to V's widened head size (for kernels that need equal sizes).
    route: "auto" (split when a gradient flows through the call, else fused), "fused" or "split" (see the module
        docstring).
    on_complete: called once, inside the forward, right after the last probed layer has recorded (the rest of
        the forward is still to run), so that the masses can be handed on early.
    masses: decoder layer index -> (B, S_kept, H, R) float32 attention mass on each region (detached).
    """

    indicators: torch.Tensor | Callable[[], torch.Tensor]
    layer_of_module: dict[int, int]
    keep_last: int | None = None
    pad_qk: bool = False
    route: str = "auto"
    on_complete: Callable[[], None] | None = None
    masses: dict[int, torch.Tensor] = field(default_factory=dict)
    batch_shape: tuple[int, int] = ()  # (B, S); taken from `indicators` when they are a tensor
    _values: dict[tuple, torch.Tensor] = field(default_factory=dict, repr=False)
    _kernel_checks: dict[tuple, bool] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.route not in ROUTES:
            raise ProbeError(f"probe route {self.route!r}: choose from {ROUTES}")
        if isinstance(self.indicators, torch.Tensor):
            self.batch_shape = tuple(self.indicators.shape[:2])
        elif len(self.batch_shape) != 2:
            raise ProbeError("a ProbeState with deferred indicators needs batch_shape=(B, S)")

    def region_indicators(self) -> torch.Tensor:
        """The (B, S, R) indicators, built on first use when they were deferred."""
        if not isinstance(self.indicators, torch.Tensor):
            self.indicators = self.indicators()
        return self.indicators

    @property
    def complete(self) -> bool:
        return len(self.masses) == len(set(self.layer_of_module.values()))

    def finish(self) -> None:
        """Call `on_complete` if it has not been called yet."""
        done, self.on_complete = self.on_complete, None
        if done is not None:
            done()

    def indicator_values(self, heads: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(B, heads, S, width) values for the split route's second call: the R indicator channels, then zeros.
        Built once per forward (every probed layer of a model has the same shapes)."""
        key = (heads, width, like.dtype, like.device)
        if key not in self._values:
            ind = self.region_indicators()
            B, S, R = ind.shape
            values = torch.zeros(B, heads, S, width, dtype=like.dtype, device=like.device)
            values[..., :R] = ind.to(like.dtype)[:, None]
            self._values[key] = values
        return self._values[key]

    def kernel_check(self, check: Callable[..., bool], *args) -> bool:
        """`check(*args)` (`_bias_keeps_kernel`, `_narrow_keeps_kernel`: SDPA's kernel choice, read from shapes),
        asked once per forward and shapes: every probed layer of a model asks it with the same ones."""
        key = (check, *((tuple(a.shape), a.dtype, a.device) if isinstance(a, torch.Tensor) else a for a in args))
        if key not in self._kernel_checks:
            self._kernel_checks[key] = check(*args)
        return self._kernel_checks[key]

    def record(self, layer: int, out_BSHW: torch.Tensor, start: int) -> None:
        """Keep channels start .. start + R - 1 of a call's output (B, S_q, H, W) as the layer's region masses."""
        R = self.region_indicators().shape[-1]
        rows = out_BSHW[:, -self.keep_last:] if self.keep_last and out_BSHW.shape[1] > self.keep_last else out_BSHW
        masses = rows if start == 0 and rows.shape[-1] == R else rows[..., start:start + R]
        masses = masses.detach() if masses.requires_grad else masses
        # a float32 copy of its own: a view would keep the call's whole output alive until the capture is read
        self.masses[layer] = masses.clone() if masses.dtype == torch.float32 else masses.float()
        if self.complete:
            self.finish()


def _probe_of(module: torch.nn.Module) -> tuple[ProbeState | None, int | None]:
    """(state, probed layer index) for this call of `module`'s attention; (None, None) takes the plain path.

    Inside a backward (`_current_graph_task_id` set: activation checkpointing recomputing this forward) the call
    is plain. With reentrant checkpointing the first forward ran without gradients (the fused route recorded the
    masses there); with non-reentrant checkpointing it ran the split route, whose plain call is what the
    recompute must reproduce, shape for shape."""
    state = _ACTIVE.get()
    if state is None or torch._C._current_graph_task_id() != -1:
        return None, None
    return state, state.layer_of_module.get(id(module))


def _sdpa_masses(module: torch.nn.Module, state: ProbeState, query: torch.Tensor, key: torch.Tensor,
                 attention_mask: torch.Tensor | None, scaling: float, rows: str, values: str) -> torch.Tensor:
    """(B, rows, H, R) region masses of a full-sequence call's (S_q = S_k) query rows: the split route's second
    call, through SDPA directly, on the rows the capture keeps where that keeps the plain call's kernel.

    Rows: beside an explicit (B, 1, S, S) mask, its last rows, with K repeated per query head as transformers'
    SDPA route does beside a mask (the values then have one head per query head). Without one, under a causal
    triangle aligned at the bottom right (`causal_lower_right`, which SDPA's flash and memory-efficient kernels
    take as they are) where `rows` is "kept", or "auto" and `_bias_keeps_kernel`; else all rows, plain causal.
    Values: the R indicator channels rounded up to 8 ("narrow": less work for the kernel, and 8x less memory for
    the values at R = 16, D = 128) where SDPA picks the same kernel for them as for values of the head size
    (`_narrow_keeps_kernel`; e.g. cuDNN and memory-efficient attention take a narrower V, flash does not), else
    zero-padded to the head size ("wide"; Q and K padded too when R exceeds it). The output is sliced to the
    kept rows and the R channels before it is transposed: no copy of the whole output."""
    from torch.nn.attention.bias import causal_lower_right

    _, H, S, D = query.shape
    H_kv = key.shape[1]
    R = state.region_indicators().shape[-1]
    kept = min(state.keep_last or S, S)
    wide, narrow = max(D, R), -(-R // 8) * 8
    if attention_mask is not None:
        if H_kv != H:
            key = key.repeat_interleave(H // H_kv, dim=1)
        mask = attention_mask if attention_mask.shape[-1] == S else attention_mask[..., :S]
        q, mask, heads, causal, gqa = query[:, :, S - kept:], mask[:, :, S - kept:], H, False, False
    else:
        q, mask, heads, causal, gqa = query, None, H_kv, getattr(module, "is_causal", True), H_kv != H
        if causal and kept < S and (rows == "kept" or state.kernel_check(_bias_keeps_kernel, query, key, wide,
                                                                         scaling)):
            # the kept rows, under the bias: flash, which it reaches, takes only values as wide as Q and K
            q, mask, causal, values = query[:, :, S - kept:], causal_lower_right(kept, S), False, "wide"
    if values == "narrow" or (values == "auto" and narrow < wide):
        refused = (tuple(q.shape), tuple(key.shape), None if mask is None else tuple(mask.shape), causal, narrow,
                   q.dtype, q.device)
        if values == "narrow" or (refused not in _NARROW_REFUSED and state.kernel_check(
                _narrow_keeps_kernel, q, key, mask, causal, gqa, narrow, wide, scaling)):
            try:
                out = F.scaled_dot_product_attention(q, key, state.indicator_values(heads, narrow, key),
                                                     attn_mask=mask, is_causal=causal, scale=scaling, enable_gqa=gqa)
                return _rows_and_channels(out, kept, R)
            except torch.OutOfMemoryError:
                raise
            except RuntimeError as err:  # a kernel's own limits, past what SDPA's choice checks: wide is exact
                if values == "narrow":
                    raise
                _NARROW_REFUSED.add(refused)
                logger.warning("atrl probe: SDPA refused the indicator channels alone as values (Q %s, K %s, V %d "
                               "wide: %s); this shape's second call pads them to the head size from now on",
                               tuple(q.shape), tuple(key.shape), narrow,
                               str(err).splitlines()[0] if str(err) else err)
    q, key = _padded(q, wide), _padded(key, wide)
    out = F.scaled_dot_product_attention(q, key, state.indicator_values(heads, wide, key), attn_mask=mask,
                                         is_causal=causal, scale=scaling, enable_gqa=gqa)
    return _rows_and_channels(out, kept, R)


def _rows_and_channels(out_BHSW: torch.Tensor, rows: int, channels: int) -> torch.Tensor:
    """(B, rows, H, channels): the last rows and first channels of an SDPA output, as a view (no op where none is
    needed: each is a dispatch on the host)."""
    if out_BHSW.shape[2] > rows:
        out_BHSW = out_BHSW[:, :, -rows:]
    if out_BHSW.shape[3] > channels:
        out_BHSW = out_BHSW[..., :channels]
    return out_BHSW.transpose(1, 2)


def _padded(x: torch.Tensor, width: int) -> torch.Tensor:
    """Q or K zero-padded to head size `width` (the scores are unchanged: the scale is passed explicitly)."""
    return F.pad(x, (0, width - x.shape[-1])) if width > x.shape[-1] else x


def _shaped(x: torch.Tensor, width: int, force: bool = False) -> torch.Tensor:
    """`x`, or where its head size is below `width` (or `force`), an uninitialised tensor of its shape with head size
    `width`: enough for SDPA's kernel choice, which reads shapes, strides and dtypes only (nothing is launched)."""
    return x.new_empty(*x.shape[:3], width) if force or width > x.shape[-1] else x


def _narrow_keeps_kernel(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, causal: bool, gqa: bool,
                         narrow: int, wide: int, scaling: float) -> bool:
    """Whether SDPA picks the same kernel for values `narrow` channels wide as for values `wide` (Q and K padded
    to it where it exceeds their head size): then the narrow call does less of the same work. Shapes only:
    nothing is computed."""
    def pick(width: int) -> int:
        return torch._fused_sdp_choice(_shaped(query, width), _shaped(key, width), _shaped(key, width, force=True),
                                       mask, 0.0, causal, scale=scaling, enable_gqa=gqa)
    return pick(narrow) == pick(wide)


def _bias_keeps_kernel(query: torch.Tensor, key: torch.Tensor, width: int, scaling: float) -> bool:
    """Whether the kernel SDPA picks for the full causal call without a mask, with values `width` channels wide
    (Q and K padded to it where it exceeds their head size), is one that `causal_lower_right` also dispatches
    to: flash, or memory-efficient without GQA. Elsewhere computing fewer rows would switch kernels; e.g. where
    SDPA picks cuDNN for the full call (H100/H200 with recent torch), the bias would fall back to flash, which is
    1.5-2x slower than SDPA's pick at the probed layers' shapes on an H200. Shapes only."""
    from torch.nn.attention import SDPBackend

    gqa = query.shape[1] != key.shape[1]
    pick = torch._fused_sdp_choice(_shaped(query, width), _shaped(key, width), _shaped(key, width, force=True), None,
                                   0.0, True, scale=scaling, enable_gqa=gqa)
    return pick == SDPBackend.FLASH_ATTENTION.value or (pick == SDPBackend.EFFICIENT_ATTENTION.value and not gqa)


def probed_attention(base: Callable, equal_head_sizes: bool = False, rows: str = "all", values: str = "auto"
                     ) -> Callable:
    """An AttentionInterface function: `base`, plus region masses recorded on probed layers.

    base: a transformers attention function (module, query, key, value, attention_mask, **kw) -> (out, w),
        query (B, H, S_q, D), key/value (B, H_kv, S_k, D), out (B, S_q, H, D_v).
    equal_head_sizes: the kernel needs Q, K and V of one head size (FlashAttention).
    rows: which query rows the split route's second call computes. "all"; "kept": only the rows the capture
        keeps (`ProbeState.keep_last`, the response rows), with SDPA directly (`base` must be SDPA); "auto":
        "kept" where that keeps the plain call's kernel (always beside a padding mask, whose rows are sliced;
        without one, where `_bias_keeps_kernel`), else "all". "kept" and "auto" call SDPA directly
        (`_sdpa_masses`), "all" calls `base`.
    values: the split route's values when it calls SDPA directly: "auto" (the R indicator channels alone where
        SDPA picks the same kernel for them as for values of the head size, `_narrow_keeps_kernel`), "narrow"
        or "wide" (zero-padded to the head size, as through `base`).
    """
    if rows not in ("all", "kept", "auto"):
        raise ValueError(f"rows={rows!r}: choose from 'all', 'kept', 'auto'")
    if values not in ("auto", "narrow", "wide"):
        raise ValueError(f"values={values!r}: choose from 'auto', 'narrow', 'wide'")

    def forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                **kwargs):
        state, layer = _probe_of(module)
        if layer is None:
            return base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        B, H_kv, S_k, D = value.shape
        if state.batch_shape != (B, S_k):
            raise RuntimeError(
                f"atrl probe on layer {layer}: keys cover {S_k} positions but the probe was set up for "
                f"{state.batch_shape[1]} (batch {state.batch_shape[0]} vs {B}); probes measure a full-sequence "
                "forward, not cached generation: call the model with use_cache=False on the whole sequence")
        ind = state.region_indicators()
        R = ind.shape[-1]
        grads = torch.is_grad_enabled() and (query.requires_grad or key.requires_grad or value.requires_grad)
        split = state.route == "split" or (state.route == "auto" and grads)
        width = max(D, R) if split else D + R  # V's head size in the call that returns the masses
        if equal_head_sizes and width > FLASH_MAX_HEAD_SIZE:
            raise ProbeError(
                f"atrl probe on layer {layer}: head size {D} + {R} region channels exceeds FlashAttention's "
                f"{FLASH_MAX_HEAD_SIZE}; use a smaller anchor.region_grid (regions = most images in one sample x "
                "cells per image) or load the model with attn_implementation='sdpa'")
        if scaling is None:
            scaling = 1.0 / math.sqrt(query.shape[-1])
        if split:
            out, weights = base(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                **kwargs)
            with torch.no_grad():  # no graph is recorded here: Q and K go in as they are
                if rows != "all" and query.shape[2] == S_k:
                    masses = _sdpa_masses(module, state, query, key, attention_mask, scaling, rows, values)
                else:  # through `base`, V zero-padded to the head size (Q and K too, where R exceeds it)
                    masses, _ = base(module, _padded(query, width), _padded(key, width),
                                     state.indicator_values(H_kv, width, value), attention_mask, dropout=0.0,
                                     scaling=scaling, **kwargs)
            state.record(layer, masses, 0)
            return out, weights
        # (B, H_kv, S_k, D + R): one shared indicator block per KV head; GQA query heads read their group's copy.
        widened = torch.cat([value, ind.to(value.dtype)[:, None].expand(B, H_kv, S_k, R)], dim=-1)
        if state.pad_qk or equal_head_sizes:
            query = F.pad(query, (0, R))
            key = F.pad(key, (0, R))
        out, _ = base(module, query, key, widened, attention_mask, dropout=dropout, scaling=scaling,
                      **kwargs)  # (B, S_q, H, D + R)
        state.record(layer, out, D)
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
            AttentionInterface.register(PROBE_ATTENTION, probed_attention(sdpa_attention_forward, rows="auto"))
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
