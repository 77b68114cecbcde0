"""Measuring: which image regions each generated token attends to, inside the fused attention call.

    probe = ConnectivityProbe(model)                       # probe-capable attention, selects layers
    with probe.capture(batch["input_ids"], batch.get("image_grid_thw"), response_len=T) as cap:
        out = model(**batch, use_cache=False)              # the forward pass the trainer already makes
    conn_BT, profile_BTR = cap.connectivity(completion_mask_BT)

Response layout (TRL's): the T response tokens are the last T positions of the sequence, right-padded by
`completion_mask`. Token t's connectivity is measured at the position that predicts it (t - 1), the row
whose attention produced it (`shift=True`); `shift=False` uses the token's own position.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from .attention import PROBE_ATTENTION, ROUTES, ProbeState, activate, deactivate, install_probe_attention
from .connectivity import SINK_DEBIAS, ConnectivityParts, connectivity_from_masses, connectivity_parts
from .layout import ProbeError, VisionLayout

__all__ = ["SINK_DEBIAS", "Capture", "ConnectivityParts", "ConnectivityProbe", "ProbeError", "VisionLayout",
           "connectivity_from_masses", "connectivity_parts", "default_probe_layers", "full_attention_layers",
           "probe_layers_for"]


def default_probe_layers(num_layers: int, count: int = 4) -> list[int]:
    """Up to `count` layers spread over the second half of the decoder, never the last one when there are
    three or more (28 layers -> 14, 17, 21, 24; 36 -> 18, 22, 27, 31; 4 -> 2).

    The last layer turns the state into a next-token prediction rather than reading the image: in the
    embedded 4-layer default its connectivity ranks the token that reads the image (a colour's first letter)
    above the other tokens with ROC AUC 0.62, against 0.86 for layer 2 (`benchmarks/probe_layers.py`).
    """
    if num_layers < 1:
        raise ProbeError("the decoder has no layers")
    half = num_layers // 2
    top = num_layers - 2 if num_layers >= 3 else num_layers - 1
    picks = {min(top, half + (i * (num_layers - half)) // count) for i in range(count)}
    return sorted(picks)


def full_attention_layers(text_config) -> list[int] | None:
    """The decoder layers that attend over the whole sequence, where the config says which do (`layer_types`:
    Gemma 3 alternates sliding-window and full layers); None where every layer does."""
    types = getattr(text_config, "layer_types", None)
    if not types or all(t == "full_attention" for t in types):
        return None
    return [i for i, t in enumerate(types) if t == "full_attention"]


def probe_layers_for(num_layers: int, layers: Sequence[int] | None = None,
                     full_layers: Sequence[int] | None = None) -> list[int]:
    """The decoder layers to probe: `layers` (checked against the decoder's `num_layers`), or the default: spread
    as `default_probe_layers` says over the layers that attend over the whole sequence (`full_layers`; all when
    None). A sliding-window layer sees only its window: an image further back than that gets no mass there."""
    if layers is not None:
        chosen = sorted(set(layers))
    elif full_layers:
        chosen = [list(full_layers)[i] for i in default_probe_layers(len(full_layers))]
    else:
        chosen = default_probe_layers(num_layers)
    bad = [i for i in chosen if not 0 <= i < num_layers]
    if bad:
        raise ProbeError(f"probe layers {bad} out of range: the decoder has {num_layers} layers")
    return chosen


@dataclass
class Capture:
    """Region masses recorded during one probed forward."""

    state: ProbeState
    layers: list[int]
    response_len: int | None

    @property
    def batch_size(self) -> int:
        return self.state.batch_shape[0]

    def masses(self, shift: bool = True) -> torch.Tensor:
        """(L, B, T, H, R) masses of the response rows (T = response_len)."""
        if not self.state.masses:
            raise ProbeError("no probe recorded anything: was the model called inside `capture`?")
        missing = [layer for layer in self.layers if layer not in self.state.masses]
        if missing:
            raise ProbeError(f"probed layers {missing} did not run in the forward")
        stacked = torch.stack([self.state.masses[layer] for layer in self.layers])  # (L, B, S_kept, H, R)
        if self.response_len is None:
            return stacked
        T = self.response_len
        return stacked[:, :, -T - 1:-1] if shift else stacked[:, :, -T:]

    def connectivity(self, mask_BT: torch.Tensor, sink_debias: str = "head_baseline", shift: bool = True
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T) connectivity and (B, T, R) region profiles of the response tokens."""
        return self.connectivity_parts(mask_BT, sink_debias, shift).finish(mask_BT)

    def connectivity_parts(self, mask_BT: torch.Tensor, sink_debias: str = "head_baseline", shift: bool = True
                           ) -> ConnectivityParts:
        """The half of `connectivity` that runs on the masses' device (a stack and two sums); its `finish(mask_BT)`
        gives the same (B, T) connectivity and (B, T, R) profiles wherever it runs, e.g. on the host after
        `.to("cpu", non_blocking=True)`: a trainer's forward then launches 3 kernels per capture instead of 27."""
        masses = self.masses(shift)
        if masses.shape[2] != mask_BT.shape[1]:
            raise ProbeError(f"mask covers {mask_BT.shape[1]} response tokens, capture has {masses.shape[2]}")
        return connectivity_parts(masses, mask_BT, sink_debias)


class ConnectivityProbe:
    """Set up probes on a VLM's decoder (the vision tower is untouched).

    Args:
        model: a transformers VLM whose decoder runs SDPA (the default) or a FlashAttention flavour
            (`attn_implementation="flash_attention_2"` etc.; the probe then runs inside that kernel).
        layers: decoder layer indices to probe; default `default_probe_layers`.
        region_grid: (rows, cols) cells each image's token grid (and each video frame's) is pooled into.
        time_bins: stretches of time each video is cut into, each with its own `region_grid` (the Qwen families'
            videos): a token's profile then says when, as well as where, it looked.
        pad_qk: on the fused route, zero-pad Q/K to V's widened head size (default). SDPA's fused kernels
            (flash on CUDA and on the CPU) take only equal head sizes; without the padding a probed layer falls
            back to a slower kernel (the math path on the CPU). Always on under FlashAttention.
        route: "auto" (default: a second, no-grad call when a gradient flows through the layer, else one
            widened call), "fused" or "split"; see `atrl.probe.attention`. The masses are the same.
        processor: the model's processor; needed for Idefics3 / SmolVLM, whose tiles are marked in the prompt by
            tokens whose ids the processor knows (other families ignore it).
    """

    def __init__(self, model, layers: Sequence[int] | None = None, region_grid: tuple[int, int] = (4, 4),
                 pad_qk: bool = True, route: str = "auto", processor=None, time_bins: int = 4):
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.utils.generic import is_flash_attention_requested

        self.model = model
        self.layout = VisionLayout.from_model(model, processor)  # the processor: Idefics3's tile marks
        decoder = model.get_decoder()
        # softmax self-attention per layer; a hybrid decoder's linear-attention layers (Qwen3.5) have none
        attn_modules = {i: layer.self_attn for i, layer in enumerate(decoder.layers) if hasattr(layer, "self_attn")}
        full = full_attention_layers(model.config.get_text_config())
        if len(attn_modules) < len(decoder.layers):
            full = sorted(set(full or attn_modules) & set(attn_modules))
        self.layers = probe_layers_for(len(decoder.layers), layers, full)
        linear = [i for i in self.layers if i not in attn_modules]
        if linear:
            raise ProbeError(f"probe layers {linear} are linear-attention layers, which compute no softmax over "
                             f"the image tokens to measure; probe full-attention layers: {sorted(attn_modules)}")
        self.layer_of_module = {id(attn_modules[i]): i for i in self.layers}
        self.region_grid = region_grid
        if not isinstance(time_bins, int) or time_bins < 1:
            raise ProbeError(f"time_bins={time_bins!r}: must be an integer >= 1")
        self.time_bins = time_bins
        self.pad_qk = pad_qk
        if route not in ROUTES:
            raise ProbeError(f"route={route!r}: choose from {ROUTES}")
        self.route = route
        self._base = model.config.get_text_config()._attn_implementation or "sdpa"
        if self._base == PROBE_ATTENTION:  # a second probe on the same model
            self._base = "sdpa"
        flash = is_flash_attention_requested(requested_attention_implementation=self._base)
        if self._base != "sdpa" and not (flash and self._base in ALL_ATTENTION_FUNCTIONS):
            raise ProbeError(f"probes run inside SDPA or FlashAttention; this model's decoder uses {self._base!r}: "
                             "load it with attn_implementation='sdpa' (or 'flash_attention_2' where installed)")
        name = install_probe_attention(self._base)
        if name != self._base:
            model.set_attn_implementation({"text_config": name})

    def detach(self) -> None:
        """Give the decoder back its own attention (a FlashAttention entry stays wrapped, as a pass-through)."""
        if self._base == "sdpa":
            self.model.set_attn_implementation({"text_config": "sdpa"})

    def _new_state(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                   response_len: int | None, image_sizes: torch.Tensor | None = None,
                   video_grid_thw: torch.Tensor | None = None) -> ProbeState:
        """An empty record keeping the last response_len + 1 rows, with this batch's region indicators deferred to
        the first probed layer (see `VisionLayout.deferred_indicators`: no host sync here)."""
        if response_len is not None and not 0 < response_len < input_ids.shape[1]:
            raise ProbeError(f"response_len={response_len} must be in [1, {input_ids.shape[1] - 1}]")
        dtype = next(self.model.parameters()).dtype
        indicators = self.layout.deferred_indicators(input_ids, image_grid_thw, self.region_grid, dtype=dtype,
                                                     image_sizes=image_sizes, video_grid_thw=video_grid_thw,
                                                     time_bins=self.time_bins)
        return ProbeState(indicators, self.layer_of_module, keep_last=response_len + 1 if response_len else None,
                          pad_qk=self.pad_qk, route=self.route, batch_shape=tuple(input_ids.shape))

    @contextmanager
    def capture(self, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                response_len: int | None = None, image_sizes: torch.Tensor | None = None, *,
                video_grid_thw: torch.Tensor | None = None) -> Iterator[Capture]:
        """Record region masses for one forward of `input_ids` (B, S) run inside the `with` block.

        `image_grid_thw` and `video_grid_thw` (the Qwen families, GLM-4.1V) and `image_sizes` (InternVL,
        LLaVA-OneVision) are the batch's own, as the processor gave them to the forward: they say how each image's
        and video's tokens are laid out.
        `response_len` T keeps only the rows the response needs (the last T + 1 positions), which bounds the
        memory at L x B x (T + 1) x H x R floats.
        """
        state = self._new_state(input_ids, image_grid_thw, response_len, image_sizes, video_grid_thw)
        token = activate(state)
        try:
            yield Capture(state, self.layers, response_len)
        finally:
            deactivate(token)

    @contextmanager
    def record_forwards(self, response_len: int, on_record: Callable[[Capture], None] | None = None
                        ) -> Iterator[list[Capture]]:
        """Capture every call of the model inside the block, one `Capture` per call, in order.

        For a trainer whose forward passes happen inside library code (e.g. TRL scoring chunks of a batch): the
        model's own forward hooks read `input_ids`, `image_grid_thw`, `video_grid_thw` and `image_sizes` from each
        call, so nothing
        else changes.
        `on_record(capture)` runs once per call, as soon as the call's last probed layer has recorded (inside
        the forward: the layers after it, the LM head and the next chunk are still to compute), so that its
        rows can be handed on early, e.g. to the credit workers. A call whose probed layers did not all run
        gets it as the call returns, and reading that capture raises the ProbeError that says so.
        """
        records: list[Capture] = []
        open_tokens: list = []

        def before(module, args, kwargs):
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            if input_ids is None:
                raise ProbeError("record_forwards: the model was called without input_ids")
            state = self._new_state(input_ids, kwargs.get("image_grid_thw"), response_len, kwargs.get("image_sizes"),
                                    kwargs.get("video_grid_thw"))
            capture = Capture(state, self.layers, response_len)
            if on_record is not None:
                state.on_complete = lambda: on_record(capture)
            open_tokens.append(activate(state))
            records.append(capture)

        def after(module, args, kwargs, output):
            deactivate(open_tokens.pop())
            records[-1].state.finish()  # a no-op unless the call's probed layers did not all run

        h_before = self.model.register_forward_pre_hook(before, with_kwargs=True)
        h_after = self.model.register_forward_hook(after, with_kwargs=True)
        try:
            yield records
        finally:
            h_before.remove()
            h_after.remove()
            while open_tokens:  # a forward that raised never reached its post-hook
                deactivate(open_tokens.pop())
