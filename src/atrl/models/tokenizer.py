"""Offline byte-level tokenizers for the tiny VLM zoo.

Every string is encoded as its UTF-8 bytes (one token per byte, GPT-2's printable byte alphabet), so
any text round-trips exactly without a learned vocabulary or a download. Each model family adds its
own special tokens (chat markers, image placeholders) on top of the 256 byte tokens.
"""

from __future__ import annotations

from functools import lru_cache

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


@lru_cache(maxsize=1)
def byte_alphabet() -> tuple[str, ...]:
    """The 256 printable stand-ins for raw bytes, in byte order (the GPT-2 byte-to-unicode map)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codepoints = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codepoints:
            codepoints[b] = 256 + extra
            extra += 1
    return tuple(chr(codepoints[b]) for b in range(256))


def build_byte_tokenizer(
    special_tokens: list[str],
    *,
    pad_token: str,
    eos_token: str,
    bos_token: str | None = None,
    chat_template: str | None = None,
    extra_attributes: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast` with ids 0..255 for bytes and the given special tokens after them.

    Args:
        special_tokens: tokens that are never split (chat markers, image placeholders), in id order.
        pad_token, eos_token, bos_token: which of `special_tokens` play those roles.
        chat_template: a Jinja chat template stored with the tokenizer.
        extra_attributes: named special tokens the family's processor looks up (e.g. `image_token`).
    """
    for role, token in (("pad_token", pad_token), ("eos_token", eos_token), ("bos_token", bos_token)):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{role}={token!r} is not among special_tokens {special_tokens}")
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False, byte_fallback=False))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(special_tokens)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=pad_token,
        eos_token=eos_token,
        bos_token=bos_token,
        clean_up_tokenization_spaces=False,
        model_max_length=1 << 16,
        padding_side="left",  # generation and TRL's GRPO expect left-padded prompts
        **({"extra_special_tokens": dict(extra_attributes)} if extra_attributes else {}),
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
