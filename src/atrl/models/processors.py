"""Image-only processors for the Qwen families and GLM-4.1V, so that no torchvision is needed.

The stock Qwen2-VL / Qwen2.5-VL / GLM-4.1V processors require a video processor, and the only video processor
transformers ships for them is built on torchvision. These subclasses keep everything else of the
stock processor (placeholder expansion from `image_grid_thw`, `mm_token_type_ids` for 3D M-RoPE) and
simply have no video slot. With torchvision installed, a real checkpoint's own processor loads as usual.
"""

from __future__ import annotations

from transformers import Glm4vProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor, Qwen3VLProcessor


class _NoVideoSlot:
    """Mixed in before a stock processor class: its constructor, with no video processor passed on."""

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


IMAGE_ONLY_PROCESSORS = {cls.__name__: cls for cls in (Qwen2_5_VLImageProcessorOnly, Qwen2VLImageProcessorOnly,
                                                       Qwen3VLImageProcessorOnly, Glm4vImageProcessorOnly)}
