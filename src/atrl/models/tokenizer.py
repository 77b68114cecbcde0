"""Offline tokenizers for the tiny VLM zoo: whole words where the vocabulary has them, bytes for the rest.

A byte-level BPE like real VLMs' tokenizers, with a vocabulary made here rather than learnt from a corpus. The
256 byte tokens (GPT-2's printable byte alphabet) come first, so any text round-trips exactly. The merges are
BPE training on the given words alone, each bare and after a space ("red", " red"), run until every such word is
one token; so a word of the vocabulary is one token, as "orange" is in a real VLM's vocabulary, and any other
text falls to the subwords and bytes the merges leave. Markup strings ("<think>") are never split and decode as
text; each model family's special tokens (chat markers, image placeholders) come last.

Plain vocabulary and merges, so transformers' own tokenizer classes that rebuild a BPE from a checkpoint's
vocabulary and merges (Qwen3.5's, with its own split of words and digits) tokenize it the same way.
"""

from __future__ import annotations

from collections import Counter
from functools import lru_cache

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
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


@lru_cache(maxsize=4)
def word_merges(words: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """BPE merges that make each of `words` (in byte-alphabet characters) one token.

    BPE training on the words as the corpus, each counted once: merge the most frequent adjacent pair (ties
    by the pair's text, so the result is the same on every machine) until no word has two tokens left.
    """
    seqs = [list(w) for w in words if len(w) > 1]
    merges: list[tuple[str, str]] = []
    while seqs:
        counts = Counter(pair for seq in seqs for pair in zip(seq, seq[1:]))
        first, second = min(counts, key=lambda p: (-counts[p], p))
        merges.append((first, second))
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if seq[i] == first and seq[i + 1] == second:
                    seq[i:i + 2] = [first + second]
                i += 1
        seqs = [seq for seq in seqs if len(seq) > 1]
    return tuple(merges)


def build_tokenizer(
    special_tokens: list[str],
    *,
    pad_token: str,
    eos_token: str,
    bos_token: str | None = None,
    words: tuple[str, ...] | list[str] = (),
    markup: tuple[str, ...] | list[str] = (),
    chat_template: str | None = None,
    extra_attributes: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A `PreTrainedTokenizerFast`: ids 0..255 for bytes, then `words`, `markup` and `special_tokens`.

    Args:
        special_tokens: tokens that are never split (chat markers, image placeholders), in id order.
        pad_token, eos_token, bos_token: which of `special_tokens` play those roles.
        words: words made one token each (letters only), bare and after a space.
        markup: strings kept whole that are ordinary text when decoded (e.g. "<think>").
        chat_template: a Jinja chat template stored with the tokenizer.
        extra_attributes: named special tokens the family's processor looks up (e.g. `image_token`).
    """
    for role, token in (("pad_token", pad_token), ("eos_token", eos_token), ("bos_token", bos_token)):
        if token is not None and token not in special_tokens:
            raise ValueError(f"{role}={token!r} is not among special_tokens {special_tokens}")
    bad = [w for w in words if not (w.isascii() and w.isalpha())]
    if bad:
        raise ValueError(f"words must be runs of ASCII letters; got {bad[:5]}")
    vocab = {ch: i for i, ch in enumerate(byte_alphabet())}
    space = byte_alphabet()[ord(" ")]
    merges = word_merges(tuple(form for word in sorted(set(words)) for form in (word, space + word)))
    for first, second in merges:
        vocab.setdefault(first + second, len(vocab))
    core = Tokenizer(models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False, byte_fallback=False))
    # GPT-2's split into words, numbers and punctuation runs, so that a word is a piece the merges can join (with
    # bytes alone a split changes nothing, and none is made).
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=bool(merges))
    core.decoder = decoders.ByteLevel()
    core.add_tokens([AddedToken(m, normalized=False, special=False) for m in markup])
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
