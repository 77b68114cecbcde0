"""Tiny, offline vision-language models built from the real transformers classes.

Each family is the genuine architecture (Qwen2.5-VL with its window-attention vision tower and 3D
M-RoPE, Qwen2-VL, LLaVA with a CLIP tower and a Llama decoder) at toy width and depth, with a
tokenizer (the synthetic tasks' words whole, bytes for the rest) carrying the family's special tokens and
chat template, and the family's real image-processor class (its PIL backend, so no torchvision is needed).
`build_tiny_vlm` returns a model and processor that are saved and reloaded with `save_pretrained` /
`from_pretrained` like any checkpoint, so every later command takes a model path.

Nothing here downloads anything: weights are random, seeded.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from .._io import ensure_writable_dir
from .processors import IMAGE_ONLY_PROCESSORS, UPGRADED_PROCESSORS
from ..data.synthetic import task_words
from .tokenizer import build_tokenizer

# One chat template per family, written for this project. They accept the conversational format
# TRL uses: content is a string or a list of {"type": "image"} / {"type": "text", "text": ...} parts.


def _chatml_template(image: str, video: str | None = None) -> str:
    """The ChatML turns of Qwen-based VLMs, an image part written as `image` (a video part as `video`)."""
    return (
        "{%- for message in messages -%}"
        "{{ '<|im_start|>' + message['role'] + '\\n' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}{%- for part in message['content'] -%}"
        "{%- if part['type'] == 'image' -%}{{ '" + image + "' }}"
        + ("{%- elif part['type'] == 'video' -%}{{ '" + video + "' }}" if video else "") +
        "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
        "{%- endfor -%}{%- endif -%}"
        "{{ '<|im_end|>\\n' }}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
    )


_QWEN_TEMPLATE = _chatml_template("<|vision_start|><|image_pad|><|vision_end|>",
                                  "<|vision_start|><|video_pad|><|vision_end|>")
# InternVL 3 / 3.5 (Qwen decoders): the processor turns <IMG_CONTEXT> into <img>, one <IMG_CONTEXT> per token of
# each tile, </img>.
_INTERNVL_TEMPLATE = _chatml_template("<IMG_CONTEXT>\\n")
# LLaVA-OneVision (Qwen2 decoder): the processor repeats <image> once per token of the image.
_LLAVA_OV_TEMPLATE = _chatml_template("<image>\\n")

_LLAVA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '</s>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)

_GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<start_of_image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

_GEMMA_SPECIALS = ["<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                   "<image_soft_token>"]

_QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
_INTERNVL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
_LLAVA_OV_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
# Idefics3 / SmolVLM: "<|im_start|>User:" turns ended by <end_of_utterance>; the processor writes each image as its
# tiles (<fake_token_around_image><row_r_col_c> and the tile's <image> tokens, a newline after each row), then
# "\n<fake_token_around_image><global-img>", the global view's <image> tokens and <fake_token_around_image>.
_IDEFICS3_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] | capitalize + ':' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_utterance>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>Assistant:' }}{%- endif -%}"
)
_IDEFICS3_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<image>",
                      "<global-img>"] + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
_LLAVA_SPECIALS = ["<pad>", "<s>", "</s>", "<image>", "<|system|>", "<|user|>", "<|assistant|>"]

# GLM-4.1V's format: "[gMASK]<sop>" once, then "<|role|>\n" before each turn, an image as
# <|begin_of_image|><|image|><|end_of_image|> (the processor repeats <|image|> once per merged patch).
_GLM_TEMPLATE = (
    "{{ '[gMASK]<sop>' }}{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<|begin_of_image|><|image|><|end_of_image|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
_GLM_SPECIALS = ["<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|begin_of_image|>",
                 "<|end_of_image|>", "<|image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|video|>"]

# The response format's tags, single tokens as in reasoning VLMs' vocabularies (Qwen3's "<think>").
_MARKUP = ("<think>", "</think>", "<answer>", "</answer>")


def _tokenizer(size: "TinySize", special_tokens: list[str], **kwargs):
    """The family's tokenizer: bytes, then (with `size.vocabulary == "words"`) the synthetic tasks' words and the
    response tags as single tokens, then the family's special tokens."""
    if size.vocabulary == "bytes":
        return build_tokenizer(special_tokens, **kwargs)
    return build_tokenizer(special_tokens, words=task_words(), markup=_MARKUP, **kwargs)


@dataclass(frozen=True)
class TinySize:
    """Width and depth of a tiny model. The defaults train on two CPU cores in minutes.

    Attributes:
        hidden_size: decoder width.
        num_layers: decoder layers.
        num_heads: query heads; head size is hidden_size // num_heads.
        num_kv_heads: key/value heads (grouped-query attention when smaller than num_heads).
        intermediate_size: decoder MLP width.
        vision_hidden_size: vision tower width.
        vision_layers: vision tower depth.
        image_size: side in pixels that images are resized to (a multiple of 28).
        rope_theta: base of the decoder's rotary frequencies. Small on purpose: Qwen's M-RoPE gives an image's
            height and width axes the lowest frequencies of the head, and with a 32-wide head and the usual
            base of 10,000 two image tokens a quadrant apart differ by under 0.01 rad along the width, so the
            decoder cannot tell left from right. With base 10 a tiny Qwen2.5-VL names the colour of an asked
            quadrant of a four-colour image 70% of the time after 3,000 traces x 3 epochs, against 26% (chance)
            with base 10,000.
        vocabulary: "words" (the synthetic tasks' words and the response tags are one token each, as in a real
            VLM's vocabulary; `atrl.models.tokenizer`) or "bytes" (one token per byte: the default base's, see
            `atrl.models.default`).
    """

    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 128
    vision_hidden_size: int = 32
    vision_layers: int = 2
    image_size: int = 112
    rope_theta: float = 10.0
    vocabulary: str = "words"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size",
                     "vision_hidden_size", "vision_layers", "image_size", "rope_theta"):
            if getattr(self, name) <= 0:
                raise ValueError(f"TinySize.{name} must be positive, got {getattr(self, name)}")
        if self.vocabulary not in ("words", "bytes"):
            raise ValueError(f"TinySize.vocabulary={self.vocabulary!r}: choose 'words' or 'bytes'")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"TinySize: hidden_size ({self.hidden_size}) must divide by num_heads ({self.num_heads}) "
                f"and num_heads by num_kv_heads ({self.num_kv_heads})"
            )
        if (self.hidden_size // self.num_heads) % 8:
            raise ValueError(f"TinySize: head size {self.hidden_size // self.num_heads} must be a multiple of 8 "
                             "(M-RoPE splits it in three sections)")
        if self.image_size % 28:
            raise ValueError(f"TinySize.image_size must be a multiple of 28 (patch 14, merge 2), got {self.image_size}")

    def decoder_dims(self) -> dict[str, int]:
        """The decoder fields every family's text config shares."""
        return dict(hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
                    num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
                    num_key_value_heads=self.num_kv_heads, max_position_embeddings=4096)


def _mrope_section(head_dim: int) -> list[int]:
    """Split head_dim/2 rotary frequencies into temporal, height, width sections (Qwen's 1:1.5:1.5)."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def _qwen_text_config(size: TinySize, vocab_size: int, tok) -> dict[str, Any]:
    return dict(
        vocab_size=vocab_size,
        **size.decoder_dims(),
        rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta,
                         "mrope_section": _mrope_section(size.hidden_size // size.num_heads)},
        bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )


def _qwen_ids(tok) -> dict[str, int]:
    return dict(
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )


def _qwen_tokenizer(size: TinySize):
    return _tokenizer(
        size,
        _QWEN_SPECIALS,
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        chat_template=_QWEN_TEMPLATE,
        extra_attributes={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                          "vision_bos_token": "<|vision_start|>", "vision_eos_token": "<|vision_end|>"},
    )


def _qwen_image_processor(size: TinySize, patch: int = 14):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    pixels = size.image_size * size.image_size
    return Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=patch,
                                    temporal_patch_size=2, merge_size=2)


def _qwen_video_processor(size: TinySize, patch: int = 14):
    """The family's own video processor (torchvision-based), each frame resized to the tiny image's pixels."""
    if patch == 16:
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor as cls
    else:
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor as cls
    pixels = size.image_size * size.image_size
    if patch == 16:  # Qwen3-VL bounds the pixels of all the frames together: here up to 32 frames of the image's
        return cls(size={"shortest_edge": 2 * pixels, "longest_edge": 32 * pixels}, patch_size=patch,
                   temporal_patch_size=2, merge_size=2, min_frames=2, cap_pixels_per_frame=False)
    return cls(size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=patch, temporal_patch_size=2,
               merge_size=2, min_frames=2, cap_pixels_per_frame=False)


def _build_qwen(size: TinySize, config_cls, model_cls, processor_cls, vision: dict[str, Any], patch: int = 14,
                text: dict[str, Any] | None = None):
    """The Qwen families: same tokenizer, text config, image and video processors (Qwen3-VL's patches are 16
    pixels, Qwen2-VL's and Qwen2.5-VL's 14); the vision towers differ. The processor is the family's stock one,
    with its video processor."""
    tok = _qwen_tokenizer(size)
    config = config_cls(
        text_config={**_qwen_text_config(size, len(tok), tok), **(text or {})},
        vision_config=dict(depth=size.vision_layers, num_heads=2, patch_size=patch, spatial_merge_size=2,
                           temporal_patch_size=2, **vision),
        tie_word_embeddings=True,
        **_qwen_ids(tok),
    )
    processor = processor_cls(image_processor=_qwen_image_processor(size, patch), tokenizer=tok,
                              video_processor=_qwen_video_processor(size, patch), chat_template=_QWEN_TEMPLATE)
    return model_cls(config), processor


def _build_qwen2_5_vl(size: TinySize):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from transformers import Qwen2_5_VLProcessor

    return _build_qwen(size, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor,
                       dict(hidden_size=size.vision_hidden_size, intermediate_size=2 * size.vision_hidden_size,
                            out_hidden_size=size.hidden_size, window_size=56,
                            fullatt_block_indexes=[size.vision_layers - 1]))


def _build_qwen2_vl(size: TinySize):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from transformers import Qwen2VLProcessor

    return _build_qwen(size, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor,
                       dict(embed_dim=size.vision_hidden_size, hidden_size=size.hidden_size, mlp_ratio=2))


def _qwen3_vision(size: TinySize) -> dict[str, Any]:
    side = -(-size.image_size // 16) + 2  # the processor rounds the image to a multiple of 32 pixels, up or down
    return dict(hidden_size=size.vision_hidden_size, intermediate_size=2 * size.vision_hidden_size,
                out_hidden_size=size.hidden_size, num_position_embeddings=side * side, deepstack_visual_indexes=[0])


def _build_qwen3_vl(size: TinySize):
    """Qwen3-VL (dense): 16-pixel patches, a learned position embedding over a (side x side) patch grid, and
    DeepStack features of the vision tower's early layers added to the decoder's first layers (here: layer 0's)."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from transformers import Qwen3VLProcessor

    return _build_qwen(size, Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor,
                       _qwen3_vision(size), patch=16)


def _build_qwen3_vl_moe(size: TinySize):
    """Qwen3-VL-MoE: Qwen3-VL with a mixture-of-experts MLP in every decoder layer (4 experts, 2 per token here)."""
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    from transformers import Qwen3VLProcessor

    experts = dict(num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=size.hidden_size,
                   decoder_sparse_step=1)
    return _build_qwen(size, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration, Qwen3VLProcessor,
                       _qwen3_vision(size), patch=16, text=experts)


def _build_qwen3_5(size: TinySize):
    """Qwen3.5, natively multimodal with a hybrid text stack: gated-delta-net linear-attention layers and softmax
    full-attention layers (the published configs: one in four; here layers 1 and 2 of 4, so that the probes'
    default layer is not the last). The vision side is Qwen3-VL's, without DeepStack."""
    from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

    from transformers import Qwen3VLProcessor

    head = size.hidden_size // size.num_heads
    types = (["linear_attention", "full_attention", "full_attention", "linear_attention"]
             + ["linear_attention"] * size.num_layers)[:size.num_layers]
    vision = {k: v for k, v in _qwen3_vision(size).items() if k != "deepstack_visual_indexes"}
    text = dict(layer_types=types, head_dim=head, linear_num_key_heads=2, linear_num_value_heads=2,
                linear_key_head_dim=head, linear_value_head_dim=head)
    return _build_qwen(size, Qwen3_5Config, Qwen3_5ForConditionalGeneration, Qwen3VLProcessor, vision,
                       patch=16, text=text)


def _build_glm4v(size: TinySize):
    """GLM-4.1V (`glm4v`): a Qwen2-VL-like tower (14-pixel patches, 2 x 2 merge, `image_grid_thw`) with learned
    position embeddings resampled to each image's grid and a convolutional downsampling merger; a decoder with
    3D M-RoPE over the image's (t, h, w) and extra norms around attention and MLP."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    from .processors import Glm4vImageProcessorOnly

    tok = _tokenizer(size, _GLM_SPECIALS, pad_token="<|endoftext|>", eos_token="<|endoftext|>",
                     chat_template=_GLM_TEMPLATE,
                     extra_attributes={"image_token": "<|image|>", "video_token": "<|video|>"})
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
        ("image_token_id", "<|image|>"), ("video_token_id", "<|video|>"),
        ("image_start_token_id", "<|begin_of_image|>"), ("image_end_token_id", "<|end_of_image|>"),
        ("video_start_token_id", "<|begin_of_video|>"), ("video_end_token_id", "<|end_of_video|>"))}
    head = size.hidden_size // size.num_heads
    config = Glm4vConfig(
        text_config=dict(vocab_size=len(tok), **size.decoder_dims(),
                         rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta,
                                          "mrope_section": _mrope_section(head), "partial_rotary_factor": 1.0},
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(depth=size.vision_layers, hidden_size=size.vision_hidden_size, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=size.hidden_size,
                           intermediate_size=2 * size.vision_hidden_size, image_size=size.image_size),
        tie_word_embeddings=True, **ids)
    pixels = size.image_size * size.image_size
    # the processor compares two frames' pixels (an image is a two-frame clip) with its bounds: one size fits
    image_processor = Glm4vImageProcessorPil(size={"shortest_edge": pixels, "longest_edge": 2 * pixels},
                                             patch_size=14, temporal_patch_size=2, merge_size=2)
    processor = Glm4vImageProcessorOnly(image_processor=image_processor, tokenizer=tok, chat_template=_GLM_TEMPLATE)
    return Glm4vForConditionalGeneration(config), processor


def _build_llava(size: TinySize):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = _tokenizer(
        size,
        _LLAVA_SPECIALS,
        pad_token="<pad>",
        eos_token="</s>",
        bos_token="<s>",
        chat_template=_LLAVA_TEMPLATE,
        extra_attributes={"image_token": "<image>"},
    )
    patch = 14
    config = LlavaConfig(
        vision_config=dict(
            model_type="clip_vision_model",
            hidden_size=size.vision_hidden_size,
            intermediate_size=2 * size.vision_hidden_size,
            num_hidden_layers=size.vision_layers,
            num_attention_heads=2,
            image_size=size.image_size,
            patch_size=patch,
            projection_dim=size.vision_hidden_size,
        ),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            **size.decoder_dims(),
            rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta},
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(size.image_size // patch) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": size.image_size},
        crop_size={"height": size.image_size, "width": size.image_size},
    )
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", chat_template=_LLAVA_TEMPLATE,
                               num_additional_image_tokens=1)
    return LlavaForConditionalGeneration(config), processor


def _qwen2_decoder(size: TinySize, tok) -> dict[str, Any]:
    """A Qwen2 text config (InternVL 3 / 3.5 and LLaVA-OneVision decode with one)."""
    return dict(model_type="qwen2", vocab_size=len(tok), **size.decoder_dims(),
                rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta},
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def _build_internvl(size: TinySize):
    """InternVL 3 / 3.5: each image is cut into up to 4 square tiles of `image_size / 2` pixels (rows x columns
    chosen by the image's aspect ratio), plus a thumbnail of the whole image when there are several; each tile's
    patches are pixel-shuffled 2 x 2 into (tile / 28)^2 tokens, between <img> and </img>."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from .processors import InternVLImageSizesProcessor

    tok = _tokenizer(size, _INTERNVL_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                     chat_template=_INTERNVL_TEMPLATE,
                     extra_attributes={"start_image_token": "<img>", "end_image_token": "</img>",
                                       "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    tile, patch = size.image_size // 2, 14
    tokens = (tile // patch // 2) ** 2
    config = InternVLConfig(
        vision_config=dict(hidden_size=size.vision_hidden_size, intermediate_size=2 * size.vision_hidden_size,
                           num_hidden_layers=size.vision_layers, num_attention_heads=2, image_size=[tile, tile],
                           patch_size=[patch, patch]),
        text_config=_qwen2_decoder(size, tok),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=tokens, downsample_ratio=0.5,
        tie_word_embeddings=True)
    image_processor = GotOcr2ImageProcessorPil(size={"height": tile, "width": tile}, crop_to_patches=True,
                                               min_patches=1, max_patches=4)
    processor = InternVLImageSizesProcessor(image_processor=image_processor, tokenizer=tok,
                                            chat_template=_INTERNVL_TEMPLATE, image_seq_length=tokens)
    return InternVLForConditionalGeneration(config), processor


def _build_llava_onevision(size: TinySize):
    """LLaVA-OneVision: a SigLIP tower on square tiles of `image_size / 2` pixels. A prompt's single image is a
    base view of the whole image, then the tiles of its best-fitting canvas (up to 4 tiles), unpadded back to the
    image's aspect ratio, with a learned newline token after each row; each image of a multi-image prompt is its
    base view and one newline."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    from .processors import LlavaOnevisionImageProcessorOnly

    tok = _tokenizer(size, _LLAVA_OV_SPECIALS, pad_token="<|endoftext|>", eos_token="<|im_end|>",
                     chat_template=_LLAVA_OV_TEMPLATE,
                     extra_attributes={"image_token": "<image>", "video_token": "<video>"})
    tile, patch = size.image_size // 2, 14
    canvases = [[tile * r, tile * c] for r in range(1, 5) for c in range(1, 5) if r * c <= 4]
    config = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=size.vision_hidden_size,
                           intermediate_size=2 * size.vision_hidden_size, num_hidden_layers=size.vision_layers,
                           num_attention_heads=2, image_size=tile, patch_size=patch),
        text_config=_qwen2_decoder(size, tok),
        image_token_index=tok.convert_tokens_to_ids("<image>"), video_token_index=tok.convert_tokens_to_ids("<video>"),
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=canvases,
        vision_aspect_ratio="anyres_max_4", tie_word_embeddings=True)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": tile, "width": tile},
                                                      image_grid_pinpoints=canvases)
    processor = LlavaOnevisionImageProcessorOnly(image_processor=image_processor, tokenizer=tok,
                                                 chat_template=_LLAVA_OV_TEMPLATE,
                                                 num_image_tokens=(tile // patch) ** 2,
                                                 vision_feature_select_strategy="full",
                                                 vision_aspect_ratio="anyres_max_4")
    return LlavaOnevisionForConditionalGeneration(config), processor


def _build_idefics3(size: TinySize):
    """Idefics3 (the architecture of SmolVLM): a SigLIP tower on square tiles of `image_size / 2` pixels. An image
    larger than a tile is resized so that its longest side is 2 tiles (the other side rounded up to whole tiles)
    and cut into rows x cols tiles, followed by a global view of the whole image; each tile's patches are
    pixel-shuffled 2 x 2 into (tile / 28)^2 tokens."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = _tokenizer(size, _IDEFICS3_SPECIALS, pad_token="<|endoftext|>", eos_token="<end_of_utterance>",
                     bos_token="<|im_start|>", chat_template=_IDEFICS3_TEMPLATE,
                     extra_attributes={"image_token": "<image>"})
    tile, patch, scale = size.image_size // 2, 14, 2
    tokens = (tile // patch // scale) ** 2
    config = Idefics3Config(
        vision_config=dict(hidden_size=size.vision_hidden_size, intermediate_size=2 * size.vision_hidden_size,
                           num_hidden_layers=size.vision_layers, num_attention_heads=2, image_size=tile,
                           patch_size=patch),
        text_config=dict(model_type="llama", vocab_size=len(tok), **size.decoder_dims(),
                         rope_parameters={"rope_type": "default", "rope_theta": size.rope_theta},
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=scale, tie_word_embeddings=True,
        pad_token_id=tok.pad_token_id)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": 2 * tile}, max_image_size={"longest_edge": tile},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, chat_template=_IDEFICS3_TEMPLATE,
                                  image_seq_len=tokens)
    return Idefics3ForConditionalGeneration(config), processor


def _build_gemma3(size: TinySize):
    """Gemma 3: a SigLIP tower whose patches are average-pooled to a fixed square of soft tokens per image
    (`mm_tokens_per_image`, 16 here), between <start_of_image> and <end_of_image>; image tokens attend to each
    other both ways (`token_type_ids`), text causally; sliding-window and full-attention decoder layers
    alternate (the probes' default layers are among the full ones)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = _tokenizer(
        size, _GEMMA_SPECIALS, pad_token="<pad>", eos_token="<end_of_turn>", bos_token="<bos>",
        chat_template=_GEMMA_TEMPLATE,
        extra_attributes={"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                          "eoi_token": "<end_of_image>"})
    rope = {"rope_type": "default", "rope_theta": size.rope_theta}
    tokens = 16  # a 4 x 4 grid of soft tokens per image
    config = Gemma3Config(
        text_config=dict(vocab_size=len(tok), **size.decoder_dims(), head_dim=size.hidden_size // size.num_heads,
                         sliding_window=64, rope_parameters={"full_attention": rope, "sliding_attention": rope},
                         layer_types=(["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
                                      + ["sliding_attention"] * size.num_layers)[:size.num_layers],
                         pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=size.vision_hidden_size, intermediate_size=2 * size.vision_hidden_size,
                           num_hidden_layers=size.vision_layers, num_attention_heads=2, image_size=size.image_size,
                           patch_size=14),
        mm_tokens_per_image=tokens,
        image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"),
        boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": size.image_size, "width": size.image_size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, chat_template=_GEMMA_TEMPLATE,
                                image_seq_length=tokens)
    return Gemma3ForConditionalGeneration(config), processor


FAMILIES: dict[str, Callable[[TinySize], tuple[PreTrainedModel, ProcessorMixin]]] = {
    "qwen2_5_vl": _build_qwen2_5_vl,
    "qwen2_vl": _build_qwen2_vl,
    "qwen3_vl": _build_qwen3_vl,
    "qwen3_vl_moe": _build_qwen3_vl_moe,
    "qwen3_5": _build_qwen3_5,
    "llava": _build_llava,
    "gemma3": _build_gemma3,
    "glm4v": _build_glm4v,
    "internvl": _build_internvl,
    "llava_onevision": _build_llava_onevision,
    "idefics3": _build_idefics3,
}
DEFAULT_FAMILY = "qwen2_5_vl"
# SmolVLM is the Idefics3 architecture (a SmolLM2 decoder); `atrl.models.pretrained` builds it on SmolLM2-135M.
FAMILY_ALIASES = {"smolvlm": "idefics3"}


def build_tiny_vlm(
    family: str = DEFAULT_FAMILY, *, size: TinySize | None = None, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a randomly initialised tiny VLM of `family` and its processor (no downloads).

    Args:
        family: one of `FAMILIES` (qwen2_5_vl, qwen2_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, llava, gemma3, glm4v,
            internvl, llava_onevision, idefics3).
        size: width/depth knobs; `TinySize()` when omitted.
        seed: seeds the weight initialisation, so the same seed gives the same weights.
    """
    family = FAMILY_ALIASES.get(family, family)
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; choose one of {sorted(FAMILIES)}")
    size = size or TinySize()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model, processor = FAMILIES[family](size)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.eval()
    return model, processor


def save_model(model: PreTrainedModel, processor: ProcessorMixin, path: str | os.PathLike) -> Path:
    """Save model (safetensors) and processor into the folder `path`."""
    out = ensure_writable_dir(path, argument="output folder")
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def load_model(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               attn_implementation: str | None = None, device: str | torch.device | None = None):
    """Load a VLM checkpoint and its processor from a local folder (or any Hugging Face model path)."""
    from transformers import AutoConfig

    check_model_path(path)
    processor = load_processor(path)
    if (Path(path) / "config.json").is_file():  # before reading the weights (a LoRA adapter folder has none)
        check_processor_matches(AutoConfig.from_pretrained(path), processor, path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    except Exception as err:  # a truncated or corrupt weights file: name the folder and the file
        if not Path(path).is_dir() or not _is_corrupt_weights(err):
            raise
        raise ValueError(f"model folder {str(path)!r}: its weights cannot be read ({type(err).__name__}: {err}); "
                         f"the file is truncated or not a checkpoint ({_weight_files(path)}): copy it again, or "
                         "use another checkpoint") from None
    if device is not None:
        model.to(device)
    return model, processor


def check_processor_matches(config, processor, path: str | os.PathLike) -> None:
    """Refuse a processor that would put the image in positions the model does not read as image tokens, or
    token ids the model has no embedding for (a processor of another checkpoint copied into the folder)."""
    tok = getattr(processor, "tokenizer", processor)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = getattr(text, "vocab_size", None)
    if vocab is not None and len(tok) > vocab:
        raise ValueError(f"model folder {str(path)!r}: its tokenizer has {len(tok)} tokens and the model embeds "
                         f"{vocab} (config.json vocab_size): the processor belongs to another model")
    model_id = getattr(config, "image_token_id", None)
    if model_id is None:
        model_id = getattr(config, "image_token_index", None)
    # the tokens the processor may put where an image's features go (Gemma 3's processor names its begin-of-image
    # token, its tokenizer the soft token the features replace)
    named = [getattr(obj, attr, None) for obj in (processor, tok) for attr in ("image_token", "image_token_id")]
    ids = {tok.convert_tokens_to_ids(v) if isinstance(v, str) else v for v in named if isinstance(v, (str, int))}
    if model_id is None or not ids or model_id in ids:
        return
    image_token = next((v for v in named if isinstance(v, str)), None)
    raise ValueError(f"model folder {str(path)!r}: the processor marks images with {image_token!r} (id "
                     f"{', '.join(map(str, sorted(ids)))}) and the model reads image features at id {model_id} "
                     "(config.json image_token_id): the processor belongs to another model; save the model's own "
                     "processor beside it")


def _is_corrupt_weights(err: BaseException) -> bool:
    """Errors that safetensors or torch raise on a weights file that is cut short or damaged."""
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("SafetensorError", "invalid header", "HeaderTooLarge", "MetadataIncompleteBuffer",
                                   "unexpected EOF", "PytorchStreamReader failed", "incomplete metadata"))


def _weight_files(path: str | os.PathLike) -> str:
    files = sorted(Path(path).glob("*.safetensors")) + sorted(Path(path).glob("*.bin"))
    return ", ".join(f"{f.name} {f.stat().st_size:,} bytes" for f in files) or "no weights file"


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A LoRA run's adapter folder (its `final/`) merged into the weights of the base model it names, saved as a
    full checkpoint folder with the processor: what vLLM or any tool without peft loads."""
    from peft import PeftConfig, PeftModel

    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ValueError(f"--adapter {str(adapter)!r}: no adapter_config.json there; give a LoRA run's final/ folder")
    base_path = PeftConfig.from_pretrained(str(adapter)).base_model_name_or_path
    check_model_path(base_path)
    base = AutoModelForImageTextToText.from_pretrained(base_path, dtype="auto")
    merged = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    has_processor = any((Path(adapter) / name).is_file() for name in ("processor_config.json", "tokenizer.json"))
    return save_model(merged, load_processor(adapter if has_processor else base_path), out)


def pixel_range(processor: ProcessorMixin) -> tuple[int, int] | None:
    """(min, max) pixels a Qwen-VL image processor resizes each image into (its `size` shortest_edge /
    longest_edge); None for a processor that resizes to a fixed size (LLaVA) or has no image processor."""
    size = dict(getattr(getattr(processor, "image_processor", None), "size", None) or {})
    low, high = size.get("shortest_edge"), size.get("longest_edge")
    return None if low is None or high is None else (low, high)


def set_pixel_range(processor: ProcessorMixin, min_pixels: int | None, max_pixels: int | None,
                    names: tuple[str, str] = ("model.min_pixels", "model.max_pixels")) -> None:
    """The range of pixels an image is resized into (Qwen-VL image processors: `size` shortest_edge /
    longest_edge, in pixels); None keeps the processor's own bound. Image tokens per image are about
    pixels / 784 on Qwen2-VL and Qwen2.5-VL (14-pixel patches merged 2 x 2). `names`: the two settings as the
    user wrote them, for errors."""
    if min_pixels is None and max_pixels is None:
        return
    image_processor = getattr(processor, "image_processor", None)
    size = dict(getattr(image_processor, "size", None) or {})
    if pixel_range(processor) is None:
        raise ValueError(f"{names[0]} / {names[1]}: {type(image_processor).__name__} resizes images to a fixed "
                         f"size ({size}), not into a pixel range (Qwen2-VL / Qwen2.5-VL processors do)")
    size["shortest_edge"] = size["shortest_edge"] if min_pixels is None else int(min_pixels)
    size["longest_edge"] = size["longest_edge"] if max_pixels is None else int(max_pixels)
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"{names[0]}={size['shortest_edge']} is above {names[1]}={size['longest_edge']}"
                         + ("" if min_pixels is not None else f" (the processor's own minimum; set {names[0]} too)"))
    image_processor.size = size
    for name, value in (("min_pixels", size["shortest_edge"]), ("max_pixels", size["longest_edge"])):
        if hasattr(image_processor, name):  # older processors also read these attributes
            setattr(image_processor, name, value)


def check_model_path(path: str | os.PathLike, *, weights: bool = True) -> None:
    """A missing folder that cannot be a hub id ("Qwen/Qwen2.5-VL-3B-Instruct" can; "runs/demo/final", "./x" or
    "/abs/x" cannot) is named plainly; a hub id is left to transformers (the hub, or its cache offline)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    p = Path(path)
    if p.is_dir():
        if weights and not (p / "config.json").is_file() and not (p / "adapter_config.json").is_file():
            raise ValueError(f"model folder {str(p)!r} has no config.json: not a checkpoint folder (a run's final/ or "
                             f"checkpoint-N/ holds one; its files: {sorted(f.name for f in p.iterdir())[:8]})")
        return
    if p.exists():
        return
    try:
        validate_repo_id(str(path))
    except HFValidationError:
        raise FileNotFoundError(f"model path {str(path)!r} does not exist") from None


def load_processor(path: str | os.PathLike, backend: str = "pil") -> ProcessorMixin:
    """Load a processor; the image-only processors saved by this project load without torchvision.

    `backend`: the image processor's implementation. "pil" (the default) is the one the tiny builds are made with
    and keeps a checkpoint's pixel values the same whether torchvision is installed or not (a checkpoint does not
    record which one it was saved with, and transformers takes "torchvision" whenever it imports); "torchvision"
    is faster on large images, with slightly different resizing."""
    check_model_path(path, weights=False)
    if backend not in ("pil", "torchvision"):
        raise ValueError(f"image processor backend {backend!r}: use 'pil' or 'torchvision'")
    config_file = Path(path) / "processor_config.json"
    cls = AutoProcessor
    if config_file.is_file():
        name = json.loads(config_file.read_text()).get("processor_class")
        cls = IMAGE_ONLY_PROCESSORS.get(name) or UPGRADED_PROCESSORS.get(name) or AutoProcessor
    processor = cls.from_pretrained(path)
    if getattr(processor, "image_processor", None) is not None:  # the image processor alone takes the backend
        from transformers import AutoImageProcessor  # (a video processor has only torchvision's)

        processor.image_processor = AutoImageProcessor.from_pretrained(path, backend=backend)
    return processor
