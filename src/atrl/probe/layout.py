"""Where the image tokens are, per model family, and how they pool into regions (the one family adapter).

Shapes: B batch, S sequence, R regions. `region_indicators` returns the (B, S, R) 0/1 matrix whose column r
marks the image tokens of region r. Regions: each image's merged token grid (h, w) is cut into a
`region_grid` of (rh, rw) cells in raster order; the images of a sample come one after another, so
R = (most images in one sample) x rh x rw, and region r of sample b is cell r % (rh*rw) of its image
r // (rh*rw).

Families:
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) / Qwen3.5 / GLM-4.1V: `image_token_id`; image i has
  `prod(image_grid_thw[i]) / merge_size^2` tokens laid out as (t, h/merge, w/merge) in raster order; images are
  numbered across the batch in order.
- LLaVA: `image_token_index`; each image has `image_seq_length` tokens, a square grid.
- Gemma 3: `image_token_index`; each image has `mm_tokens_per_image` soft tokens (the tower's patches average-pooled
  to a square), a square grid.
- anything else with `image_token_id` / `image_token_index`: each run of image tokens is one image, laid
  out as a single row (1, n).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch


class ProbeError(ValueError):
    """A probe cannot be set up or used on this model or batch; the message says what to change."""


def _check_region_grid(region_grid: tuple[int, int]) -> tuple[int, int]:
    rh, rw = region_grid
    if rh < 1 or rw < 1:
        raise ProbeError(f"region_grid={region_grid}: both sides must be >= 1")
    return rh, rw


@dataclass(frozen=True)
class VisionLayout:
    family: str
    image_token_id: int
    merge_size: int | None = None  # Qwen families: tokens per image = prod(grid_thw) / merge_size**2
    tokens_per_image: int | None = None  # LLaVA: a fixed square grid

    @classmethod
    def from_model(cls, model) -> "VisionLayout":
        cfg = model.config
        model_type = getattr(cfg, "model_type", type(model).__name__)
        text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        if getattr(text, "cross_attention_layers", None):
            raise ProbeError(
                f"model type {model_type!r}: its text tokens read the image through cross-attention layers "
                f"{list(text.cross_attention_layers)[:4]}..., not through self-attention over image tokens in the "
                "sequence, which is what the probes measure (they would record zeros); train it with a mode "
                "without probes (uniform, entropy_8020, vppo: `atrl modes`)")
        token = getattr(cfg, "image_token_id", None)
        if token is None:
            token = getattr(cfg, "image_token_index", None)
        if token is None:
            folder = getattr(cfg, "_name_or_path", "")  # the checkpoint it was loaded from, if any
            where = f"model {folder!r} (type {model_type!r})" if folder else f"model type {model_type!r}"
            raise ProbeError(f"{where}: its config names no image token (image_token_id / image_token_index), so "
                             "image positions are unknown; a vision-language checkpoint's config.json has one")
        if model_type in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "qwen3_5", "glm4v"):
            return cls(model_type, int(token), merge_size=int(cfg.vision_config.spatial_merge_size))
        if model_type == "llava":
            return cls(model_type, int(token), tokens_per_image=int(cfg.image_seq_length))
        if model_type == "gemma3":  # a fixed square of soft tokens per image
            return cls(model_type, int(token), tokens_per_image=int(cfg.mm_tokens_per_image))
        return cls(model_type, int(token))

    def image_grids(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None = None
                    ) -> list[list[tuple[int, int]]]:
        """Per sample, the (rows, cols) token grid of each image in order of appearance."""
        return self._grids((input_ids_BS == self.image_token_id).cpu(), image_grid_thw)

    def _grids(self, is_image: torch.Tensor, image_grid_thw: torch.Tensor | None) -> list[list[tuple[int, int]]]:
        """`image_grids` from the (B, S) image-token mask on the host."""
        counts = is_image.sum(dim=1).tolist()
        grids: list[list[tuple[int, int]]] = []
        if self.merge_size is not None:
            if image_grid_thw is None:
                if any(counts):
                    raise ProbeError(f"{self.family}: image tokens present but image_grid_thw was not given")
                return [[] for _ in counts]
            sizes = [(int(t) * int(h) // self.merge_size, int(w) // self.merge_size)
                     for t, h, w in image_grid_thw.tolist()]
            k = 0
            for b, n in enumerate(counts):
                mine = []
                while n > 0:
                    if k >= len(sizes):
                        raise ProbeError(f"{self.family}: sample {b} has more image tokens than image_grid_thw "
                                         f"describes ({len(sizes)} images)")
                    mine.append(sizes[k])
                    n -= sizes[k][0] * sizes[k][1]
                    k += 1
                if n != 0:
                    raise ProbeError(f"{self.family}: sample {b}'s image tokens do not match image_grid_thw")
                grids.append(mine)
            return grids
        if self.tokens_per_image is not None:
            side = math.isqrt(self.tokens_per_image)
            shape = (side, side) if side * side == self.tokens_per_image else (1, self.tokens_per_image)
            for b, n in enumerate(counts):
                if n % self.tokens_per_image:
                    raise ProbeError(f"{self.family}: sample {b} has {n} image tokens, not a multiple of "
                                     f"{self.tokens_per_image} per image")
                grids.append([shape] * (n // self.tokens_per_image))
            return grids
        for row in is_image:
            padded = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int()
            starts = (padded.diff() == 1).nonzero().flatten()
            ends = (padded.diff() == -1).nonzero().flatten()
            grids.append([(1, int(e - s)) for s, e in zip(starts, ends)])
        return grids

    def deferred_indicators(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                            region_grid: tuple[int, int] = (4, 4), dtype: torch.dtype = torch.float32
                            ) -> Callable[[], torch.Tensor]:
        """`region_indicators`, built when the returned function is called, without draining the device's queue.

        The layout is read on the host. On a CUDA device, `input_ids` and `image_grid_thw` start copying to pinned
        host memory at once, behind the kernels already queued, and the build waits only for that copy (not for the
        kernels queued after it); the indicators go back to the device asynchronously. A capture calls it at the
        first probed layer, so the build overlaps the layers queued before it instead of draining the device's
        queue when the forward starts (on an H200 the eager build, two syncs, cost 0.54-0.60 ms per probed step
        with the device idle).
        A layout that does not match the batch raises its ProbeError when the function is called."""
        _check_region_grid(region_grid)
        device = input_ids_BS.device
        if device.type != "cuda":
            return functools.partial(self.region_indicators, input_ids_BS, image_grid_thw, region_grid, dtype)
        ids = input_ids_BS.to("cpu", non_blocking=True)
        grid = image_grid_thw.to("cpu", non_blocking=True) if image_grid_thw is not None else None
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))

        def build() -> torch.Tensor:
            copied.synchronize()
            return self._host_indicators(ids, grid, region_grid, dtype, pin=True).to(device, non_blocking=True)
        return build

    def region_indicators(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                          region_grid: tuple[int, int] = (4, 4), dtype: torch.dtype = torch.float32
                          ) -> torch.Tensor:
        """(B, S, R) 0/1 indicators of each region's image tokens (see the module docstring), on input_ids' device."""
        _check_region_grid(region_grid)
        return self._host_indicators(input_ids_BS, image_grid_thw, region_grid, dtype).to(input_ids_BS.device)

    def _host_indicators(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None,
                         region_grid: tuple[int, int], dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
        """`region_indicators` built on the host (in pinned memory with `pin`): one scatter of ones at (sample,
        position, region) for all the image tokens of the batch, which come in the order the images are laid out."""
        rh, rw = region_grid
        input_ids_BS = input_ids_BS.cpu()  # one copy to the host: everything below reads it there
        if image_grid_thw is not None:
            image_grid_thw = image_grid_thw.cpu()
        is_image = input_ids_BS == self.image_token_id
        grids = self._grids(is_image, image_grid_thw)
        R = rh * rw * max(1, max((len(g) for g in grids), default=0))
        B, S = input_ids_BS.shape
        out = torch.zeros(B, S, R, dtype=dtype, pin_memory=pin)
        cells = [_image_cells(h, w, rh, rw, i) for sample in grids for i, (h, w) in enumerate(sample)]
        if cells:
            b, s = is_image.nonzero(as_tuple=True)
            region = torch.cat(cells)
            if region.numel() != b.numel():  # image_grids checked every family's counts; this is the last guard
                raise ProbeError(f"{self.family}: {b.numel()} image tokens, the image grids cover {region.numel()}")
            out[b, s, region] = 1
        return out


@functools.lru_cache(maxsize=1024)
def _image_cells(h: int, w: int, rh: int, rw: int, image: int) -> torch.Tensor:
    """(h * w,) the region of each token of a sample's `image`-th image, its (h, w) token grid in raster order cut
    into (rh, rw) cells (cached: a batch's images mostly share a few grids). Read only."""
    idx = torch.arange(h * w)
    return image * rh * rw + ((idx // w) * rh // h) * rw + (idx % w) * rw // w
