"""Where the image tokens are, per model family, and how they pool into regions (the one family adapter).

Shapes: B batch, S sequence, R regions. `region_indicators` returns the (B, S, R) 0/1 matrix whose column r
marks the visual tokens of region r. Regions: each image is cut into a `region_grid` of (rh, rw) rectangles of
the picture in raster order, a block of rh x rw regions; a video is `time_bins` such blocks, one per stretch of
its time (temporal patch i of t falls in bin i * time_bins // t), each cut as an image is. A sample's images and
videos come one after another in prompt order, so R = (most blocks in one sample) x rh x rw, and region r of
sample b is rectangle r % (rh*rw) of its block r // (rh*rw). A token whose grid is coarser than the regions falls
in the region of its top-left corner.

Families:
- Qwen2-VL / Qwen2.5-VL / Qwen3-VL (dense and MoE) / Qwen3.5 / GLM-4.1V: `image_token_id`; image i has
  `prod(image_grid_thw[i]) / merge_size^2` tokens laid out as (t, h/merge, w/merge) in raster order; images are
  numbered across the batch in order. Videos likewise: `video_token_id`, `video_grid_thw`, (t, h/merge,
  w/merge) with t the temporal patches (frame pairs) in order; Qwen3-VL writes a timestamp between each t's
  tokens, which changes nothing here (the tokens are taken in order, whatever text is between them). A forward
  given no `video_grid_thw` reads a video token as text (as the model embeds it then: a generated one, say).
- LLaVA: `image_token_index`; each image has `image_seq_length` tokens, a square grid.
- Gemma 3: `image_token_index`; each image has `mm_tokens_per_image` soft tokens (the tower's patches average-pooled
  to a square), a square grid.
- InternVL: `image_token_id`; each image is one run of `image_seq_length` tokens per tile (a square of side s).
  One tile: the image. Several: the picture resized to a (rows x cols) canvas of tiles, the tiles in raster
  order, each in raster order, then a thumbnail of the whole picture. A tile token at (y, x) of tile (i, j)
  stands for cell (i*s + y, j*s + x) of the (rows*s, cols*s) canvas, which covers the picture; a thumbnail
  token's cell is its place in the thumbnail's own grid over the picture. Both kinds land in the region of
  the picture they see. The arrangement comes from the image's size (`image_sizes`, which
  `atrl.models.processors.InternVLImageSizesProcessor` adds) by the processor's own rule.
- LLaVA-OneVision: `image_token_index`; a prompt's single image is a base view (s x s tokens over the whole
  picture), then its any-resolution tiles as one (h, w) grid (the canvas of tiles, the picture centred in it,
  unpadded back to the picture's aspect ratio by whole tokens, and scaled down where larger than
  `vision_aspect_ratio` allows), each row followed by a newline token, which falls in the region of its row's
  last token; each image of a multi-image prompt is a base view of the picture padded to a square, and one
  newline. A corner over padding counts at the picture's nearest edge. The grid and where the picture lies in it
  come from `image_sizes` by the model's and the processor's own functions.
- Idefics3 / SmolVLM: `image_token_id`; an image is its rows x cols tiles in raster order, each a run of
  (tile / patch / scale_factor)^2 tokens after its <row_r_col_c> token, then a run for the global view of the
  whole picture after <global-img> (an image no larger than a tile: the global view alone). The tiles cut the
  picture resized to whole tiles, so a tile token stands for its cell of the (rows*s, cols*s) canvas over the
  picture, as InternVL's. The tile marks' ids come from the processor (`ConnectivityProbe(model,
  processor=...)`).
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


# One image's tokens, in sequence order (hashable: the regions of each are cached):
#   ("grid", h, w)                 an (h, w) grid in raster order
#   ("tiles", rows, cols, s)       InternVL, Idefics3: rows x cols tiles of (s, s) in raster order, then an (s, s)
#                                  thumbnail (global view)
#   ("anyres", s, h, w, box)       LLaVA-OneVision: an (s, s) base view, then h rows of w tokens and a newline,
#                                  the picture covering `box` (fractions: top, bottom, left, right) of the h x w
#   ("base", s, box)               LLaVA-OneVision in a multi-image prompt: an (s, s) view of the picture padded
#                                  to a square (covering `box`), and a newline
#   ("video", t, h, w)             the Qwen families' video: t temporal patches of an (h, w) grid, each in raster
#                                  order
ImageTokens = tuple


def _token_count(image: ImageTokens) -> int:
    kind = image[0]
    if kind == "grid":
        return image[1] * image[2]
    if kind == "video":
        return image[1] * image[2] * image[3]
    if kind == "tiles":
        return (image[1] * image[2] + 1) * image[3] ** 2
    if kind == "anyres":
        return image[1] ** 2 + image[2] * (image[3] + 1)
    return image[1] ** 2 + 1


@dataclass(frozen=True)
class AnyResolution:
    """LLaVA-OneVision's any-resolution geometry, from the model's config."""

    canvases: tuple[tuple[int, int], ...]  # image_grid_pinpoints: (height, width) canvases of tiles, in pixels
    tile_pixels: int  # the vision tower's input side
    side: int  # tokens per side of a tile (and of the base view)
    max_tiles: int  # vision_aspect_ratio "anyres_max_N": a larger unpadded grid is scaled down to about N tiles


@dataclass(frozen=True)
class VisionLayout:
    family: str
    image_token_id: int
    merge_size: int | None = None  # Qwen families: tokens per image = prod(grid_thw) / merge_size**2
    tokens_per_image: int | None = None  # LLaVA, Gemma 3: a fixed square grid
    tile_tokens: int | None = None  # InternVL: tokens per tile (a square)
    tile_pixels: int | None = None  # InternVL: a tile's side in pixels (the processor's rule for the arrangement)
    anyres: AnyResolution | None = None  # LLaVA-OneVision
    tile_marks: tuple[int, ...] | None = None  # Idefics3: the ids of <row_r_col_c>, r-major over r, c in 1..6
    global_mark: int | None = None  # Idefics3: the id of <global-img>
    video_token_id: int | None = None  # Qwen families: video tokens, laid out by video_grid_thw

    @classmethod
    def from_model(cls, model, processor=None) -> "VisionLayout":
        """The layout of `model`'s image tokens; Idefics3 / SmolVLM also need its `processor` (the ids of the tokens
        that mark each tile)."""
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
            video = getattr(cfg, "video_token_id", None)
            return cls(model_type, int(token), merge_size=int(cfg.vision_config.spatial_merge_size),
                       video_token_id=None if video is None else int(video))
        if model_type == "llava":
            return cls(model_type, int(token), tokens_per_image=int(cfg.image_seq_length))
        if model_type == "gemma3":  # a fixed square of soft tokens per image
            return cls(model_type, int(token), tokens_per_image=int(cfg.mm_tokens_per_image))
        if model_type == "internvl":  # patches per tile side, pixel-shuffled by downsample_ratio
            tile, patch = (_side(getattr(cfg.vision_config, k)) for k in ("image_size", "patch_size"))
            side = round(tile // patch * cfg.downsample_ratio)
            return cls(model_type, int(token), tile_tokens=side * side, tile_pixels=tile)
        if model_type in ("idefics3", "smolvlm"):  # patches per tile side, pixel-shuffled by scale_factor
            side = _side(cfg.vision_config.image_size) // _side(cfg.vision_config.patch_size) // int(cfg.scale_factor)
            marks = getattr(processor, "row_col_ids", None)
            mark = getattr(processor, "global_image_token_id", None)
            if marks is None or mark is None:
                raise ProbeError(f"{model_type}: the probes read each tile's place from the <row_r_col_c> token before "
                                 "it, whose ids the processor knows: pass the model's processor "
                                 "(ConnectivityProbe(model, processor=...))")
            unknown = getattr(getattr(processor, "tokenizer", None), "unk_token_id", None)
            if any(m is None or m == unknown for m in (*marks, mark)):
                raise ProbeError(f"{model_type}: the tokenizer has no single token for <global-img> or every "
                                 "<row_r_col_c> (r, c in 1..6), which mark the tiles in the prompt")
            return cls(model_type, int(token), tile_tokens=side * side, tile_marks=tuple(int(m) for m in marks),
                       global_mark=int(mark))
        if model_type == "llava_onevision":
            tile = _side(cfg.vision_config.image_size)
            canvases = tuple((int(h), int(w)) for h, w in cfg.image_grid_pinpoints)
            max_tiles = int(cfg.vision_aspect_ratio.removeprefix("anyres_max_"))
            return cls(model_type, int(token), anyres=AnyResolution(
                canvases, tile, tile // _side(cfg.vision_config.patch_size), max_tiles))
        return cls(model_type, int(token))

    def visual_mask(self, input_ids_BS: torch.Tensor, videos: bool = True) -> torch.Tensor:
        """(B, S) True at the image tokens, and at the video tokens with `videos` (a forward given videos: without
        them the model embeds a video token as text, e.g. one a policy generated)."""
        mask = input_ids_BS == self.image_token_id
        if videos and self.video_token_id is not None:
            mask = mask | (input_ids_BS == self.video_token_id)
        return mask

    def image_layouts(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                      image_sizes: torch.Tensor | None = None, *,
                      video_grid_thw: torch.Tensor | None = None) -> list[list[ImageTokens]]:
        """Per sample, how the tokens of each image and video are laid out (`ImageTokens`), in order of
        appearance."""
        ids = input_ids_BS.cpu()
        return self._layouts(self.visual_mask(ids, video_grid_thw is not None), image_grid_thw, image_sizes, ids,
                             video_grid_thw)

    def _layouts(self, is_image: torch.Tensor, image_grid_thw: torch.Tensor | None,
                 image_sizes: torch.Tensor | None, ids: torch.Tensor,
                 video_grid_thw: torch.Tensor | None = None) -> list[list[ImageTokens]]:
        """`image_layouts` from the (B, S) visual-token mask and ids on the host."""
        if self.tile_marks is not None:
            return self._marked_tiles(is_image, ids)
        if video_grid_thw is not None and self.video_token_id is not None:
            return self._with_videos(ids, image_grid_thw, video_grid_thw)
        counts = is_image.sum(dim=1).tolist()
        if self.merge_size is not None:
            if image_grid_thw is None:
                if any(counts):
                    raise ProbeError(f"{self.family}: image tokens present but image_grid_thw was not given")
                return [[] for _ in counts]
            sizes = [("grid", int(t) * int(h) // self.merge_size, int(w) // self.merge_size)
                     for t, h, w in image_grid_thw.tolist()]
            return self._consume(counts, sizes, "image_grid_thw")
        if self.tokens_per_image is not None:
            side = math.isqrt(self.tokens_per_image)
            shape = ("grid", side, side) if side * side == self.tokens_per_image else ("grid", 1, self.tokens_per_image)
            layouts = []
            for b, n in enumerate(counts):
                if n % self.tokens_per_image:
                    raise ProbeError(f"{self.family}: sample {b} has {n} image tokens, not a multiple of "
                                     f"{self.tokens_per_image} per image")
                layouts.append([shape] * (n // self.tokens_per_image))
            return layouts
        sizes = None if image_sizes is None else \
            (image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else list(image_sizes))
        if self.tile_tokens is not None:
            return self._tiled(_runs(is_image), sizes)
        if self.anyres is not None:
            return self._any_resolution(counts, sizes)
        return [[("grid", 1, n) for n in runs] for runs in _runs(is_image)]

    def _grid_items(self, grid_thw: torch.Tensor | None, kind: str) -> list[ImageTokens]:
        if kind == "image":
            return [("grid", int(t) * int(h) // self.merge_size, int(w) // self.merge_size)
                    for t, h, w in grid_thw.tolist()]
        return [("video", int(t), int(h) // self.merge_size, int(w) // self.merge_size) for t, h, w in grid_thw.tolist()]

    def _with_videos(self, ids: torch.Tensor, image_grid_thw: torch.Tensor | None,
                     video_grid_thw: torch.Tensor | None) -> list[list[ImageTokens]]:
        """The Qwen families with video tokens in the batch: each sample's images and videos in prompt order, each
        the next of its kind's grids (the images and the videos are numbered across the batch apart)."""
        queues = {}
        for kind, token, grid in (("image", self.image_token_id, image_grid_thw),
                                  ("video", self.video_token_id, video_grid_thw)):
            if grid is None:
                if bool((ids == token).any()):
                    raise ProbeError(f"{self.family}: {kind} tokens present but {kind}_grid_thw was not given")
                grid = torch.zeros(0, 3, dtype=torch.long)
            grid = torch.as_tensor(grid).reshape(-1, 3)
            queues[kind] = (token, self._grid_items(grid, kind), [0])
        layouts = []
        for b, row in enumerate(ids):
            kinds = [("image" if t == self.image_token_id else "video")
                     for t in row.tolist() if t == self.image_token_id or t == self.video_token_id]
            mine, i = [], 0
            while i < len(kinds):
                token, items, taken = queues[kinds[i]]
                if taken[0] >= len(items):
                    raise ProbeError(f"{self.family}: sample {b} has more {kinds[i]} tokens than {kinds[i]}_grid_thw "
                                     f"describes ({len(items)} {kinds[i]}s)")
                item = items[taken[0]]
                n = _token_count(item)
                if kinds[i:i + n] != [kinds[i]] * n:
                    raise ProbeError(f"{self.family}: sample {b}'s {kinds[i]} tokens do not match {kinds[i]}_grid_thw "
                                     f"({kinds[i]} {taken[0]} has {n} tokens)")
                mine.append(item)
                taken[0] += 1
                i += n
            layouts.append(mine)
        for kind, (_, items, taken) in queues.items():
            if taken[0] != len(items):
                raise ProbeError(f"{self.family}: the batch has {taken[0]} {kind}s, {kind}_grid_thw describes "
                                 f"{len(items)}")
        return layouts

    def _consume(self, counts: list[int], images: list[ImageTokens], source: str) -> list[list[ImageTokens]]:
        """The images of the batch, in order, dealt to the samples by their image-token counts."""
        layouts, k = [], 0
        for b, n in enumerate(counts):
            mine = []
            while n > 0:
                if k >= len(images):
                    raise ProbeError(f"{self.family}: sample {b} has more image tokens than {source} describes "
                                     f"({len(images)} images)")
                mine.append(images[k])
                n -= _token_count(images[k])
                k += 1
            if n != 0:
                raise ProbeError(f"{self.family}: sample {b}'s image tokens do not match {source}")
            layouts.append(mine)
        return layouts

    def _size_of(self, sizes: list | None, k: int, b: int, what: str) -> tuple[int, int]:
        if sizes is None:
            raise ProbeError(f"{self.family}: sample {b} has an image of {what}, whose arrangement follows from the "
                             "image's size, and the forward was given no image_sizes (load the processor with "
                             "atrl.models.zoo.load_processor, whose output has them)")
        if k >= len(sizes):
            raise ProbeError(f"{self.family}: sample {b} has more images than image_sizes describes "
                             f"({len(sizes)} images)")
        return int(sizes[k][0]), int(sizes[k][1])

    def _tiled(self, runs: list[list[int]], sizes: list | None) -> list[list[ImageTokens]]:
        """InternVL: each run of image tokens is one image of whole tiles; several tiles are a canvas plus a
        thumbnail, the canvas the one the processor picks for the image's size among those of that many tiles."""
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        side, layouts, k = math.isqrt(self.tile_tokens), [], 0
        for b, sample in enumerate(runs):
            mine = []
            for n in sample:
                if n % self.tile_tokens:
                    raise ProbeError(f"{self.family}: sample {b} has an image of {n} tokens, not a whole number of "
                                     f"tiles of {self.tile_tokens}")
                tiles = n // self.tile_tokens
                if tiles == 1:
                    mine.append(("grid", side, side))
                else:
                    size = self._size_of(sizes, k, b, f"{tiles} tiles")
                    cols, rows = get_optimal_tiled_canvas(size, (self.tile_pixels,) * 2, tiles - 1, tiles - 1)
                    mine.append(("tiles", rows, cols, side))
                k += 1
            layouts.append(mine)
        if sizes is not None and k != len(sizes):
            raise ProbeError(f"{self.family}: the batch has {k} images, image_sizes describes {len(sizes)}")
        return layouts

    def _marked_tiles(self, is_image: torch.Tensor, ids: torch.Tensor) -> list[list[ImageTokens]]:
        """Idefics3: each tile's run of tokens follows its <row_r_col_c> token, and an image's global view (its last
        run) follows <global-img>; an image without tiles is its global view alone."""
        side, per_side = math.isqrt(self.tile_tokens), math.isqrt(len(self.tile_marks))
        place = {m: divmod(i, per_side) for i, m in enumerate(self.tile_marks)}
        layouts = []
        for b, row in enumerate(is_image):
            mine, tiles = [], []
            for start, end in _run_bounds(row):
                if end - start != self.tile_tokens:
                    raise ProbeError(f"{self.family}: sample {b} has a run of {end - start} image tokens at position "
                                     f"{start}, not one tile's {self.tile_tokens}")
                mark = int(ids[b, start - 1]) if start > 0 else None
                if mark in place:
                    tiles.append(place[mark])
                    continue
                if mark != self.global_mark:
                    raise ProbeError(f"{self.family}: sample {b}'s image tokens at position {start} follow token "
                                     f"{mark}, neither a tile's <row_r_col_c> nor <global-img>")
                if not tiles:
                    mine.append(("grid", side, side))
                    continue
                rows, cols = max(r for r, _ in tiles) + 1, max(c for _, c in tiles) + 1
                if tiles != [(r, c) for r in range(rows) for c in range(cols)]:
                    raise ProbeError(f"{self.family}: sample {b}'s tiles before position {start} are not a whole "
                                     f"grid in raster order: {tiles[:8]}")
                mine.append(("tiles", rows, cols, side))
                tiles = []
            if tiles:
                raise ProbeError(f"{self.family}: sample {b} ends with {len(tiles)} tiles and no global view")
            layouts.append(mine)
        return layouts

    def _any_resolution(self, counts: list[int], sizes: list | None) -> list[list[ImageTokens]]:
        """LLaVA-OneVision: a sample whose tokens are one image's any-resolution count holds that image alone;
        otherwise each of its images is a base view and a newline."""
        base = self.anyres.side ** 2 + 1
        layouts, k = [], 0
        for b, n in enumerate(counts):
            mine = []
            if n:
                single = _any_resolution_grid(self.anyres, self._size_of(sizes, k, b, "any resolution"))
                if _token_count(single) == n:
                    mine, n = [single], 0
                while n > 0:
                    mine.append(("base", self.anyres.side, _square_box(self._size_of(sizes, k + len(mine), b,
                                                                                      "a base view"))))
                    n -= base
                if n != 0:
                    raise ProbeError(f"{self.family}: sample {b}'s image tokens are neither its image's "
                                     f"any-resolution count ({_token_count(single)}) nor a number of base views "
                                     f"({base} tokens each) for its image sizes")
                k += len(mine)
            layouts.append(mine)
        if sizes is not None and k > len(sizes):
            raise ProbeError(f"{self.family}: the batch has {k} images, image_sizes describes {len(sizes)}")
        return layouts

    def deferred_indicators(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                            region_grid: tuple[int, int] = (4, 4), dtype: torch.dtype = torch.float32,
                            image_sizes: torch.Tensor | None = None, *, video_grid_thw: torch.Tensor | None = None,
                            time_bins: int = 1) -> Callable[[], torch.Tensor]:
        """`region_indicators`, built when the returned function is called, without draining the device's queue.

        The layout is read on the host. On a CUDA device, `input_ids`, `image_grid_thw` and `image_sizes` start
        copying to pinned host memory at once, behind the kernels already queued, and the build waits only for that
        copy (not for the kernels queued after it); the indicators go back to the device asynchronously. A capture
        calls it at the first probed layer, so the build overlaps the layers queued before it instead of draining
        the device's queue when the forward starts (on an H200 the eager build, two syncs, cost 0.54-0.60 ms per
        probed step with the device idle).
        A layout that does not match the batch raises its ProbeError when the function is called."""
        _check_region_grid(region_grid)
        _check_time_bins(time_bins)
        device = input_ids_BS.device
        if device.type != "cuda":
            return functools.partial(self.region_indicators, input_ids_BS, image_grid_thw, region_grid, dtype,
                                     image_sizes, video_grid_thw=video_grid_thw, time_bins=time_bins)
        ids = input_ids_BS.to("cpu", non_blocking=True)
        grid, sizes, video = (t.to("cpu", non_blocking=True) if isinstance(t, torch.Tensor) else t
                              for t in (image_grid_thw, image_sizes, video_grid_thw))
        copied = torch.cuda.Event()
        copied.record(torch.cuda.current_stream(device))

        def build() -> torch.Tensor:
            copied.synchronize()
            return self._host_indicators(ids, grid, region_grid, dtype, sizes, pin=True, video_grid_thw=video,
                                         time_bins=time_bins).to(device, non_blocking=True)
        return build

    def region_indicators(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None = None,
                          region_grid: tuple[int, int] = (4, 4), dtype: torch.dtype = torch.float32,
                          image_sizes: torch.Tensor | None = None, *, video_grid_thw: torch.Tensor | None = None,
                          time_bins: int = 1) -> torch.Tensor:
        """(B, S, R) 0/1 indicators of each region's visual tokens (see the module docstring), on input_ids'
        device."""
        _check_region_grid(region_grid)
        _check_time_bins(time_bins)
        return self._host_indicators(input_ids_BS, image_grid_thw, region_grid, dtype, image_sizes,
                                     video_grid_thw=video_grid_thw, time_bins=time_bins).to(input_ids_BS.device)

    def _host_indicators(self, input_ids_BS: torch.Tensor, image_grid_thw: torch.Tensor | None,
                         region_grid: tuple[int, int], dtype: torch.dtype, image_sizes: torch.Tensor | None = None,
                         pin: bool = False, video_grid_thw: torch.Tensor | None = None,
                         time_bins: int = 1) -> torch.Tensor:
        """`region_indicators` built on the host (in pinned memory with `pin`): one scatter of ones at (sample,
        position, region) for all the visual tokens of the batch, which come in the order the images and videos
        are laid out."""
        rh, rw = region_grid
        input_ids_BS = input_ids_BS.cpu()  # one copy to the host: everything below reads it there
        image_grid_thw, image_sizes, video_grid_thw = (t.cpu() if isinstance(t, torch.Tensor) else t
                                                       for t in (image_grid_thw, image_sizes, video_grid_thw))
        is_image = self.visual_mask(input_ids_BS, video_grid_thw is not None)
        layouts = self._layouts(is_image, image_grid_thw, image_sizes, input_ids_BS, video_grid_thw)
        blocks = [[time_bins if image[0] == "video" else 1 for image in sample] for sample in layouts]
        R = rh * rw * max(1, max((sum(g) for g in blocks), default=0))
        B, S = input_ids_BS.shape
        out = torch.zeros(B, S, R, dtype=dtype, pin_memory=pin)
        cells = [_image_cells(image, rh, rw, sum(sizes[:i]), time_bins)
                 for sample, sizes in zip(layouts, blocks) for i, image in enumerate(sample)]
        if cells:
            b, s = is_image.nonzero(as_tuple=True)
            region = torch.cat(cells)
            if region.numel() != b.numel():  # the layouts checked every family's counts; this is the last guard
                raise ProbeError(f"{self.family}: {b.numel()} image tokens, the image layouts cover {region.numel()}")
            out[b, s, region] = 1
        return out


def _check_time_bins(time_bins: int) -> int:
    if not isinstance(time_bins, int) or time_bins < 1:
        raise ProbeError(f"time_bins={time_bins!r}: must be an integer >= 1")
    return time_bins


def _side(value) -> int:
    """A square side from a config's int or (height, width)."""
    return int(value[0] if isinstance(value, (list, tuple)) else value)


def _run_bounds(row: torch.Tensor) -> list[tuple[int, int]]:
    """(start, end) of each run of consecutive image tokens in one sample's (S,) mask, end exclusive."""
    steps = torch.cat([torch.tensor([False]), row, torch.tensor([False])]).int().diff()
    return list(zip((steps == 1).nonzero().flatten().tolist(), (steps == -1).nonzero().flatten().tolist()))


def _runs(is_image: torch.Tensor) -> list[list[int]]:
    """Per sample, the lengths of its runs of consecutive image tokens."""
    return [[end - start for start, end in _run_bounds(row)] for row in is_image]


@functools.lru_cache(maxsize=1024)
def _any_resolution_grid(geometry: AnyResolution, size: tuple[int, int]) -> ImageTokens:
    """The (h, w) grid LLaVA-OneVision packs for an image of `size` (height, width), by the model's and the
    processor's own functions: the best canvas of tiles, the picture resized into it and centred, the grid
    unpadded to the picture's aspect ratio, scaled down when over `max_tiles` tiles; with the box the picture
    covers in that grid (fractions: top, bottom, left, right), since unpadding keeps whole tokens."""
    import numpy as np
    from transformers.image_processing_utils import get_patch_output_size
    from transformers.image_utils import ChannelDimension
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        get_anyres_image_grid_shape,
        unpad_image,
    )

    rows, cols = get_anyres_image_grid_shape(list(size), [list(c) for c in geometry.canvases], geometry.tile_pixels)
    s, px = geometry.side, geometry.tile_pixels / geometry.side
    canvas = torch.arange(rows * s * cols * s).view(1, rows * s, cols * s)
    kept = unpad_image(canvas, list(size))[0]
    h, w = kept.shape
    if h == 0 or w == 0:  # a picture thinner than a token: unpadding keeps nothing (only newlines, if rows)
        return ("anyres", s, int(h), int(w), _WHOLE)
    top, left = divmod(int(kept[0, 0]), cols * s)
    new_h, new_w = get_patch_output_size(np.empty((1, *size)), (rows * geometry.tile_pixels,
                                                               cols * geometry.tile_pixels), ChannelDimension.FIRST)
    y0 = (rows * geometry.tile_pixels - new_h) // 2 / px - top
    x0 = (cols * geometry.tile_pixels - new_w) // 2 / px - left
    box = (y0 / h, (y0 + new_h / px) / h, x0 / w, (x0 + new_w / px) / w)
    ratio = math.sqrt(h * w / (geometry.max_tiles * s * s))
    if ratio > 1.1:  # the model interpolates the grid down: the picture keeps its place in it
        h, w = int(h // ratio), int(w // ratio)
    return ("anyres", s, int(h), int(w), box)


def _square_box(size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where a picture of `size` lies in the square it is padded to (centred, as LLaVA-OneVision's processor does)."""
    height, width = size
    side = max(height, width)
    y0, x0 = (side - height) // 2 / side, (side - width) // 2 / side
    return (y0, y0 + height / side, x0, x0 + width / side)


_WHOLE = (0.0, 1.0, 0.0, 1.0)


def _grid_cells(h: int, w: int, rh: int, rw: int, box: tuple[float, float, float, float] = _WHOLE,
                y: torch.Tensor | None = None, x: torch.Tensor | None = None) -> torch.Tensor:
    """The region of each token (y, x) of an (h, w) grid (all of them in raster order by default) whose picture
    covers `box` (fractions of the grid: top, bottom, left, right): the region of the token's top-left corner,
    a corner outside the picture moved onto its nearest edge."""
    if y is None:
        idx = torch.arange(h * w)
        y, x = idx // w, idx % w
    if box == _WHOLE:
        return (y * rh // h) * rw + x * rw // w
    y0, y1, x0, x1 = box
    v = ((y.double() / h - y0) / (y1 - y0)).clamp(0, 1)
    u = ((x.double() / w - x0) / (x1 - x0)).clamp(0, 1)
    # a corner on a region's edge is in the region below / right of it, as in integer arithmetic (1e-9: rounding)
    return (v * rh + 1e-9).long().clamp(max=rh - 1) * rw + (u * rw + 1e-9).long().clamp(max=rw - 1)


@functools.lru_cache(maxsize=1024)
def _image_cells(image: ImageTokens, rh: int, rw: int, index: int, time_bins: int = 1) -> torch.Tensor:
    """(tokens,) the region of each token of an image or video whose regions start at block `index` of its sample
    (a block: rh x rw regions), in sequence order, its picture cut into (rh, rw) rectangles and a video's time into
    `time_bins` blocks (cached: a batch's images mostly share a few layouts). Read only."""
    kind = image[0]
    if kind == "grid":
        cells = _grid_cells(image[1], image[2], rh, rw)
    elif kind == "video":
        t, h, w = image[1:]
        i = torch.arange(t * h * w)
        within = i % (h * w)
        cells = (i // (h * w)) * time_bins // t * (rh * rw) + _grid_cells(h, w, rh, rw, y=within // w, x=within % w)
    elif kind == "tiles":
        rows, cols, s = image[1:]
        t = torch.arange(rows * cols * s * s)
        tile, within = t // (s * s), t % (s * s)
        y, x = (tile // cols) * s + within // s, (tile % cols) * s + within % s
        cells = torch.cat([_grid_cells(rows * s, cols * s, rh, rw, y=y, x=x), _grid_cells(s, s, rh, rw)])
    elif kind == "anyres":
        s, h, w, box = image[1:]
        y = torch.arange(h).repeat_interleave(w + 1)
        x = torch.arange(w + 1).repeat(h).clamp(max=max(w - 1, 0))  # a row's newline: its last token's region
        cells = torch.cat([_grid_cells(s, s, rh, rw), _grid_cells(h, max(w, 1), rh, rw, box, y=y, x=x)])
    else:  # "base": the padded square's view, then one newline (in the region of the view's last token)
        base = _grid_cells(image[1], image[1], rh, rw, image[2])
        cells = torch.cat([base, base[-1:]])
    return index * rh * rw + cells
