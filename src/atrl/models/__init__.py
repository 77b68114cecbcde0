"""Tiny offline VLMs (real transformers classes, word-and-byte tokenizers) and model loading."""

from .tokenizer import build_tokenizer
from .zoo import DEFAULT_FAMILY, FAMILIES, TinySize, build_tiny_vlm, load_model, load_processor, save_model

__all__ = ["DEFAULT_FAMILY", "FAMILIES", "TinySize", "build_tokenizer", "build_tiny_vlm", "load_model",
           "load_processor", "save_model"]
