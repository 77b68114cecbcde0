"""Tiny offline VLMs (real transformers classes, byte-level tokenizers) and model loading."""

from .tokenizer import build_byte_tokenizer
from .zoo import DEFAULT_FAMILY, FAMILIES, TinySize, build_tiny_vlm, load_model, load_processor, save_model

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "TinySize", "build_byte_tokenizer", "build_tiny_vlm", "load_model",
           "load_processor", "save_model"]
