"""Video prompts through TRL's GRPOTrainer, which passes images only (TRL 1.16).

A row's `videos` column (`atrl.data.formats.to_trl_dataset`: references to files, folders or frame lists;
`atrl.data.synthetic.to_hf_dataset`: frames and their rate) is decoded when the row is used, within the recipe's
`data.video` bounds. Three places then need the video inputs, and `ATRLTrainer` supplies them:

- generation: the prompts are processed with their images and videos together (`tokenize_with_videos`), so the
  prompt ids hold each video's tokens, expanded by the family's own processor, and `generate` gets
  `pixel_values_videos`, `video_grid_thw` (and Qwen2.5-VL's `second_per_grid_ts`);
- TRL's re-processing of the prompts for the scoring forwards, which passes images only: the processor is called
  with the batch's videos as well (`WithBatchVideos`);
- every forward that scores the rollouts (the old-log-prob pass, the reference model's, the training forward):
  TRL's loop hands the model image inputs only, so the model is called through `VideoForward`, which adds each
  chunk's video inputs, by row, and the M-RoPE token types (`mm_token_type_ids`) of image and video tokens;
- TRL's buffer of a generation batch, shuffled and cut into micro-batches: the video inputs travel as one entry
  per row (`atrl_videos`), which TRL's shuffle and split carry along with the row.
"""

from __future__ import annotations

import torch

from ..data.formats import DataError, video_inputs
from ..data.video import Video

__all__ = ["VIDEO_KEYS", "VideoForward", "WithBatchVideos", "tokenize_with_videos"]

VIDEO_KEYS = ("pixel_values_videos", "video_grid_thw", "second_per_grid_ts")


def prompt_parts(prompt: list[dict]) -> tuple[list, int]:
    """The images (payloads) and the number of video parts of a conversational prompt, in order."""
    images, videos = [], 0
    for message in prompt:
        content = message.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "image" and part.get("image") is not None:
                    images.append(part["image"])
                elif part.get("type") == "video":
                    videos += 1
    return images, videos


def tokenize_with_videos(processor, prompts: list[list[dict]], videos: list[list[Video]], *,
                         chat_template: str | None = None, **template_kwargs):
    """TRL's `_tokenize_prompts` for prompts with videos: (prompt ids per prompt, unpadded; the images per prompt,
    or None when there are none; the multimodal fields for `generate`; the video inputs per prompt, as
    `VideoForward` and TRL's buffer take them)."""
    texts, images_per_prompt = [], []
    for b, (prompt, mine) in enumerate(zip(prompts, videos, strict=True)):
        images, n_videos = prompt_parts(prompt)
        if n_videos != len(mine):
            raise DataError(f"prompt {b} of the batch has {n_videos} video parts but its row has {len(mine)} videos")
        texts.append(processor.apply_chat_template(prompt, chat_template=chat_template, tokenize=False,
                                                   add_generation_prompt=True, **template_kwargs))
        images_per_prompt.append(images)
    flat_images = [img for group in images_per_prompt for img in group]
    flat_videos = [v for group in videos for v in group]
    kwargs = video_inputs(processor, flat_videos) if flat_videos else {}
    tokenizer = getattr(processor, "tokenizer", processor)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        out = processor(text=texts, images=flat_images or None, padding=True, return_tensors="pt", **kwargs)
    finally:
        tokenizer.padding_side = side
    keep = out["attention_mask"].bool()
    prompt_ids = [row[m].tolist() for row, m in zip(out["input_ids"], keep)]
    fields = {}
    for key, value in out.items():
        if key in ("input_ids", "attention_mask"):
            continue
        if isinstance(value, torch.Tensor) and value.shape[:2] == out["input_ids"].shape:  # per token
            fields[key] = [row[m].tolist() for row, m in zip(value, keep)]
        else:
            fields[key] = value
    rows = split_video_rows(out, [len(group) for group in videos])
    images = images_per_prompt if flat_images else None
    return prompt_ids, images, fields, rows


def split_video_rows(out: dict, per_row: list[int]) -> list[dict[str, torch.Tensor]]:
    """The processor's video inputs cut by row: row b's `pixel_values_videos` (its videos' patches), its
    `video_grid_thw` and `second_per_grid_ts` (where the family has them)."""
    grid = out.get("video_grid_thw")
    if grid is None:
        return [{} for _ in per_row]
    patches = grid.prod(-1).tolist()
    rows, video, patch = [], 0, 0
    for n in per_row:
        count = sum(patches[video:video + n])
        row = {"pixel_values_videos": out["pixel_values_videos"][patch:patch + count],
               "video_grid_thw": grid[video:video + n]}
        if "second_per_grid_ts" in out:
            row["second_per_grid_ts"] = torch.as_tensor(out["second_per_grid_ts"])[video:video + n]
        rows.append(row)
        video, patch = video + n, patch + count
    if video != grid.shape[0] or patch != out["pixel_values_videos"].shape[0]:
        raise ValueError(f"the processor made {grid.shape[0]} videos of {out['pixel_values_videos'].shape[0]} patches; "
                         f"the rows account for {video} of {patch}")
    return rows


def merge_video_rows(rows: list[dict[str, torch.Tensor]], device) -> dict[str, torch.Tensor]:
    """The forward's video inputs for these rows (none when they hold no video)."""
    rows = [r for r in rows if r and r["video_grid_thw"].shape[0]]
    if not rows:
        return {}
    return {key: torch.cat([r[key] for r in rows]).to(device) for key in VIDEO_KEYS if key in rows[0]}


class WithBatchVideos:
    """The processor, whose calls without `videos` get this batch's: TRL re-processes a batch's prompts with
    their images for the scoring forwards' inputs, and a prompt's video tokens need their videos there too.
    Attributes are the processor's."""

    def __init__(self, processor, videos: list[Video]):
        self._processor, self._videos = processor, videos

    def __call__(self, *args, **kwargs):
        if kwargs.get("videos") is None and self._videos:
            kwargs.update(video_inputs(self._processor, self._videos))
        return self._processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._processor, name)


class VideoForward:
    """`model` called with the video inputs of the rows each call covers: TRL's scoring loop calls the model on
    consecutive chunks of the batch's rows and passes image inputs only. Each call also gets `mm_token_type_ids`
    made from its ids (1 image, 2 video), which TRL's re-processing of the prompts without their videos would get
    wrong. Attributes are the model's."""

    def __init__(self, model, rows: list[dict[str, torch.Tensor]], image_token_id: int | None,
                 video_token_id: int):
        self._model, self._rows, self._next = model, rows, 0
        self._image, self._video = image_token_id, video_token_id

    def __call__(self, *args, **kwargs):
        ids = kwargs["input_ids"]
        B = ids.shape[0]
        mine = self._rows[self._next:self._next + B]
        if len(mine) != B:
            raise RuntimeError(f"video inputs: a forward of {B} rows at row {self._next}, the batch has "
                               f"{len(self._rows)}")
        self._next += B
        kwargs.update(merge_video_rows(mine, ids.device))
        types = torch.zeros_like(ids)
        if self._image is not None:
            types[ids == self._image] = 1
        types[ids == self._video] = 2
        if "mm_token_type_ids" in kwargs or any(VIDEO_KEYS[0] in r for r in mine):
            kwargs["mm_token_type_ids"] = types
        return self._model(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)
