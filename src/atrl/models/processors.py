"""Image-only processors for the Qwen families, GLM-4.1V, InternVL and LLaVA-OneVision, so that no torchvision
is needed.

The stock processors of these families require a video processor, and the only video processors transformers
ships for them are built on torchvision. These subclasses keep everything else of the stock processor
(placeholder expansion from `image_grid_thw` or the image's tiles, `mm_token_type_ids` for 3D M-RoPE) and
simply have no video slot. InternVL's also returns each image's size (`image_sizes`), which the probes need to
know how its tiles are arranged (`atrl.probe.layout`); `load_processor` loads a checkpoint's stock
`InternVLProcessor` as this one.
"""

from __future__ import annotations

import numpy as np
import torch
from transformers import (
    Glm4vProcessor,
    InternVLProcessor,
    LlavaOnevisionProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)
from transformers.image_utils import get_image_size, is_pil_image, make_flat_list_of_images


class _NoVideoSlot:
    """Mixed in before a stock processor class: its constructor, with no video processor passed on. A stock class
    with more constructor arguments gets a subclass constructor that names them: `save_pretrained` and
    `from_pretrained` read the constructor's own parameters to know what to save and load."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageProcessorOnly(_NoVideoSlot, Qwen2_5_VLProcessor):
    """`Qwen2_5_VLProcessor` without the video slot (images and text only)."""


class Qwen2VLImageProcessorOnly(_NoVideoSlot, Qwen2VLProcessor):
    """`Qwen2VLProcessor` without the video slot (images and text only)."""


class Qwen3VLImageProcessorOnly(_NoVideoSlot, Qwen3VLProcessor):
    """`Qwen3VLProcessor` without the video slot (images and text only)."""


class Glm4vImageProcessorOnly(_NoVideoSlot, Glm4vProcessor):
    """`Glm4vProcessor` (GLM-4.1V) without the video slot (images and text only)."""


class LlavaOnevisionImageProcessorOnly(_NoVideoSlot, LlavaOnevisionProcessor):
    """`LlavaOnevisionProcessor` without the video slot (images and text only)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                 vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                 video_token="<video>", vision_aspect_ratio="anyres_max_9", **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, image_token=image_token,
                         video_token=video_token, vision_aspect_ratio=vision_aspect_ratio, **kwargs)


def image_sizes(images) -> list[tuple[int, int]]:
    """(height, width) in pixels of each image of `images` (one image, a list, or per-sample lists), in order."""
    flat = make_flat_list_of_images(images)
    return [(img.height, img.width) if is_pil_image(img) else tuple(get_image_size(np.asarray(img)))
            for img in flat]


class InternVLImageSizesProcessor(_NoVideoSlot, InternVLProcessor):
    """`InternVLProcessor` without the video slot, whose output also holds `image_sizes` (num_images, 2), each
    image's (height, width) before tiling: with it the tiles' arrangement (rows x columns) is known, which the
    stock output (the tiles themselves, stacked) does not say. The model's forward takes `image_sizes` and passes
    it by."""

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None,
                 **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, image_seq_length=image_seq_length,
                         **kwargs)

    def __call__(self, images=None, text=None, videos=None, **kwargs):
        out = super().__call__(images=images, text=text, videos=videos, **kwargs)
        if images is not None:
            sizes = image_sizes(images)
            out["image_sizes"] = torch.tensor(sizes, dtype=torch.long) if kwargs.get("return_tensors") == "pt" \
                else sizes
        return out

    @property
    def model_input_names(self):
        return [*super().model_input_names, "image_sizes"]


IMAGE_ONLY_PROCESSORS = {cls.__name__: cls for cls in (
    Qwen2_5_VLImageProcessorOnly, Qwen2VLImageProcessorOnly, Qwen3VLImageProcessorOnly, Glm4vImageProcessorOnly,
    LlavaOnevisionImageProcessorOnly, InternVLImageSizesProcessor)}
# A checkpoint's stock processor class loaded as this project's: InternVL's probes need the image sizes.
UPGRADED_PROCESSORS = {"InternVLProcessor": InternVLImageSizesProcessor}
